"""Logins for the least-privilege group roles that migration 0006 makes.

Why: a service that connects as the owner of the schema can drop it; one that connects as a
superuser can do anything. Migration 0006 creates three NOLOGIN group roles with only what each
part of Aquameter does (see the grant comments in ``sql/migrations/0006_roles.*.sql``):

- ``aquameter_ingest``: append readings, quarantine, ingest_days; count a quarantine row again
  (migration 0015: ``occurrences`` and ``last_received_at`` only, never what a row holds); read
  the registry; create the weekly partitions only through ``aq_ensure_partitions`` (SECURITY
  DEFINER: it runs as its owner, so ingest needs no CREATE on the schema). It holds TEMPORARY on
  the database for its ``aq_staging`` and ``aq_quarantine_staging`` tables: a temp table lives
  in the session's own ``pg_temp`` schema, is seen by no other session and vanishes with it, so
  that is not DDL on the shared schema;
- ``aquameter_analytics``: read readings, rollups, registry, quarantine, ingest_days; write the
  analytics tables (dma_daily, alerts, billing_volumes, water_balance*, read_rates, meter_edits,
  analysis_marks);
- ``aquameter_billing``: read the ``billing_export`` view and nothing else (a view reads its
  tables with its owner's rights, so billing needs nothing on ``billing_volumes``).

The user that runs ``aquameter db migrate`` stays the owner and keeps DDL. An operator, once per
service, makes a login that is a member of one group with :func:`create_login` (connected as the
owner, a superuser or a CREATEROLE user) and gives that service the URL :func:`role_url` builds
from the owner's URL, e.g. ingest gets ``role_url(owner_url, "aq_ingest_1", secret)`` as its
database URL while ``db migrate`` and ``devices sync`` keep the owner's. Group roles are
cluster-wide: a login made here may connect to every database on the server that was migrated
with them, so give each deployment its own server (or restrict the logins in pg_hba.conf).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

INGEST: Final = "aquameter_ingest"
ANALYTICS: Final = "aquameter_analytics"
BILLING: Final = "aquameter_billing"
ROLES: Final = (INGEST, ANALYTICS, BILLING)


class RoleError(ValueError):
    """A login that cannot be made: unknown group, or a name that would defeat the point."""


def create_login(
    conn: psycopg.Connection, role: str, login: str, password: str | None = None
) -> None:
    """Make ``login`` a LOGIN user that is a member of the group ``role``; idempotent.

    A login that exists already is kept (made LOGIN if it was not) and joins the group; its
    password changes only when one is given (None leaves it as it is: trust or peer
    authentication, or a password set before). The password is hashed here with the server's
    ``password_encryption`` (SCRAM by default), so the clear text never reaches the server or its
    statement log. Refused: a name that is one of the group roles, and an existing superuser,
    whom no grant restricts. Commits on success.
    """
    if role not in ROLES:
        raise RoleError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if login in ROLES:
        raise RoleError(f"{login!r} is a group role; a login needs a name of its own")
    if not login:
        raise RoleError("login name is empty")
    with conn.transaction():
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (login,)).fetchone()
        if row is not None and row[0]:
            raise RoleError(f"{login!r} is a superuser: group grants would not restrict it")
        ident = sql.Identifier(login)
        if row is None:
            try:
                with conn.transaction():  # a savepoint: a concurrent create is not an error
                    conn.execute(sql.SQL("CREATE ROLE {} LOGIN INHERIT").format(ident))
            except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
                pass
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN INHERIT").format(ident))
        if password is not None:
            encrypted = _encrypt(conn, password, login)
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(encrypted)))
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), ident))


def _encrypt(conn: psycopg.Connection, password: str, login: str) -> str:
    """The password as the server stores it (libpq's PQencryptPasswordConn, which asks the server
    for its ``password_encryption``)."""
    hashed = conn.pgconn.encrypt_password(password.encode(), login.encode())
    return hashed.decode("ascii")


def drop_login(conn: psycopg.Connection, login: str) -> None:
    """Drop a login made by :func:`create_login` (tests, decommissioning); no error if absent.

    The login must have no session open and own nothing: the roles never own objects (partitions
    are made by the SECURITY DEFINER function as its owner, temp tables vanish with the session).
    """
    if login in ROLES:
        raise RoleError(f"{login!r} is a group role, not a login")
    with conn.transaction():
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(login)))


def role_url(base_url: str, login: str, password: str | None = None) -> str:
    """``base_url`` (the owner's) with its user replaced by ``login`` and its password by
    ``password`` (None: no password in the URL; libpq then uses ~/.pgpass or PGPASSWORD, or
    none with trust authentication). Host, port, database and options stay as they are.

    A ``postgresql://`` URL comes back as a URL (user and password percent-encoded, any
    ``user``/``password`` query parameter dropped so it cannot override them); a ``key=value``
    connection string comes back as one.
    """
    parts = urlsplit(base_url)
    if parts.scheme in ("postgresql", "postgres"):
        hosts = parts.netloc.rpartition("@")[2]
        userinfo = quote(login, safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        query = urlencode(
            [(k, v) for k, v in parse_qsl(parts.query) if k not in ("user", "password")]
        )
        return urlunsplit((parts.scheme, f"{userinfo}@{hosts}", parts.path, query, parts.fragment))
    params = conninfo_to_dict(base_url)
    params["user"] = login
    params.pop("password", None)
    if password is not None:
        params["password"] = password
    return make_conninfo(**params)  # type: ignore[arg-type]

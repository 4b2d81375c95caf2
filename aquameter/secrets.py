"""Secrets (device DTLS keys, MQTT passwords, database URLs) kept out of files, tables and logs.

Why this module exists: the registry TOML, the ``devices.params`` column, the quarantine and the
logs are all read by more people and copied to more places (backups, tickets, dashboards) than a
device key should be. So the registry only *names* where a secret lives -- an environment variable
(``psk_env``) or a file (``psk_file``) -- and the process that needs the secret reads it with
:func:`resolve_secret` at the moment it needs it. Anything printed that might hold a secret goes
through :func:`mask_url` (connection strings) or :func:`redact` (free text) first.

Errors are :class:`SecretError` with a one-line message that names the variable or file, never
the value, so it can go straight into a log line or a CLI error.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("aquameter.secrets")

MASK = "***"

_warned_open: set[Path] = set()  # secret files already warned about (once per path and process)


class SecretError(ValueError):
    """A secret that cannot be read; the message names where it was looked for, not the value."""


def resolve_secret(env: str | None, file: Path | str | None) -> str | None:
    """The secret held in environment variable ``env`` or in ``file``; None when neither is given.

    Why both an env var and a file: containers and systemd ``LoadCredential=`` hand secrets over
    as files, CI and ``.env`` setups as variables. A file's trailing newline (what ``echo`` and
    editors add) is not part of the secret. Giving both is an error rather than a silent choice,
    so a rotation that updates only one of them cannot go unnoticed. A file that group or others
    can read is used but warned about (the path is logged, never the content).
    """
    if env and file:
        raise SecretError(f"both environment variable {env} and file {file} given: choose one")
    if env:
        value = os.environ.get(env)
        if value is None:
            raise SecretError(f"environment variable {env} is not set")
        if not value:
            raise SecretError(f"environment variable {env} is empty")
        return value
    if file:
        path = Path(file)
        try:
            data = path.read_bytes()
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise SecretError(f"secret file {path} does not exist") from None
        except OSError as err:
            raise SecretError(f"secret file {path} is not readable: {err.strerror}") from None
        try:
            value = data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise SecretError(
                f"secret file {path} is not UTF-8 text (write binary keys as hex:...)"
            ) from None
        if not value:
            raise SecretError(f"secret file {path} is empty")
        if mode & (stat.S_IRWXG | stat.S_IRWXO) and path not in _warned_open:
            _warned_open.add(path)
            log.warning("secret file %s is accessible to group/others: chmod 600 it", path)
        return value
    return None


# scheme://userinfo@host...: the userinfo ends at the last "@" of the token (a password may hold
# an unencoded "@" or "/"; masking too much is the safe way to be wrong).
_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)(\S+)")
# key=value settings (libpq conninfo ``password=...``, a URL query ``?password=...``): the value is
# a single-quoted string (libpq's quoting, with backslash escapes) or runs to a space, & or ;.
_KEYWORD = re.compile(
    r"(?i)(\b[A-Za-z_]*(?:password|passwd|pwd|secret|psk)\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&;]*)"
)


def mask_url(url: str) -> str:
    """``url`` with every password replaced by ``***``: the userinfo password of any
    ``scheme://user:password@host`` URL, and ``password=...`` (also ``sslpassword``, in a query
    string or a PostgreSQL ``key=value`` conninfo string).

    Why not urllib.parse: it raises or mis-splits on the malformed URLs people actually paste (an
    unencoded ``@`` or ``/`` in the password, multi-host PostgreSQL URLs), and a masking function
    must never fail or give up and print the original.
    """

    def userinfo(m: re.Match[str]) -> str:
        scheme, rest = m.group(1), m.group(2)
        at = rest.rfind("@")
        if at < 0:
            return m.group(0)
        user, colon, _ = rest[:at].partition(":")
        if not colon:
            return m.group(0)
        return f"{scheme}{user}:{MASK}{rest[at:]}"

    masked = _URL.sub(userinfo, url)
    return _KEYWORD.sub(lambda m: m.group(1) + MASK, masked)


def redact(text: str, secrets: Iterable[str | bytes | None]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***``.

    For text that may quote a secret verbatim (an exception from a library, a payload echoed in a
    diagnostic). Longer secrets go first, so a secret containing another is masked whole.
    Secrets given as bytes are matched as UTF-8 text and as hex (how keys appear in dumps).
    """
    needles: set[str] = set()
    for s in secrets:
        if not s:
            continue
        if isinstance(s, bytes):
            needles.add(s.hex())
            needles.add(s.decode("utf-8", errors="ignore"))
        else:
            needles.add(s)
    for needle in sorted((n for n in needles if n), key=len, reverse=True):
        text = text.replace(needle, MASK)
    return text

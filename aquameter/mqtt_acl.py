"""``aquameter mqtt acl``: the broker's access control list (and password file) from the registry.

Why: ingest takes an MQTT topic as proof of who sent a message (``mqtt_trust_topic``), which
holds only if the broker lets each client publish under its own prefix and nowhere else. This
command writes that mosquitto ``acl_file`` from the registry, so the broker and ingest agree on
who may speak for which meter:

- every MQTT device: ``user <device_id>`` / ``topic write {root}/{vendor}/{device_id}/up``;
- every gateway named by MQTT devices: ``user <gateway_id>`` /
  ``topic write {root}/+/gw/{gateway_id}/batch`` (the vendor segment picks the payload format;
  ingest checks that each meter in the batch is registered under that gateway);
- the ingest user: ``topic read {root}/#`` and ``topic read $share/+/{root}/#``. Measured on
  mosquitto 2.0.11: its acl_file grants every SUBSCRIBE (SUBACK 0 even for ``x/#``) and checks
  each *delivery* against the message's topic, so ``{root}/#`` is what lets a shared subscriber
  receive, and a client without a ``read`` line (every meter and gateway) receives nothing. The
  ``$share/+/{root}/#`` line is for brokers that check a SUBSCRIBE against the filter as sent,
  ``$share/{group}/…`` included; on 2.0.11 it is harmless. And ``topic write
  {root}/_catchup/#``: each worker's catch-up fence (a broker that refuses it switches catch-up
  off, and a broker restart can then lose what is published before the workers re-subscribe).

Nothing else is granted: anonymous clients get no line (use ``allow_anonymous false``), and a
device cannot read anything. The user names are the MQTT usernames (``password_file``) or the
certificate CN (``use_identity_as_username true``).

``--password-dir DIR`` (one file per user, named after it, first line the password) also writes a
mosquitto password file. The hashes are computed here, in mosquitto 2.0's own format
(``$7$``: PBKDF2-HMAC-SHA512, 12-byte salt, 101 iterations like ``mosquitto_passwd``), rather
than by running ``mosquitto_passwd -b``, which would put every password on a command line that
any local user can read in the process list.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from aquameter.registry import Registry, load_registry

mqtt_app = typer.Typer(
    help="MQTT broker configuration from the registry (ACL, passwords).", no_args_is_help=True
)

DEFAULT_INGEST_USER = "aquameter-ingest"
# mosquitto_passwd's defaults in 2.0 (sha512-pbkdf2): what the broker expects to read.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12

# An id becomes an MQTT user name and a topic level: no wildcard, no level separator, no
# whitespace (the ACL file is line/space separated) and no ':' (the password file's separator).
_BAD_ID = re.compile(r"[+#/:\s\x00]")


@dataclass
class AclPlan:
    """Which user may do what on which topic, in the order written."""

    users: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, user: str, access: str, topic: str) -> None:
        self.users.setdefault(user, []).append((access, topic))

    @property
    def topics(self) -> int:
        return sum(len(rules) for rules in self.users.values())


def _check_id(kind: str, value: str) -> None:
    if not value or _BAD_ID.search(value) or value.startswith("$"):
        raise ValueError(
            f"{kind} {value!r} cannot be an MQTT user and topic level (it is empty, starts with "
            "'$' or holds '+', '#', '/', ':', whitespace or NUL)"
        )


def acl_plan(
    registry: Registry, root: str = "aquameter/v1", ingest_user: str = DEFAULT_INGEST_USER
) -> AclPlan:
    """The ACL for ``registry``: each MQTT device its own uplink topic, each gateway its batch
    topic, the ingest user read access to everything under ``root`` (shared or not).

    Raises ValueError for an id that would widen a rule (a ``+`` or ``#`` in a device id would
    grant a wildcard) or a name used twice (a gateway that is also a device)."""
    root = root.rstrip("/")
    _check_id("ingest user", ingest_user)
    plan = AclPlan()
    devices = registry.devices_by_protocol("mqtt")
    gateways: list[str] = []
    for dev in devices:
        _check_id("device", dev.id)
        _check_id(f"vendor of {dev.id}", dev.vendor)
        plan.add(dev.id, "write", f"{root}/{dev.vendor}/{dev.id}/up")
        if dev.gateway is not None and dev.gateway not in gateways:
            _check_id(f"gateway of {dev.id}", dev.gateway)
            gateways.append(dev.gateway)
    for gw in gateways:
        if gw in plan.users:
            raise ValueError(f"gateway {gw!r} is also a device id: one MQTT user cannot be both")
        plan.add(gw, "write", f"{root}/+/gw/{gw}/batch")
    if ingest_user in plan.users:
        raise ValueError(f"ingest user {ingest_user!r} is also a device or gateway id")
    plan.add(ingest_user, "read", f"{root}/#")
    plan.add(ingest_user, "read", f"$share/+/{root}/#")
    plan.add(ingest_user, "write", f"{root}/_catchup/#")  # the catch-up fence (protocols/mqtt.py)
    return plan


def render_acl(plan: AclPlan, source: str = "the registry") -> str:
    lines = [
        f"# mosquitto acl_file written by `aquameter mqtt acl` from {source}.",
        "# Regenerate after each registry change and reload mosquitto (SIGHUP); do not edit.",
        "",
    ]
    for user, rules in plan.users.items():
        lines.append(f"user {user}")
        lines.extend(f"topic {access} {topic}" for access, topic in rules)
        lines.append("")
    return "\n".join(lines)


def password_hash(password: str, *, salt: bytes | None = None, iterations: int = 0) -> str:
    """A mosquitto 2.0 password-file hash (``$7$iterations$salt$hash``, PBKDF2-HMAC-SHA512)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    iterations = iterations or PBKDF2_ITERATIONS
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def password_lines(
    users: list[str], password_dir: Path, iterations: int = 0
) -> tuple[list[str], list[str]]:
    """(``user:hash`` lines, users without a password file in ``password_dir``)."""
    lines, missing = [], []
    for user in users:
        path = password_dir / user
        if not path.is_file():
            missing.append(user)
            continue
        text = path.read_text(encoding="utf-8")
        password = text.splitlines()[0] if text else ""
        if not password:
            raise ValueError(f"password file {path} is empty")
        lines.append(f"{user}:{password_hash(password, iterations=iterations)}")
    return lines, missing


def _write_atomic(path: Path, text: str, mode: int) -> None:
    """Replace ``path`` at once: a broker reloading mid-write must never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@mqtt_app.callback()
def _mqtt() -> None:
    """MQTT broker configuration from the registry."""


@mqtt_app.command("acl")
def acl(
    out: Annotated[Path, typer.Option("--out", "-o", help="The ACL file to write.")],
    registry: Annotated[
        Path | None, typer.Option(help="Registry TOML (default: AQUAMETER_REGISTRY).")
    ] = None,
    root: Annotated[
        str | None, typer.Option(help="Topic root (default: AQUAMETER_MQTT_TOPIC_ROOT).")
    ] = None,
    ingest_user: Annotated[
        str, typer.Option(help="MQTT user of the ingest service (reads everything).")
    ] = DEFAULT_INGEST_USER,
    password_dir: Annotated[
        Path | None,
        typer.Option(help="Directory with one password file per user, named after it."),
    ] = None,
    password_out: Annotated[
        Path | None,
        typer.Option(help="Password file to write (default: 'passwd' beside --out)."),
    ] = None,
    iterations: Annotated[
        int, typer.Option(min=1, help="PBKDF2 iterations of the password hashes.")
    ] = PBKDF2_ITERATIONS,
) -> None:
    """Write a mosquitto acl_file (and with --password-dir a password_file) from the registry:
    each MQTT meter may publish only its own uplink topic, each gateway only its batch topic,
    the ingest user may read them all."""
    from aquameter.settings import Settings

    settings = Settings()
    registry_path = registry or settings.registry
    try:
        reg = load_registry(registry_path)
        plan = acl_plan(reg, root or settings.mqtt_topic_root, ingest_user)
    except (OSError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    _write_atomic(out, render_acl(plan, str(registry_path)), 0o644)
    typer.echo(f"acl: {len(plan.users)} users, {plan.topics} topics → {out}")
    if password_dir is None:
        return
    target = password_out or out.with_name("passwd")
    try:
        lines, missing = password_lines(list(plan.users), password_dir, iterations)
    except (OSError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    _write_atomic(target, "".join(f"{line}\n" for line in lines), 0o600)
    typer.echo(f"passwords: {len(lines)} users → {target} (PBKDF2-SHA512, {iterations} iterations)")
    if missing:
        shown = ", ".join(missing[:5]) + (", …" if len(missing) > 5 else "")
        typer.echo(
            f"passwords: {len(missing)} users have no file in {password_dir} ({shown}): they "
            "can log in only with a client certificate",
            err=True,
        )

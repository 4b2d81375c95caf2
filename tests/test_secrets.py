"""Secrets are referenced, never stored or printed.

The end-to-end check: a registry whose DTLS keys come from an environment variable and a file is
synced and served; after real CoAP exchanges (DTLS when DTLSSocket is installed, else plain only)
every table of the database is dumped as text and grepped for each key, and so are the logs of
the sync and of ingest. Also: :func:`aquameter.secrets.resolve_secret`'s one-line errors,
:func:`mask_url`, :func:`redact`, the registry's refusal of inline keys, and migration 0007
scrubbing a key stored the old way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import psycopg
import pytest
from aiocoap.numbers.codes import Code
from psycopg import sql
from pydantic import ValidationError

from aquameter.registry import Registry, load_registry
from aquameter.secrets import SecretError, mask_url, redact, resolve_secret
from ingest.registry_sync import sync_registry
from sql import migrate as mig
from tests.test_coap import client, request, serving
from tests.test_coap_identity import DTLS_MISSING, dtls_post

T0 = 1767225600
ENV = "AQ_TEST_SECRETS_PSK_E1"
# 16 bytes each (this tinydtls build refuses keys of 19 bytes and more); distinctive enough
# that a hit in a dump cannot be a coincidence.
KEY_ENV = "Zq7-env-KEY-e1!x"
KEY_FILE = "Wp3-file-KEY-f1x"
MQTT_PW = "mqtt-pw-Hk29-gw"

REGISTRY = """
[[dma]]
id = "D"

[[vendor]]
id = "j"
payload = "json"
  [[vendor.channel]]
  name = "register"
  quantity = "volume"
  unit = "m3"
  kind = "register"

[[device]]
id = "E1"
vendor = "j"
protocol = "coap"
dma = "D"
psk_env = "{env}"

[[device]]
id = "F1"
vendor = "j"
protocol = "coap"
dma = "D"
psk_file = "secrets/F1.psk"

[[device]]
id = "P1"
vendor = "j"
protocol = "coap"
dma = "D"
allow_plain_coap = true

[[device]]
id = "GWM"
vendor = "j"
protocol = "mqtt"
dma = "D"
password_file = "secrets/GWM.pw"
"""


def write_registry(tmp_path: Path) -> Path:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "F1.psk").write_text(KEY_FILE + "\n")
    (secrets / "GWM.pw").write_text(MQTT_PW + "\n")
    for f in secrets.iterdir():
        f.chmod(0o600)
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY.replace("{env}", ENV))
    return path


def dump_database(db_url: str) -> str:
    """Every row of every table and view of the public schema, as text."""
    out = []
    with psycopg.connect(db_url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchall()
        ]
        assert "devices" in tables and "quarantine" in tables
        for table in tables:
            query = sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table))
            out += [f"{table}: {r[0]}" for r in conn.execute(query).fetchall()]
    return "\n".join(out)


def hits(text: str) -> list[str]:
    """The secrets (or their hex form, as bytea prints) found in ``text``."""
    needles = [KEY_ENV, KEY_FILE, MQTT_PW]
    needles += [n.encode().hex() for n in needles]
    return [n for n in needles if n in text]


# --- end to end: nothing in the database, nothing in the logs ----------------------------------
def test_no_secret_in_any_table_or_log_after_sync_and_ingest(
    empty_db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(ENV, KEY_ENV)
    registry = load_registry(write_registry(tmp_path))
    with psycopg.connect(empty_db_url) as conn:
        mig.migrate(conn, partitions_ahead=1)
        sync_registry(conn, registry)
        conn.commit()

    codes: list[Code | None] = []

    async def scenario() -> None:
        async with serving(empty_db_url, registry) as (server, _):
            async with client() as ctx:
                uri = f"coap://127.0.0.1:{server.port}/up"
                for dev in ("P1", "E1", "F1"):  # plain: P1 stored, the keyed ones refused
                    body = json.dumps({"dev": dev, "ts": T0, "reg": 1.0}).encode()
                    codes.append((await request(ctx, uri, body, 50)).code)
            if DTLS_MISSING is None:
                assert server.dtls_port is not None
                for dev, key, reg in (("E1", KEY_ENV, 2.0), ("F1", KEY_FILE, 3.0)):
                    body = json.dumps({"dev": dev, "ts": T0, "reg": reg}).encode()
                    got = await dtls_post(server.dtls_port, dev, key, body)
                    codes.append(None if got is None else got.code)
                # a wrong key: refused handshake (tinydtls logs nothing about the key)
                got = await dtls_post(server.dtls_port, "E1", KEY_FILE, b"{}")
                codes.append(None if got is None else got.code)

    asyncio.run(scenario())
    expected = [Code.CHANGED, Code.FORBIDDEN, Code.FORBIDDEN]
    if DTLS_MISSING is None:
        expected += [Code.CHANGED, Code.CHANGED, None]
    assert codes == expected

    dump = dump_database(empty_db_url)
    assert "readings" in dump and "quarantine: " in dump  # the dump saw the traffic
    assert hits(dump) == []
    with psycopg.connect(empty_db_url) as conn:
        params = dict(conn.execute("SELECT id, params FROM devices").fetchall())
    assert params["E1"] == {"psk_env": ENV}  # the reference is stored, the key is not
    assert params["F1"] == {"psk_file": str(tmp_path / "secrets" / "F1.psk")}
    assert params["GWM"] == {"password_file": str(tmp_path / "secrets" / "GWM.pw")}
    assert params["P1"] == {"allow_plain_coap": True}

    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "CoAP uplinks on" in logs and "refused" in logs  # the logs saw the traffic
    assert hits(logs) == []


def test_sync_drops_a_secret_put_in_params(
    empty_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry.model_validate(
        {
            "dma": [{"id": "D"}],
            "vendor": [{"id": "j", "channel": [{"name": "r", "quantity": "volume"}]}],
            "device": [{"id": "X", "vendor": "j", "params": {"password": MQTT_PW, "a": 1}}],
        }
    )
    with psycopg.connect(empty_db_url) as conn:
        mig.migrate(conn, partitions_ahead=1)
        sync_registry(conn, registry)
        conn.commit()
        got = conn.execute("SELECT params FROM devices WHERE id = 'X'").fetchone()
    assert got == ({"a": 1},)
    assert "device X: params.password not stored" in caplog.text and MQTT_PW not in caplog.text


# --- migration 0007 -----------------------------------------------------------------------------
def test_migration_0007_scrubs_keys_stored_the_old_way(
    empty_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = tmp_path / "migrations"
    shutil.copytree(mig.MIGRATIONS_DIR, before)
    (before / "0007_no_plaintext_secrets.sql").unlink()
    monkeypatch.setattr(mig.discover, "__defaults__", (before,))
    with psycopg.connect(empty_db_url) as conn:
        first = mig.migrate(conn, timescale="off", partitions_ahead=1)
        assert "0007_no_plaintext_secrets.sql" not in first.applied
        conn.execute("INSERT INTO vendors (id) VALUES ('v')")
        conn.execute(
            "INSERT INTO devices (id, vendor_id, protocol, params) VALUES "
            "('OLD', 'v', 'coap', %s), ('PW', 'v', 'mqtt', %s), ('CLEAN', 'v', 'coap', %s)",
            (
                json.dumps({"psk": KEY_FILE, "keep": 1}),
                json.dumps({"password": MQTT_PW}),
                json.dumps({"psk_env": "VAR"}),
            ),
        )
        conn.commit()

        monkeypatch.setattr(mig.discover, "__defaults__", (mig.MIGRATIONS_DIR,))
        second = mig.migrate(conn, timescale="off", partitions_ahead=1)
        assert second.applied == ["0007_no_plaintext_secrets.sql"]
        params = dict(conn.execute("SELECT id, params FROM devices").fetchall())
    assert params == {"OLD": {"keep": 1}, "PW": {}, "CLEAN": {"psk_env": "VAR"}}
    assert hits(dump_database(empty_db_url)) == []


# --- resolve_secret -----------------------------------------------------------------------------
def test_resolve_secret_reads_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY_ENV)
    f = tmp_path / "k"
    f.write_text(KEY_FILE + "\r\n")
    assert resolve_secret(ENV, None) == KEY_ENV
    assert resolve_secret(None, f) == KEY_FILE  # the trailing newline is not the key
    assert resolve_secret(None, str(f)) == KEY_FILE
    assert resolve_secret(None, None) is None


@pytest.mark.parametrize(
    "case, message",
    [
        ("unset", rf"environment variable {ENV}_UNSET is not set"),
        ("empty", rf"environment variable {ENV} is empty"),
        ("missing", r"secret file .*/nope does not exist"),
        ("directory", r"secret file .* is not readable: Is a directory"),
        ("blank", r"secret file .*/blank is empty"),
        ("binary", r"secret file .*/bin is not UTF-8 text"),
        ("both", r"both environment variable .* and file .* given: choose one"),
    ],
)
def test_resolve_secret_errors_are_one_line_and_name_the_place(
    case: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "")
    (tmp_path / "blank").write_text("\n")
    (tmp_path / "bin").write_bytes(b"\xff\xfe" + KEY_FILE.encode())
    (tmp_path / "dir").mkdir()
    args = {
        "unset": (f"{ENV}_UNSET", None),
        "empty": (ENV, None),
        "missing": (None, tmp_path / "nope"),
        "directory": (None, tmp_path / "dir"),
        "blank": (None, tmp_path / "blank"),
        "binary": (None, tmp_path / "bin"),
        "both": (ENV, tmp_path / "blank"),
    }[case]
    with pytest.raises(SecretError, match=message) as err:
        resolve_secret(*args)
    assert "\n" not in str(err.value) and KEY_FILE not in str(err.value)


def test_open_secret_file_is_warned_about_without_its_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "open.psk"
    f.write_text(KEY_FILE)
    f.chmod(0o644)
    assert resolve_secret(None, f) == KEY_FILE
    assert "accessible to group/others" in caplog.text and KEY_FILE not in caplog.text


# --- the registry -------------------------------------------------------------------------------
def _registry(device: dict[str, object]) -> dict[str, object]:
    return {
        "dma": [{"id": "D"}],
        "vendor": [{"id": "j"}],
        "device": [{"id": "X", "vendor": "j", **device}],
    }


@pytest.mark.parametrize(
    "device, message",
    [
        ({"psk": KEY_FILE}, "device X: inline psk is not accepted .* move it to psk_env"),
        ({"password": MQTT_PW}, "inline password is not accepted .* password_file"),
        ({"psk_env": "A", "psk_file": "b"}, "device X: give psk_env or psk_file, not both"),
        ({"allow_plain_coap": True}, "device X: allow_plain_coap is only for protocol coap"),
        (
            {"protocol": "coap", "allow_plain_coap": True, "psk_env": "A"},
            "a device with a psk must use DTLS",
        ),
    ],
)
def test_registry_refuses_inline_secrets_and_contradictions(
    device: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message) as err:
        Registry.model_validate(_registry(device))
    text = str(err.value)
    assert KEY_FILE not in text and MQTT_PW not in text  # the error does not echo the key


def test_meter_group_refuses_inline_psk_and_expands_allow_plain_coap() -> None:
    group = {"vendor": "j", "dma": "D", "count": 2, "id_format": "M{}", "protocol": "coap"}
    with pytest.raises(ValidationError, match="inline psk is not accepted"):
        Registry.model_validate({**_registry({}), "meter_group": [{**group, "psk": "k"}]})
    reg = Registry.model_validate(
        {**_registry({}), "meter_group": [{**group, "allow_plain_coap": True}]}
    )
    assert [(d.id, d.allow_plain_coap) for d in reg.all_devices()][1:] == [
        ("M1", True),
        ("M2", True),
    ]


def test_relative_secret_files_resolve_against_the_registry_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_registry(tmp_path)
    monkeypatch.chdir("/")
    registry = load_registry(path)
    assert registry.source_dir == tmp_path.resolve()
    devices = {d.id: d for d in registry.devices}
    assert devices["F1"].psk_file == tmp_path.resolve() / "secrets" / "F1.psk"
    assert devices["F1"].resolve_psk() == KEY_FILE
    assert devices["GWM"].resolve_password() == MQTT_PW
    assert devices["P1"].resolve_psk() is None and devices["F1"].keyed
    with pytest.raises(SecretError, match=f"device E1: psk_env {ENV}: environment variable"):
        devices["E1"].resolve_psk()


# --- mask_url and redact ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, masked",
    [
        ("postgresql://aq:s3cret@db:5432/aq", "postgresql://aq:***@db:5432/aq"),
        ("postgresql://aq@db/aq", "postgresql://aq@db/aq"),
        ("postgresql://db/aq", "postgresql://db/aq"),
        ("mqtt://gw:p%40ss@broker:1883", "mqtt://gw:***@broker:1883"),
        ("mqtts://gw:p@ss/w@broker:8883/x", "mqtts://gw:***@broker:8883/x"),  # raw @ and /
        (
            "postgresql://aq:pw@h1,h2:5433/aq?sslmode=require",
            "postgresql://aq:***@h1,h2:5433/aq?sslmode=require",
        ),  # fmt: skip
        (
            "postgresql://aq@db/aq?password=s3cret&sslmode=require",
            "postgresql://aq@db/aq?password=***&sslmode=require",
        ),  # fmt: skip
        ("host=db user=aq password=s3cret dbname=aq", "host=db user=aq password=*** dbname=aq"),
        ("host=db password = 'a b\\'c' dbname=aq", "host=db password = *** dbname=aq"),
        ("host=db sslpassword=k dbname=aq", "host=db sslpassword=*** dbname=aq"),
        ("PASSWORD=x", "PASSWORD=***"),
        ("connect to postgresql://u:v@h/d failed", "connect to postgresql://u:***@h/d failed"),
        ("", ""),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_redact_masks_every_secret_longest_first() -> None:
    text = f"key {KEY_FILE} and {KEY_FILE}-ext, hex {KEY_ENV.encode().hex()}, none {None}"
    got = redact(text, [KEY_FILE, f"{KEY_FILE}-ext", KEY_ENV.encode(), None, ""])
    assert got == "key *** and ***, hex ***, none None"

"""Who may send readings over CoAP: identity rules against the real server, pipeline and database.

The server is the project's CoapIngest feeding the real IngestPipeline into PostgreSQL; the peers
are aiocoap clients and libcoap's ``coap-client-notls`` / ``coap-client-openssl`` (an independent
DTLS-PSK implementation). The registry (written per test) has two keyed CoAP meters (one key in an
environment variable, one in a file), a keyed concentrator with a meter under it, a CoAP meter
allowed on plain CoAP, a CoAP meter that is not, and an MQTT meter.

The rules checked: a DTLS identity speaks for itself and its gateway's meters only; plain CoAP
only for ``allow_plain_coap`` devices. Everything refused is quarantined UNAUTHORIZED with the
claimed device and the proven identity, answered 4.03 and counted.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import aiocoap
import psycopg
import pytest
from aiocoap.credentials import DTLS
from aiocoap.numbers.codes import Code

from aquameter.registry import Registry, load_registry
from aquameter.secrets import SecretError
from ingest.registry_sync import sync_registry
from protocols.coap import UNAUTHENTICATED, CoapIngest, dtls_available
from sql.migrate import migrate
from tests.test_coap import client, libcoap, request, serving

T0 = 1767225600  # 2026-01-01T00:00Z
DTLS_MISSING = dtls_available()
NOTLS = shutil.which("coap-client-notls")
OPENSSL = shutil.which("coap-client-openssl")
NEEDS_DTLS = pytest.mark.skipif(DTLS_MISSING is not None, reason=f"DTLS: {DTLS_MISSING}")

KEY_ENV = "AQ_TEST_IDENTITY_PSK_K1"
# 16 bytes: this tinydtls build silently fails handshakes with keys of 19 bytes and more.
KEY_K1 = "k1-env-secret-16"
KEY_K2 = "k2-file-secret16"
KEY_GW = "gw-file-secret16"

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
  min = 0.0
  max = 99999.0

[[device]]
id = "K1"
vendor = "j"
protocol = "coap"
dma = "D"
psk_env = "{env}"

[[device]]
id = "K2"
vendor = "j"
protocol = "coap"
dma = "D"
psk_file = "keys/K2.psk"

[[device]]
id = "GW"
vendor = "j"
protocol = "coap"
dma = "D"
psk_file = "keys/GW.psk"

[[device]]
id = "UNDER-GW"
vendor = "j"
protocol = "coap"
dma = "D"
gateway = "GW"

[[device]]
id = "OPEN1"
vendor = "j"
protocol = "coap"
dma = "D"
allow_plain_coap = true

[[device]]
id = "CLOSED1"
vendor = "j"
protocol = "coap"
dma = "D"

[[device]]
id = "MQ1"
vendor = "j"
protocol = "mqtt"
dma = "D"
"""


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    keys = tmp_path / "keys"
    keys.mkdir()
    for name, key in (("K2", KEY_K2), ("GW", KEY_GW)):
        (keys / f"{name}.psk").write_text(key + "\n")
        (keys / f"{name}.psk").chmod(0o600)
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY.replace("{env}", KEY_ENV))
    monkeypatch.setenv(KEY_ENV, KEY_K1)
    return load_registry(path)


@pytest.fixture
def db(empty_db_url: str, registry: Registry) -> str:
    with psycopg.connect(empty_db_url) as conn:
        migrate(conn, partitions_ahead=1)
        sync_registry(conn, registry)
        conn.commit()
    return empty_db_url


def body(dev: str, reg: float, ts: int = T0) -> bytes:
    return json.dumps({"dev": dev, "ts": ts, "reg": reg}).encode()


def stored(db_url: str) -> list[tuple[str, float]]:
    with psycopg.connect(db_url) as conn:
        got = conn.execute(
            "SELECT c.device_id, r.value FROM readings r JOIN channels c ON c.id = r.channel_id "
            "ORDER BY 1, 2"
        ).fetchall()
    return [(d, float(v)) for d, v in got]


def quarantined(db_url: str) -> list[tuple[str, str | None, str, str]]:
    with psycopg.connect(db_url) as conn:
        got = conn.execute("SELECT reason, device_id, source, detail FROM quarantine ORDER BY id")
        return [(r, d, s, t) for r, d, s, t in got.fetchall()]


async def dtls_post(port: int, identity: str, key: str, payload: bytes) -> aiocoap.Message | None:
    async with client(["tinydtls"]) as ctx:
        ctx.client_credentials[f"coaps://127.0.0.1:{port}/*"] = DTLS(
            psk=key.encode(), client_identity=identity.encode()
        )
        try:
            return await request(ctx, f"coaps://127.0.0.1:{port}/up", payload, 50, timeout=10)
        except (TimeoutError, aiocoap.error.Error):
            return None


def run(db: str, registry: Registry, scenario: Any) -> CoapIngest:
    async def main() -> CoapIngest:
        async with serving(db, registry) as (server, _):
            await scenario(server)
            return server

    return asyncio.run(main())


# --- plain CoAP ---------------------------------------------------------------------------------
def test_plain_coap_only_for_allow_plain_coap_devices(db: str, registry: Registry) -> None:
    """aiocoap client over plain CoAP: the allowed meter is stored; a keyed meter, a CoAP meter
    without allow_plain_coap, an MQTT meter and a gateway's meter are refused 4.03."""
    codes: dict[str, Code] = {}

    async def scenario(server: CoapIngest) -> None:
        async with client() as ctx:
            uri = f"coap://127.0.0.1:{server.port}/up"
            for dev, reg in (("OPEN1", 1.0), ("K1", 2.0), ("CLOSED1", 3.0), ("MQ1", 4.0)):
                codes[dev] = (await request(ctx, uri, body(dev, reg), 50)).code
            codes["UNDER-GW"] = (await request(ctx, uri, body("UNDER-GW", 5.0), 50)).code

    server = run(db, registry, scenario)
    assert codes == {
        "OPEN1": Code.CHANGED,
        "K1": Code.FORBIDDEN,
        "CLOSED1": Code.FORBIDDEN,
        "MQ1": Code.FORBIDDEN,
        "UNDER-GW": Code.FORBIDDEN,
    }
    assert stored(db) == [("OPEN1", 1.0)]
    rows = quarantined(db)
    assert [(r, d, s) for r, d, s, _ in rows] == [
        ("UNAUTHORIZED", dev, "coap") for dev in ("K1", "CLOSED1", "MQ1", "UNDER-GW")
    ]
    for _, dev, _, detail in rows:  # claimed device and proven (non-)identity both named
        assert f"{UNAUTHENTICATED} from 127.0.0.1" in detail and repr(dev) in detail
    assert server.stats.forbidden == 4 and server.stats.plain_refused == 4
    assert server.stats.changed == 1


def test_plain_batch_mixing_allowed_and_refused_devices_is_split(
    db: str, registry: Registry
) -> None:
    """A plain concentrator batch: the allow_plain_coap meter's reading is stored, the MQTT
    meter's is refused (2.04 with a diagnostic, like any partial uplink)."""
    got: list[aiocoap.Message] = []
    batch = json.dumps({"readings": [json.loads(body("OPEN1", 7.0)), json.loads(body("MQ1", 8.0))]})

    async def scenario(server: CoapIngest) -> None:
        async with client() as ctx:
            uri = f"coap://127.0.0.1:{server.port}/up"
            got.append(await request(ctx, uri, batch.encode(), 50))

    server = run(db, registry, scenario)
    assert got[0].code == Code.CHANGED
    assert got[0].payload == b"accepted=1 quarantined=1 UNAUTHORIZED=1"
    assert stored(db) == [("OPEN1", 7.0)]
    assert [(r, d) for r, d, _, _ in quarantined(db)] == [("UNAUTHORIZED", "MQ1")]
    assert server.stats.plain_refused == 1 and server.stats.partial == 1


@pytest.mark.skipif(NOTLS is None, reason="libcoap3-bin (coap-client-notls) is not installed")
def test_libcoap_plain_client_to_keyed_mqtt_and_allowed_devices(
    db: str, registry: Registry
) -> None:
    """The independent client: 4.03 for a keyed and an MQTT meter, 2.04 for the allowed one."""
    results: list[tuple[int, str, str]] = []

    async def scenario(server: CoapIngest) -> None:
        uri = f"coap://127.0.0.1:{server.port}/up"
        for dev, reg in (("K2", 1.5), ("MQ1", 2.5), ("OPEN1", 3.5)):
            results.append(
                await libcoap(
                    str(NOTLS), "-m", "post", "-t", "json", "-e", body(dev, reg).decode(), uri
                )
            )

    server = run(db, registry, scenario)
    assert [rc for rc, _, _ in results] == [0, 0, 0], results
    assert "UNAUTHORIZED" in results[0][1] + results[0][2]  # the 4.03 diagnostic
    assert "UNAUTHORIZED" in results[1][1] + results[1][2]
    assert stored(db) == [("OPEN1", 3.5)]
    assert [(r, d) for r, d, _, _ in quarantined(db)] == [
        ("UNAUTHORIZED", "K2"),
        ("UNAUTHORIZED", "MQ1"),
    ]
    assert server.stats.forbidden == 2 and server.stats.plain_refused == 2


# --- DTLS ---------------------------------------------------------------------------------------
@NEEDS_DTLS
def test_dtls_identity_speaks_only_for_itself_and_its_gateway_meters(
    db: str, registry: Registry
) -> None:
    """aiocoap DTLS client: K2's identity and key sending K1's readings -> 4.03 UNAUTHORIZED
    (claimed K1, proven K2); its own -> stored; keys from env (K1) and file (K2, GW) work; the
    gateway may send its meter's readings but not an unrelated meter's."""
    got: list[aiocoap.Message | None] = []

    async def scenario(server: CoapIngest) -> None:
        p = server.dtls_port
        assert p is not None
        got.append(await dtls_post(p, "K2", KEY_K2, body("K1", 1.0)))  # impersonation
        got.append(await dtls_post(p, "K2", KEY_K2, body("K2", 2.0)))
        got.append(await dtls_post(p, "K1", KEY_K1, body("K1", 3.0)))
        got.append(await dtls_post(p, "GW", KEY_GW, body("UNDER-GW", 4.0)))
        got.append(await dtls_post(p, "GW", KEY_GW, body("OPEN1", 5.0)))  # not under GW
        got.append(await dtls_post(p, "K1", KEY_K1, body("MQ1", 6.0)))

    server = run(db, registry, scenario)
    codes = [None if m is None else m.code for m in got]
    assert codes == [
        Code.FORBIDDEN,
        Code.CHANGED,
        Code.CHANGED,
        Code.CHANGED,
        Code.FORBIDDEN,
        Code.FORBIDDEN,
    ]
    assert stored(db) == [("K1", 3.0), ("K2", 2.0), ("UNDER-GW", 4.0)]
    rows = quarantined(db)
    assert [(r, d, s) for r, d, s, _ in rows] == [
        ("UNAUTHORIZED", "K1", "coaps"),
        ("UNAUTHORIZED", "OPEN1", "coaps"),
        ("UNAUTHORIZED", "MQ1", "coaps"),
    ]
    assert "'K2'" in rows[0][3] and "'K1'" in rows[0][3]  # proven and claimed
    assert server.stats.forbidden == 3 and server.stats.plain_refused == 0


@NEEDS_DTLS
@pytest.mark.skipif(OPENSSL is None, reason="libcoap3-bin (coap-client-openssl) is not installed")
def test_libcoap_openssl_client_with_another_devices_identity(db: str, registry: Registry) -> None:
    """coap-client-openssl -u K2 -k <K2's key> sending K1's reading: refused; its own: stored."""
    results: list[tuple[int, str, str]] = []

    async def scenario(server: CoapIngest) -> None:
        uri = f"coaps://127.0.0.1:{server.dtls_port}/up"
        for dev, reg in (("K1", 1.25), ("K2", 2.25)):
            results.append(
                await libcoap(
                    str(OPENSSL),
                    "-m",
                    "post",
                    "-t",
                    "json",
                    "-e",
                    body(dev, reg).decode(),
                    "-u",
                    "K2",
                    "-k",
                    KEY_K2,
                    "-B",
                    "10",
                    uri,
                )  # fmt: skip
            )

    server = run(db, registry, scenario)
    assert "UNAUTHORIZED" in results[0][1] + results[0][2], results
    assert stored(db) == [("K2", 2.25)]
    assert [(r, d, s) for r, d, s, _ in quarantined(db)] == [("UNAUTHORIZED", "K1", "coaps")]
    assert server.stats.dtls_requests == 2 and server.stats.forbidden == 1


# --- keys at start ------------------------------------------------------------------------------
def test_missing_key_stops_the_start_with_a_one_line_error(
    db: str, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)

    async def scenario(server: CoapIngest) -> None:  # never reached
        raise AssertionError("the server started without K1's key")

    with pytest.raises(SecretError) as err:
        run(db, registry, scenario)
    message = str(err.value)
    assert "\n" not in message and "K1" in message and KEY_ENV in message

    monkeypatch.setenv(KEY_ENV, KEY_K1)
    assert registry.devices[1].psk_file is not None
    registry.devices[1].psk_file.unlink()
    with pytest.raises(SecretError, match=r"device K2: psk_file .*K2\.psk.* does not exist"):
        run(db, registry, scenario)

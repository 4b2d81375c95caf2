"""MQTT broker security end to end: a real mosquitto with TLS, a password file and the ACL that
``aquameter mqtt acl`` writes from the example registry; real ingest into PostgreSQL.

One broker per module (started here on free ports, never the shared one) with two TLS listeners:
``pw`` (server certificate only; username + password) and ``cert`` (``require_certificate`` and
``use_identity_as_username``: the client certificate's CN is the user). Certificates are made here
with ``cryptography``: a CA, the broker's certificate for IP 127.0.0.1, client certificates, and a
rogue CA with a client certificate of the same CN.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from aquameter.embedded import free_port, wait_port
from aquameter.mqtt_acl import acl_plan, mqtt_app, password_hash
from aquameter.registry import load_registry
from aquameter.settings import Settings
from ingest.pipeline import IngestPipeline
from ingest.service import mqtt_client, vendor_formats
from protocols.mqtt import MqttIngest, batch_topic, safe_url, uplink_topic
from tests.mqtt_helpers import wait_count
from tests.servers import EXAMPLE_REGISTRY

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")

ROOT = f"aqs-{uuid.uuid4().hex[:8]}/v1"
NOW = int(time.time()) // 900 * 900
T0 = NOW - 86400
INGEST = "aquameter-ingest"
# Every password here is distinctive so the log scan below cannot miss or mistake one.
PASSWORDS = {
    INGEST: "ingest-Secr3t-7f3a",
    "AQN00001": "meter1-Secr3t-91c2",
    "AQN00002": "meter2-Secr3t-4d8e",
    "GW-NORTH-1": "gwnorth-Secr3t-0b6f",
}
WRONG_PASSWORD = "wrong-Secr3t-55aa"
REFUSED = ("Not authorized", "Bad user name or password")
WAIT = 30.0  # generous: a busy machine


# --- certificates ---------------------------------------------------------------------------
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server_ip: str | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_ip else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
    if server_ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(server_ip))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(folder: Path, stem: str, cert: x509.Certificate, key: object) -> None:
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    (folder / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (folder / f"{stem}.key").chmod(0o600)


def make_pki(folder: Path) -> Path:
    """ca, server (IP 127.0.0.1), client certs for the ingest user and AQN00001, and a rogue CA
    that signed a client certificate claiming to be the ingest user."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert("Aquameter test CA", ca_key, None, ca_key, ca=True)
    _write_pair(folder, "ca", ca, ca_key)
    k = _key()
    _write_pair(folder, "server", _cert("broker", k, ca, ca_key, server_ip="127.0.0.1"), k)
    for cn in (INGEST, "AQN00001"):
        k = _key()
        _write_pair(folder, cn, _cert(cn, k, ca, ca_key), k)
    rogue_key = _key()
    rogue = _cert("Rogue CA", rogue_key, None, rogue_key, ca=True)
    _write_pair(folder, "rogue-ca", rogue, rogue_key)
    k = _key()
    _write_pair(folder, "rogue-client", _cert(INGEST, k, rogue, rogue_key), k)
    return folder


# --- the broker -----------------------------------------------------------------------------
@dataclass
class SecureBroker:
    pki: Path
    pw_port: int  # TLS, username + password
    cert_port: int  # TLS, require_certificate, CN as username
    acl_file: Path
    passwd_file: Path
    log_file: Path
    process: subprocess.Popen[bytes]

    @property
    def ca(self) -> Path:
        return self.pki / "ca.crt"

    def pair(self, stem: str) -> tuple[Path, Path]:
        return self.pki / f"{stem}.crt", self.pki / f"{stem}.key"


CONF = """\
per_listener_settings false
allow_anonymous false
password_file {passwd}
acl_file {acl}
persistence false
log_dest file {log}
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
{user}
listener {pw_port} 127.0.0.1
cafile {pki}/ca.crt
certfile {pki}/server.crt
keyfile {pki}/server.key
require_certificate false

listener {cert_port} 127.0.0.1
cafile {pki}/ca.crt
certfile {pki}/server.crt
keyfile {pki}/server.key
require_certificate true
use_identity_as_username true
"""


def _wait_broker(proc: subprocess.Popen[bytes], ports: list[int], log_file: Path) -> None:
    for port in ports:
        try:
            wait_port("127.0.0.1", port, timeout=20.0)
        except TimeoutError:
            proc.kill()
            log = log_file.read_text() if log_file.exists() else "(no log)"
            raise RuntimeError(
                f"mosquitto did not listen on 127.0.0.1:{port} within 20 s "
                f"(exit status {proc.poll()}); its log:\n{log}"
            ) from None


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    work = tmp_path_factory.mktemp("secure-broker")
    pki = make_pki(work / "pki")
    pwdir = work / "passwords"
    pwdir.mkdir()
    for user, password in PASSWORDS.items():
        (pwdir / user).write_text(password + "\n")
    acl_file, passwd_file = work / "acl", work / "passwd"
    result = CliRunner().invoke(
        mqtt_app,
        [
            "acl",
            "--out",
            str(acl_file),
            "--registry",
            str(EXAMPLE_REGISTRY),
            "--root",
            ROOT,
            "--password-dir",
            str(pwdir),
            "--password-out",
            str(passwd_file),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "acl: 105 users, 107 topics" in result.output
    assert "passwords: 4 users" in result.output
    log_file = work / "mosquitto.log"
    ports = [free_port(), free_port()]
    conf = work / "mosquitto.conf"
    conf.write_text(
        CONF.format(
            passwd=passwd_file,
            acl=acl_file,
            log=log_file,
            # As root mosquitto drops to its own user, which cannot read a private temp dir.
            user="user root" if os.geteuid() == 0 else "",
            pw_port=ports[0],
            cert_port=ports[1],
            pki=pki,
        )
    )
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_broker(proc, ports, log_file)
    b = SecureBroker(pki, ports[0], ports[1], acl_file, passwd_file, log_file, proc)
    try:
        yield b
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- clients --------------------------------------------------------------------------------
@dataclass
class Attempt:
    """How one connection attempt ended: CONNACK reason, or the error before any CONNACK."""

    connected: bool
    reason: str | None = None
    error: str | None = None


def _client(
    broker: SecureBroker,
    *,
    user: str | None = None,
    password: str | None = None,
    cert: str | None = None,
    v5: bool = True,
) -> mqtt.Client:
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"t-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    certfile, keyfile = broker.pair(cert) if cert else (None, None)
    c.tls_set(ca_certs=str(broker.ca), certfile=certfile, keyfile=keyfile)
    if user is not None:
        c.username_pw_set(user, password)
    return c


def try_connect(broker: SecureBroker, port: int, **kw: object) -> Attempt:
    """Connect once and report how it ended (never raises; waits at most WAIT seconds)."""
    c = _client(broker, **kw)  # type: ignore[arg-type]
    done = threading.Event()
    outcome: dict[str, object] = {}

    def on_connect(client, userdata, flags, reason_code, properties):  # noqa: ANN001
        outcome["reason"] = str(reason_code)
        outcome["ok"] = not reason_code.is_failure
        done.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):  # noqa: ANN001
        if "reason" not in outcome:
            outcome["error"] = f"disconnected before CONNACK: {reason_code}"
        done.set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    try:
        c.connect("127.0.0.1", port)
    except (OSError, ssl.SSLError) as exc:
        return Attempt(False, error=f"{type(exc).__name__}: {exc}")
    c.loop_start()
    try:
        done.wait(WAIT)
    finally:
        c.disconnect()
        c.loop_stop()
    return Attempt(
        bool(outcome.get("ok")),
        reason=outcome.get("reason"),  # type: ignore[arg-type]
        error=outcome.get("error"),  # type: ignore[arg-type]
    )


def publish_as(broker: SecureBroker, user: str, messages: list[tuple[str, bytes]]) -> list[str]:
    """Publish QoS 1 as ``user`` (password listener, MQTT v5) and wait for every PUBACK; the
    PUBACK reasons (mosquitto answers "Not authorized" to a publish its ACL denies)."""
    c = _client(broker, user=user, password=PASSWORDS[user])
    reasons: dict[int, str] = {}

    def on_publish(client, userdata, mid, reason_code, properties):  # noqa: ANN001
        reasons[mid] = str(reason_code)

    c.on_publish = on_publish
    c.connect("127.0.0.1", broker.pw_port)
    c.loop_start()
    try:
        infos = [c.publish(t, p, qos=1) for t, p in messages]
        deadline = time.monotonic() + WAIT
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "broker did not acknowledge a publish in time"
        while len(reasons) < len(infos) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [reasons[i.mid] for i in infos]
    finally:
        c.disconnect()
        c.loop_stop()


class Listener:
    """A plain (not shared) subscriber, by default as the ingest user: what the broker delivers
    at all. mosquitto 2.0's acl_file grants any SUBSCRIBE and filters each delivery."""

    def __init__(self, broker: SecureBroker, topic_filter: str, user: str = INGEST) -> None:
        self.topics: list[str] = []
        self.client = _client(broker, user=user, password=PASSWORDS[user])
        subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: self.topics.append(m.topic)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", broker.pw_port)
        self.client.loop_start()
        self.client.subscribe(topic_filter, qos=1)
        assert subscribed.wait(WAIT), "the ingest user could not subscribe"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _ingest(db_url: str, url: str, **kw: object) -> tuple[IngestPipeline, MqttIngest]:
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    client = MqttIngest(
        url,
        pipeline,
        vendor_formats(load_registry(EXAMPLE_REGISTRY)),
        client_id=f"ingest-{uuid.uuid4().hex[:8]}",
        topic_root=ROOT,
        shared_group=f"g{uuid.uuid4().hex[:6]}",  # shared: exercises the $share ACL line
        **kw,  # type: ignore[arg-type]
    ).start(wait_s=WAIT)
    assert client.connected.wait(WAIT), "ingest did not connect and subscribe"
    return pipeline, client


def _uplink(dev: str, regs: list[float], vendor: str = "aqualink", topic_dev: str = "") -> tuple:
    body = {"dev": dev, "t0": T0, "step": 900, "reg": regs, "unit": "m3"}
    return uplink_topic(ROOT, vendor, topic_dev or dev), json.dumps(body).encode()


def _rows(db_url: str, sql: str) -> list[tuple]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


def _readings_of(db_url: str, dev: str) -> int:
    return _rows(
        db_url,
        "SELECT count(*) FROM readings r JOIN channels c ON c.id = r.channel_id "
        f"WHERE c.device_id = '{dev}'",
    )[0][0]


def _wait_counter(pipeline: IngestPipeline, reason: str, n: int) -> int:
    deadline = time.monotonic() + WAIT
    while pipeline.counters.quarantined[reason] < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return pipeline.counters.quarantined[reason]


def _wait_log(broker: SecureBroker, text: str) -> None:
    deadline = time.monotonic() + WAIT
    while text not in broker.log_file.read_text():
        assert time.monotonic() < deadline, f"mosquitto never logged {text!r}"
        time.sleep(0.1)


def _assert_no_secret(text: str) -> None:
    for secret in [*PASSWORDS.values(), WRONG_PASSWORD]:
        assert secret not in text, "a password reached a log line"


# --- tests ----------------------------------------------------------------------------------
def test_acl_file_and_password_hashes(tmp_path):
    plan = acl_plan(load_registry(EXAMPLE_REGISTRY), "r/v1", INGEST)
    assert plan.users["AQN00001"] == [("write", "r/v1/aqualink/AQN00001/up")]
    assert plan.users["GW-SOUTH-1"] == [("write", "r/v1/+/gw/GW-SOUTH-1/batch")]
    assert plan.users[INGEST] == [
        ("read", "r/v1/#"),
        ("read", "$share/+/r/v1/#"),
        ("write", "r/v1/_catchup/#"),  # each worker's catch-up fence
    ]
    assert len(plan.users) == 105  # 102 MQTT devices, 2 gateways, ingest
    # mosquitto_passwd's format: verify one of our hashes the way the broker does
    h = password_hash("pw", salt=b"0123456789ab", iterations=101)
    assert h.startswith("$7$101$MDEyMzQ1Njc4OWFi$")
    bad = tmp_path / "reg.toml"
    bad.write_text(
        EXAMPLE_REGISTRY.read_text() + '\n[[device]]\nid = "EVIL/#"\nvendor = "aqualink"\n'
    )
    r = CliRunner().invoke(mqtt_app, ["acl", "--out", str(tmp_path / "a"), "--registry", str(bad)])
    assert r.exit_code == 2 and "EVIL/#" in r.output and not (tmp_path / "a").exists()


def test_safe_url_and_settings_pass_through(monkeypatch, tmp_path):
    assert safe_url("mqtts://ingest:s3cr%40t@broker:8883") == "mqtts://ingest:***@broker:8883"
    assert safe_url("mqtt://u:p@[::1]:1883/x") == "mqtt://u:***@[::1]:1883/x"
    assert safe_url("mqtt://host:1883") == "mqtt://host:1883"
    sink = IngestPipeline.__new__(IngestPipeline)  # never started: only constructed against
    monkeypatch.setenv("AQUAMETER_MQTT_PASSWORD", "env-Secr3t")
    monkeypatch.setenv("AQUAMETER_MQTT_USERNAME", "ingest")
    monkeypatch.setenv("AQUAMETER_MQTT_TRUST_TOPIC", "false")
    s = Settings()
    assert "env-Secr3t" not in repr(s)
    c = mqtt_client(s, {}, sink, "mqtts://127.0.0.1", True)
    assert (c.port, c.tls, c.username, c.trust_topic) == (8883, True, "ingest", False)
    assert c._password == "env-Secr3t"
    pw = tmp_path / "pw"
    pw.write_text("file-Secr3t\n")
    c = MqttIngest("mqtt://u:url-pw@h", sink, {}, password_file=pw)
    assert (c.port, c.username, c._password) == (1883, "u", "file-Secr3t")
    with pytest.raises(ValueError, match="not mqtts"):
        MqttIngest("mqtt://u:url-pw@h", sink, {}, ca_file=tmp_path / "ca.crt")
    assert "url-pw" not in safe_url("mqtt://u:url-pw@h")


def test_topic_identity_on_frames():
    class Sink:
        frames: list = []

        def submit(self, frame, on_durable):  # noqa: ANN001
            self.frames.append(frame)

    msg = mqtt.MQTTMessage(topic=uplink_topic(ROOT, "aqualink", "AQN00001").encode())
    msg.payload = b"{}"
    gw = mqtt.MQTTMessage(topic=batch_topic(ROOT, "aqualink", "GW-NORTH-1").encode())
    gw.payload = b"{}"
    for trust, expect in (
        (True, [("AQN00001", "aqualink"), ("GW-NORTH-1", None)]),
        (False, [("AQN00001", None), (None, None)]),
    ):
        sink = Sink()
        sink.frames = []
        c = MqttIngest("mqtt://h", sink, {}, topic_root=ROOT, trust_topic=trust)
        c._on_message(c.client, None, msg)
        c._on_message(c.client, None, gw)
        assert [(f.peer, f.peer_vendor) for f in sink.frames] == expect


def test_refusals_no_credentials_wrong_password_untrusted_certificate(broker, caplog):
    none = try_connect(broker, broker.pw_port)
    assert not none.connected and none.reason in REFUSED, none
    wrong = try_connect(broker, broker.pw_port, user=INGEST, password=WRONG_PASSWORD)
    # mosquitto 2.0 answers a wrong password "Not authorized" (0x87), like no credentials
    assert not wrong.connected and wrong.reason in REFUSED, wrong
    # MQTT 3.1.1 too: CONNACK 5 (not authorised)
    old = try_connect(broker, broker.pw_port, user=INGEST, password=WRONG_PASSWORD, v5=False)
    assert not old.connected and old.reason is not None, old
    # a certificate from another CA, even with the right CN: the TLS handshake fails
    rogue = try_connect(broker, broker.cert_port, cert="rogue-client")
    assert not rogue.connected and rogue.reason is None and rogue.error, rogue
    # no certificate at all on the certificate listener
    bare = try_connect(broker, broker.cert_port)
    assert not bare.connected and bare.reason is None, bare
    # the broker saw TLS fail (TLS 1.3: the client's side of the handshake completes, the
    # broker's verification of its certificate fails, so no CONNACK ever comes)
    _wait_log(broker, "certificate verify failed")
    _wait_log(broker, "peer did not return a certificate")
    # a legitimate certificate connects (the listener works)
    good = try_connect(broker, broker.cert_port, cert=INGEST)
    assert good.connected, good

    # ingest itself with a wrong password: refused, counted, never "connected", nothing secret
    caplog.set_level(logging.DEBUG)
    sink = IngestPipeline.__new__(IngestPipeline)
    ingest = MqttIngest(
        f"mqtts://127.0.0.1:{broker.pw_port}",
        sink,
        {},
        topic_root=ROOT,
        username=INGEST,
        password=WRONG_PASSWORD,
        ca_file=broker.ca,
    ).start(wait_s=0.1)
    try:
        deadline = time.monotonic() + WAIT
        while ingest.stats.refused < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ingest.stats.refused >= 1 and not ingest.connected.is_set()
    finally:
        ingest.stop()
    # ingest with the rogue certificate: TLS fails before any CONNACK, the reason is logged
    rogue_cert, rogue_key = broker.pair("rogue-client")
    ingest = MqttIngest(
        f"mqtts://127.0.0.1:{broker.cert_port}",
        sink,
        {},
        topic_root=ROOT,
        ca_file=broker.ca,
        cert_file=rogue_cert,
        key_file=rogue_key,
        tls_version="1.2",
    ).start(wait_s=0.1)
    try:
        deadline = time.monotonic() + WAIT
        while ingest.stats.connect_failures + ingest.stats.disconnects < 1:
            assert time.monotonic() < deadline, "the rogue certificate was never turned away"
            time.sleep(0.05)
        assert not ingest.connected.is_set() and ingest.stats.connects == 0
    finally:
        ingest.stop()
    text = caplog.text
    assert f"127.0.0.1:{broker.pw_port} (TLS) as '{INGEST}' refused" in text
    _assert_no_secret(text)


def test_password_login_legit_stored_spoofs_refused_and_counted(broker, db_url, caplog):
    """Ingest over TLS with a password from a file; meters and a gateway publish as themselves."""
    caplog.set_level(logging.DEBUG)
    pwfile = broker.pki.parent / "ingest-password"
    pwfile.write_text(PASSWORDS[INGEST] + "\n")
    url = f"mqtts://127.0.0.1:{broker.pw_port}"
    pipeline, ingest = _ingest(
        db_url, url, username=INGEST, password_file=pwfile, ca_file=broker.ca, tls_version="1.2"
    )
    spy = Listener(broker, f"{ROOT}/#")
    nosy = Listener(broker, f"{ROOT}/#", user="AQN00002")  # a meter reading the others: nothing
    try:
        # legitimate: a meter on its own topic, a gateway batch of its own meters
        assert publish_as(broker, "AQN00001", [_uplink("AQN00001", [1.0, 1.1])]) == ["Success"]
        own = [{"dev": f"AQN{i:05d}", "t0": T0, "step": 900, "reg": [2.0 + i]} for i in (3, 4)]
        foreign = {"dev": "KMS00001", "t0": T0, "step": 900, "reg": [9.0]}  # of GW-SOUTH-1
        batch = {"gw": "GW-NORTH-1", "readings": [*own, foreign]}
        gw_topic = batch_topic(ROOT, "aqualink", "GW-NORTH-1")
        assert publish_as(broker, "GW-NORTH-1", [(gw_topic, json.dumps(batch).encode())]) == [
            "Success"
        ]
        # outside its ACL: AQN00001 publishes on AQN00002's topic -> the broker drops it
        stolen = _uplink("AQN00002", [5.0], topic_dev="AQN00002")
        assert publish_as(broker, "AQN00001", [stolen]) == ["Not authorized"]
        # ... and a gateway on another gateway's batch topic
        south = batch_topic(ROOT, "kamstrup-nb", "GW-SOUTH-1")
        assert publish_as(broker, "GW-NORTH-1", [(south, json.dumps(batch).encode())]) == [
            "Not authorized"
        ]
        # its own topic, another meter's payload -> UNAUTHORIZED (claimed AQN00002, proven AQN00001)
        spoof = _uplink("AQN00002", [7.0], topic_dev="AQN00001")
        assert publish_as(broker, "AQN00001", [spoof]) == ["Success"]

        assert wait_count(db_url, "SELECT count(*) FROM readings", 4, WAIT) == 4
        assert _wait_counter(pipeline, "UNAUTHORIZED", 2) == 2
        assert _readings_of(db_url, "AQN00001") == 2
        assert _readings_of(db_url, "AQN00003") == _readings_of(db_url, "AQN00004") == 1
        assert _readings_of(db_url, "AQN00002") == 0 and _readings_of(db_url, "KMS00001") == 0
        rows = _rows(
            db_url,
            "SELECT device_id, detail FROM quarantine WHERE reason = 'UNAUTHORIZED' "
            "ORDER BY device_id",
        )
        assert [r[0] for r in rows] == ["AQN00002", "KMS00001"]
        assert "'AQN00001' (proven)" in rows[0][1] and "'AQN00002' (claimed)" in rows[0][1]
        assert "'GW-NORTH-1' (proven)" in rows[1][1] and "'KMS00001' (claimed)" in rows[1][1]
        assert _rows(db_url, "SELECT count(*) FROM quarantine")[0][0] == 2
        # nothing the ACL denied was delivered to anyone
        time.sleep(0.5)
        assert uplink_topic(ROOT, "aqualink", "AQN00002") not in spy.topics
        assert south not in spy.topics
        # Ingest's own catch-up fences (protocols/mqtt.py) are not device traffic.
        device_topics = {t for t in spy.topics if "/_catchup/" not in t}
        assert sorted(device_topics) == sorted(
            {uplink_topic(ROOT, "aqualink", "AQN00001"), gw_topic}
        )
        assert ingest.stats.messages == 3
        assert nosy.topics == []
    finally:
        nosy.close()
        spy.close()
        ingest.stop()
        pipeline.close()
    text = caplog.text
    assert f"MQTT connected to 127.0.0.1:{broker.pw_port} (TLS) as '{INGEST}'" in text
    _assert_no_secret(text)
    _assert_no_secret(broker.log_file.read_text())


def test_client_certificate_login(broker, db_url, caplog):
    """Ingest with a client certificate only (CN = user, via use_identity_as_username)."""
    caplog.set_level(logging.DEBUG)
    cert, key = broker.pair(INGEST)
    s = Settings(
        mqtt_topic_root=ROOT,
        mqtt_shared_group=f"g{uuid.uuid4().hex[:6]}",
        mqtt_client_id=f"ingest-{uuid.uuid4().hex[:8]}",
        mqtt_ca_file=broker.ca,
        mqtt_cert_file=cert,
        mqtt_key_file=key,
        mqtt_tls_version="1.3",
    )
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    fmts = vendor_formats(load_registry(EXAMPLE_REGISTRY))
    url = f"mqtts://127.0.0.1:{broker.cert_port}"
    ingest = mqtt_client(s, fmts, pipeline, url, True).start(wait_s=WAIT)
    try:
        assert ingest.connected.wait(WAIT), "ingest did not connect with its certificate"
        assert ingest.username is None
        msgs = [_uplink("AQN00002", [3.0, 3.1, 3.2])]
        assert publish_as(broker, "AQN00002", msgs) == ["Success"]
        assert wait_count(db_url, "SELECT count(*) FROM readings", 3, WAIT) == 3
    finally:
        ingest.stop()
        pipeline.close()
    _assert_no_secret(caplog.text)

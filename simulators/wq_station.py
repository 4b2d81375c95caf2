"""A water-quality station as an OPC-UA server (asyncua), with faults to find.

It stands in for the analyser panel of a treatment-plant outlet or a network monitoring station:
pH, turbidity, free chlorine, conductivity, dissolved oxygen and temperature, each with a diurnal
cycle and autocorrelated noise, optionally a pump station's running state, flow, discharge
pressure and power, and ``extra_variables`` fast random walks for throughput benchmarks.

Faults are what the analytics must catch, so each is injected on purpose and written to the
ground-truth manifest: ``excursion`` (value held near ``level``, e.g. turbidity 2.5 NTU above the
GB 5749 limit of 1 NTU), ``flatline`` (value frozen, timestamps advancing: a stuck probe),
``drift`` (slow linear drift of ``rate_per_h``: a probe out of calibration), ``bad``
(StatusCode BadSensorFailure; asyncua's server then publishes a null value, as OPC 10000-4
§7.7.1 asks, and the manifest records None) and ``uncertain`` (UncertainSensorNotAccurate, value
kept).

Every sample is written with its SourceTimestamp (the scan time, whole milliseconds), so the
manifest's history is exactly what a subscriber should store. The server listens on 127.0.0.1
only, optionally with Basic256Sha256 endpoints (a self-signed certificate made at first start and
reused after) and username/password authentication.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any, Literal

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen, uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger("aquameter.simulators.wq_station")

FaultKind = Literal["excursion", "flatline", "drift", "bad", "uncertain"]
SecurityName = Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]

_SECURITY: dict[str, ua.SecurityPolicyType] = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}
_FAULT_STATUS = {
    "bad": ua.StatusCodes.BadSensorFailure,
    "uncertain": ua.StatusCodes.UncertainSensorNotAccurate,
}


@dataclass(frozen=True)
class VariableSpec:
    """One measured variable: ``base`` ± ``amp`` over the day (peak at ``peak_hour`` UTC) plus AR(1)
    noise of standard deviation ``noise``, rounded like the instrument displays it."""

    name: str
    quantity: str
    unit: str
    base: float
    amp: float
    peak_hour: float
    noise: float
    decimals: int
    lo: float
    hi: float


WQ_VARIABLES: tuple[VariableSpec, ...] = (
    VariableSpec("pH", "ph", "pH", 7.45, 0.05, 15.0, 0.01, 2, 0.0, 14.0),
    VariableSpec("Turbidity", "turbidity", "NTU", 0.22, 0.06, 8.0, 0.015, 3, 0.0, 4000.0),
    VariableSpec("FreeChlorine", "chlorine", "mg/L", 0.85, -0.10, 15.0, 0.01, 2, 0.0, 20.0),
    VariableSpec("Conductivity", "conductivity", "uS/cm", 460.0, 8.0, 14.0, 1.5, 1, 0.0, 1e5),
    # DissolvedOxygen's base/amp are unused: it follows saturation at the water temperature.
    VariableSpec("DissolvedOxygen", "dissolved_oxygen", "mg/L", 9.5, 0.0, 0.0, 0.05, 2, 0, 25),
    VariableSpec("Temperature", "temperature", "degC", 14.0, 1.2, 15.0, 0.03, 2, -5.0, 40.0),
)
PUMP_VARIABLES: tuple[VariableSpec, ...] = (
    VariableSpec("Pump1.Running", "state", "state", 1.0, 0.0, 0.0, 0.0, 0, 0.0, 1.0),
    VariableSpec("Pump1.Flow", "flow", "m3/h", 180.0, 0.0, 0.0, 1.5, 1, 0.0, 1000.0),
    VariableSpec("Pump1.DischargePressure", "pressure", "bar", 4.5, 0.0, 0.0, 0.02, 2, 0.0, 16),
    VariableSpec("Pump1.Power", "power", "kW", 55.0, 0.0, 0.0, 0.5, 1, 0.0, 500.0),
)


def bench_variable(i: int) -> VariableSpec:
    return VariableSpec(f"Bench.V{i:04d}", "level", "m", 5.0, 0.0, 0.0, 0.05, 3, 0.0, 10.0)


def do_saturation(temp_c: float) -> float:
    """Dissolved-oxygen saturation in fresh water at 1 atm (mg/L), Benson & Krause fit."""
    t = temp_c
    return 14.652 - 0.41022 * t + 0.007991 * t * t - 0.000077774 * t * t * t


@dataclass(frozen=True)
class Fault:
    """An injected fault on ``variable`` from ``start_s`` to ``start_s + duration_s`` after the
    station first started."""

    kind: FaultKind
    variable: str
    start_s: float
    duration_s: float
    level: float = 0.0
    rate_per_h: float = 0.0

    def active(self, elapsed: float) -> bool:
        return self.start_s <= elapsed < self.start_s + self.duration_s


def parse_fault(spec: str) -> Fault:
    """``kind:Variable:key=value:…``, e.g. ``excursion:Turbidity:start=60:duration=300:level=2.5``
    or ``drift:FreeChlorine:start=0:duration=3600:rate=-0.2`` (units per hour)."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] not in ("excursion", "flatline", "drift", "bad", "uncertain"):
        raise ValueError(f"bad fault spec {spec!r}")
    kv: dict[str, float] = {}
    for part in parts[2:]:
        key, _, value = part.partition("=")
        kv[key] = float(value)
    return Fault(
        kind=parts[0],  # type: ignore[arg-type]
        variable=parts[1],
        start_s=kv.get("start", 0.0),
        duration_s=kv.get("duration", 3600.0),
        level=kv.get("level", 0.0),
        rate_per_h=kv.get("rate", 0.0),
    )


@dataclass
class StationModel:
    """The station's physics and faults, without any server: ``sample(t)`` gives every variable's
    value and StatusCode at epoch ``t``. Deterministic for a seed and a sequence of times."""

    variables: tuple[VariableSpec, ...]
    faults: tuple[Fault, ...] = ()
    seed: int = 0
    t0: float | None = None
    _rng: random.Random = field(init=False, repr=False)
    _noise: dict[str, float] = field(init=False, repr=False)
    _frozen: dict[tuple[str, int], float] = field(init=False, repr=False)
    _last: dict[str, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._noise = {v.name: 0.0 for v in self.variables}
        self._frozen = {}
        self._last = {}
        names = {v.name for v in self.variables}
        for f in self.faults:
            if f.variable not in names:
                raise ValueError(f"fault on unknown variable {f.variable!r}")

    def _ar(self, spec: VariableSpec, phi: float = 0.9) -> float:
        # AR(1): autocorrelated like a real probe signal, stationary sd = spec.noise
        e = self._rng.gauss(0.0, spec.noise * math.sqrt(1 - phi * phi))
        self._noise[spec.name] = phi * self._noise[spec.name] + e
        return self._noise[spec.name]

    def _clean(self, spec: VariableSpec, t: float, temp: float) -> float:
        hour = (t % 86400.0) / 3600.0
        diurnal = spec.amp * math.cos(2 * math.pi * (hour - spec.peak_hour) / 24.0)
        if spec.name == "DissolvedOxygen":
            return 0.92 * do_saturation(temp) + self._ar(spec)
        if spec.name.startswith("Pump1."):
            running = 5.0 <= hour < 23.0  # a booster that rests at night when demand is low
            if spec.name == "Pump1.Running":
                return 1.0 if running else 0.0
            if not running:
                return {"Pump1.Flow": 0.0, "Pump1.DischargePressure": 2.8, "Pump1.Power": 0.3}[
                    spec.name
                ]
            return spec.base + self._ar(spec)
        if spec.name.startswith("Bench."):
            prev = self._last.get(spec.name, spec.base)
            return min(spec.hi, max(spec.lo, prev + self._rng.gauss(0.0, spec.noise)))
        return spec.base + diurnal + self._ar(spec)

    def sample(self, t: float) -> dict[str, tuple[float, int]]:
        if self.t0 is None:
            self.t0 = t
        elapsed = t - self.t0
        out: dict[str, tuple[float, int]] = {}
        temp = self._last.get("Temperature", 14.0)
        for spec in self.variables:
            value = self._clean(spec, t, temp)
            status = ua.StatusCodes.Good
            for i, f in enumerate(self.faults):
                if f.variable != spec.name or not f.active(elapsed):
                    continue
                if f.kind == "excursion":
                    value = f.level + self._noise.get(spec.name, 0.0)
                elif f.kind == "drift":
                    value += f.rate_per_h * (elapsed - f.start_s) / 3600.0
                elif f.kind == "flatline":
                    value = self._frozen.setdefault(
                        (spec.name, i), self._last.get(spec.name, value)
                    )
                else:
                    status = _FAULT_STATUS[f.kind]
            value = round(min(spec.hi, max(spec.lo, value)), spec.decimals)
            self._last[spec.name] = value
            if spec.name == "Temperature":
                temp = value
            out[spec.name] = (value, status)
        return out


@dataclass
class WqStationConfig:
    host: str = "127.0.0.1"
    port: int = 4840
    station: str = "WQ1"
    tick_s: float = 1.0
    # How long before the server write the analyser measured: the SourceTimestamp is this much
    # earlier than the ServerTimestamp, as behind a PLC that polls its analysers.
    source_lag_s: float = 0.0
    seed: int = 0
    pump: bool = True
    extra_variables: int = 0
    faults: tuple[Fault, ...] = ()
    security: tuple[SecurityName, ...] = ("None",)
    cert_dir: Path | None = None
    users: dict[str, str] = field(default_factory=dict)
    trusted_client_certificates: tuple[Path, ...] = ()
    record_history: bool = True

    @property
    def namespace_uri(self) -> str:
        return f"urn:aquameter:wq:{self.station}"

    @property
    def application_uri(self) -> str:
        # Distinct from the namespace: asyncua gives the application URI namespace index 1, so
        # the station's own variables land in ns=2 as field servers usually have them.
        return f"urn:aquameter:simulator:wq-station:{self.station}"

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/aquameter/wq/"


class _PasswordUsers(UserManager):
    """Username/password sessions only: anonymous and unknown users get no user (refused)."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


class WqStation:
    """The running server. ``start``/``stop`` may be repeated (a restart keeps the model, the
    certificate and the manifest), which is how tests restart "the station" under a subscriber."""

    def __init__(self, config: WqStationConfig) -> None:
        self.config = config
        variables = WQ_VARIABLES + (PUMP_VARIABLES if config.pump else ())
        variables += tuple(bench_variable(i) for i in range(config.extra_variables))
        self.variables = variables
        self.model = StationModel(variables, config.faults, seed=config.seed)
        self.server: Server | None = None
        self.namespace_index = 0
        self.node_ids: dict[str, ua.NodeId] = {}
        self.server_certificate: Path | None = None
        self._task: asyncio.Task[None] | None = None
        self._history: dict[str, list[tuple[float, float | None, str]]] = {}
        self._samples: dict[str, int] = {v.name: 0 for v in variables}
        self._starts: list[float] = []
        self._stops: list[float] = []
        self._trusted: set[bytes] = set()

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> WqStation:
        cfg = self.config
        server = Server(user_manager=_PasswordUsers(cfg.users) if cfg.users else None)
        await server.init()
        server.set_endpoint(cfg.endpoint)
        server.set_server_name(f"Aquameter water-quality station {cfg.station}")
        await server.set_application_uri(cfg.application_uri)
        server.set_security_policy([_SECURITY[s] for s in cfg.security])
        if cfg.users:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        if any(s != "None" for s in cfg.security):
            await self._load_certificate(server)
        if cfg.trusted_client_certificates:
            for path in cfg.trusted_client_certificates:
                cert = await uacrypto.load_certificate(path)
                self._trusted.add(uacrypto.der_from_x509(cert))
            server.set_certificate_validator(self._validate_client)
        idx = await server.register_namespace(cfg.namespace_uri)
        self.namespace_index = idx
        station = await server.nodes.objects.add_object(
            ua.NodeId(ua.String(cfg.station), ua.Int16(idx)), ua.QualifiedName(cfg.station, idx)
        )
        for spec in self.variables:
            nid = ua.NodeId(ua.String(f"{cfg.station}.{spec.name}"), ua.Int16(idx))
            await station.add_variable(
                nid, ua.QualifiedName(spec.name, idx), spec.base, varianttype=ua.VariantType.Double
            )
            self.node_ids[spec.name] = nid
        await server.start()
        self.server = server
        self._starts.append(time.time())
        self._task = asyncio.create_task(self._scan_loop())
        log.info("station %s listening on %s", cfg.station, cfg.endpoint)
        return self

    async def pause(self) -> None:
        """Stop scanning but keep serving: values freeze where they are (a PLC that stopped
        updating), and a subscriber can be drained knowing nothing more is coming."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def stop(self) -> None:
        await self.pause()
        if self.server is not None:
            await self.server.stop()
            self.server = None
            self._stops.append(time.time())

    async def restart(self, down_s: float = 1.0) -> None:
        await self.stop()
        await asyncio.sleep(down_s)
        await self.start()

    async def __aenter__(self) -> WqStation:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- security --------------------------------------------------------------------------
    async def _load_certificate(self, server: Server) -> None:
        cert_dir = self.config.cert_dir
        if cert_dir is None:
            raise ValueError("secure endpoints need cert_dir for the server certificate")
        cert_dir.mkdir(parents=True, exist_ok=True)
        key_file, cert_file = cert_dir / "server_key.pem", cert_dir / "server_cert.der"
        # Made once and reused while valid, so clients that pinned it keep trusting a restart.
        await cert_gen.setup_self_signed_certificate(
            key_file,
            cert_file,
            self.config.application_uri,
            socket.gethostname(),
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            {"organizationName": "Aquameter simulator"},
        )
        await server.load_certificate(str(cert_file))
        await server.load_private_key(str(key_file))
        self.server_certificate = cert_file

    async def _validate_client(
        self, certificate: x509.Certificate, app: ua.ApplicationDescription
    ) -> None:
        if uacrypto.der_from_x509(certificate) not in self._trusted:
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    # --- scanning --------------------------------------------------------------------------
    async def _scan_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self._scan_once()
            next_at += self.config.tick_s
            delay = next_at - loop.time()
            if delay < 0:  # overloaded: skip the missed scans rather than bursting
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    async def _scan_once(self) -> None:
        server = self.server
        assert server is not None
        ts_ms = int((time.time() - self.config.source_lag_s) * 1000)
        t = ts_ms / 1000.0
        source_ts = ua.DateTime.fromtimestamp(t, UTC)
        for name, (value, status) in self.model.sample(t).items():
            code = ua.StatusCode(ua.UInt32(status))
            dv = ua.DataValue(
                ua.Variant(value, ua.VariantType.Double),
                StatusCode=code,
                SourceTimestamp=source_ts,
                ServerTimestamp=ua.DateTime.now(UTC),
            )
            await server.write_attribute_value(self.node_ids[name], dv)
            self._samples[name] += 1
            if self.config.record_history:
                published = None if code.is_bad() else value  # the server nulls Bad values
                self._history.setdefault(name, []).append((t, published, code.name))

    # --- ground truth ----------------------------------------------------------------------
    def node_id(self, name: str) -> str:
        return (
            self.node_ids[name].to_string()
            if name in self.node_ids
            else (f"ns={self.namespace_index};s={self.config.station}.{name}")
        )

    def manifest(self) -> dict[str, Any]:
        cfg = self.config
        t0 = self.model.t0
        return {
            "simulator": "wq_station",
            "station": cfg.station,
            "endpoint": cfg.endpoint,
            "namespace_uri": cfg.namespace_uri,
            "namespace_index": self.namespace_index,
            "security": list(cfg.security),
            "users": sorted(cfg.users),
            "server_certificate": str(self.server_certificate) if self.server_certificate else None,
            "tick_s": cfg.tick_s,
            "source_lag_s": cfg.source_lag_s,
            "seed": cfg.seed,
            "started_at": list(self._starts),
            "stopped_at": list(self._stops),
            "variables": {
                v.name: {
                    "node_id": self.node_id(v.name),
                    "quantity": v.quantity,
                    "unit": v.unit,
                    "samples": self._samples[v.name],
                }
                for v in self.variables
            },
            "faults": [
                {
                    "kind": f.kind,
                    "variable": f.variable,
                    "node_id": self.node_id(f.variable),
                    "start": None if t0 is None else t0 + f.start_s,
                    "end": None if t0 is None else t0 + f.start_s + f.duration_s,
                    "level": f.level,
                    "rate_per_h": f.rate_per_h,
                }
                for f in cfg.faults
            ],
            "history": {name: [list(s) for s in rows] for name, rows in self._history.items()},
        }


async def run_station(
    config: WqStationConfig, duration_s: float | None = None, manifest_path: Path | None = None
) -> dict[str, Any]:
    """Serve for ``duration_s`` (None: until cancelled), then write the manifest."""
    station = WqStation(config)
    await station.start()
    try:
        if duration_s is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(duration_s)
    finally:
        await station.stop()
        manifest = station.manifest()
        if manifest_path is not None:
            manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def main(
    host: str = "127.0.0.1",
    port: int = 4840,
    station: str = "WQ1",
    tick_s: float = 1.0,
    seed: int = 0,
    duration_s: float | None = None,
    faults: Sequence[str] = (),
    pump: bool = True,
    extra_variables: int = 0,
    username: str | None = None,
    password: str | None = None,
    secure: bool = False,
    cert_dir: Path | None = None,
    manifest_path: Path | None = None,
    record_history: bool = False,
) -> dict[str, Any]:
    """Entry point for ``aquameter simulate wq-station``: blocks while the station serves."""
    security: tuple[SecurityName, ...] = ("None",)
    if secure:
        security = ("None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt")
    config = WqStationConfig(
        host=host,
        port=port,
        station=station,
        tick_s=tick_s,
        seed=seed,
        pump=pump,
        extra_variables=extra_variables,
        faults=tuple(parse_fault(f) for f in faults),
        security=security,
        cert_dir=cert_dir or (Path.cwd() / f".wq-station-{station}-pki" if secure else None),
        users={username: password or ""} if username else {},
        record_history=record_history,
    )
    return asyncio.run(run_station(config, duration_s, manifest_path))

"""One typed settings object for every Aquameter process.

Everything a utility may tune is a field here (env prefix ``AQUAMETER_``) so that thresholds never
hide as literals in code, and so that several ingest workers on several machines are configured the
same way from their environment.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("aquameter"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AQUAMETER_", env_file=None, extra="ignore")

    # --- where things are -------------------------------------------------------------------
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL/TimescaleDB URL; unset starts an embedded PostgreSQL in data_dir.",
    )
    # One login per service, each in one of the roles `db migrate` makes (README "Database
    # roles"); unset, a service uses ``database_url`` (the owner: fine for a demo, not for a
    # utility). The owner's URL stays for `db migrate` and `devices sync`.
    database_url_ingest: str | None = None
    database_url_analytics: str | None = None
    database_url_billing: str | None = None
    mqtt_url: str | None = Field(
        default=None,
        description="mqtt://host:port; unset starts mosquitto from PATH or embedded amqtt.",
    )
    registry: Path = Field(default=Path("examples/registry.toml"))
    data_dir: Path = Field(default_factory=_default_data_dir)

    # --- schema ---------------------------------------------------------------------------
    timescale: Literal["auto", "on", "off"] = "auto"
    partition_interval_days: int = 7
    partitions_ahead: int = 4
    compress_after_days: int = 7
    retention_days: int = 3650

    # --- MQTT -----------------------------------------------------------------------------
    mqtt_topic_root: str = "aquameter/v1"
    mqtt_shared_group: str | None = "aquameter"
    mqtt_client_id: str = "aquameter-ingest"
    mqtt_session_expiry_s: int = 3600
    mqtt_qos: int = 1
    # In-flight QoS 1 messages the broker may send before our acks (MQTT v5 Receive Maximum).
    mqtt_receive_maximum: int = 20_000
    mqtt_reconnect_min_s: float = 0.5
    mqtt_reconnect_max_s: float = 30.0
    # MQTT ingest worker processes on the shared subscription (> 1 needs MQTT v5 and a group):
    # one Python process tops out near 10k messages/s at one reading per message.
    mqtt_workers: int = Field(default=1, ge=1)
    # The topic as proof of identity: a meter's readings only on its own
    # {root}/{vendor}/{device}/up, with its registered vendor; a concentrator's batch only for the
    # meters registered under it. Proof needs the broker's ACL (`aquameter mqtt acl`) to limit
    # each client to its own prefix. Off (a broker without such an ACL, where the topic proves
    # nothing) skips the vendor and gateway checks; a payload naming another device than its
    # single-device topic is refused (UNAUTHORIZED) either way.
    mqtt_trust_topic: bool = True
    # Broker security. TLS needs an mqtts:// URL (port 8883 unless given); the CA verifies the
    # broker (system CAs when unset), cert+key are this client's certificate (for brokers with
    # require_certificate), the TLS version is a minimum ("1.2" or "1.3").
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    mqtt_tls_version: Literal["1.2", "1.3"] | None = None
    # Login apart from the URL, so the URL can be shown: the password from AQUAMETER_MQTT_PASSWORD
    # or, preferred, a file only this service reads (first line); either overrides the URL's.
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_password_file: Path | None = None

    # --- CoAP (NB-IoT uplinks; DTLS-PSK on port + 1 when devices have keys) ----------------
    coap_host: str = "127.0.0.1"
    coap_port: int = 5683
    coap_path: str = "up"

    # --- ingest ---------------------------------------------------------------------------
    batch_rows: int = 20_000
    batch_seconds: float = 0.25  # a batch's maximum age
    batch_linger_s: float = 0.01  # commit once no frame arrived for this long (group commit)
    stream_rows: int = 5_000  # rows sent to the open COPY at a time
    queue_frames: int = 5_000
    future_tolerance_s: float = 300.0
    earliest_timestamp: datetime = datetime(2000, 1, 1, tzinfo=UTC)
    stats_interval_s: float = 10.0
    # Bytes held by frames submitted and not yet acknowledged; past it transports block (MQTT
    # stops reading, CoAP answers 5.03): memory stays bounded through a database outage.
    queue_bytes: int = Field(default=64 * 1_048_576, ge=1_048_576)

    # --- limits on one frame (each has its own quarantine reason) -------------------------
    max_payload_bytes: int = Field(default=1_048_576, ge=256)  # OVERSIZE; first 4 KiB kept
    max_readings_per_frame: int = Field(default=100_000, ge=1)  # TOO_MANY_READINGS
    max_payload_depth: int = Field(default=32, ge=2)  # TOO_DEEP (JSON/CBOR nesting)
    # Quarantine rows one frame may make; the rest fold into one summary row per reason.
    max_quarantine_rows_per_frame: int = Field(default=100, ge=1)

    # --- time ---------------------------------------------------------------------------
    # Live readings further behind their receive time than this get the CLOCK_SKEW quality bit
    # ("flag") or are quarantined as CLOCK_SKEW ("quarantine"). Imports are exempt.
    clock_skew_s: float = 7 * 86_400.0
    clock_skew_action: Literal["flag", "quarantine"] = "flag"
    # Live readings older than this are quarantined OUTSIDE_WINDOW: no partition is ever made
    # for a device's wild clock. History older than that comes in through `aquameter import`.
    live_window_days: float = Field(default=400.0, gt=0)

    # --- flows ------------------------------------------------------------------------------
    # How long a command waits for the local Prefect API it starts (a loaded machine is slow).
    prefect_api_start_timeout_s: float = Field(default=120.0, gt=0)

    # --- registry ---------------------------------------------------------------------------
    # How often running ingest checks the registry version (besides LISTEN/NOTIFY); 0 = never.
    registry_poll_s: float = Field(default=2.0, ge=0)

    # --- operations ---------------------------------------------------------------------------
    # `aquameter ingest` serves /metrics, /healthz and /readyz here (ingest.metrics); port None
    # = off, 0 = a free port (printed). Loopback by default: the endpoints are unauthenticated.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    # Log lines as text, or as JSON objects one per line (ts, level, logger, message, exception)
    # for a log shipper (aquameter.logs).
    log_format: Literal["text", "json"] = "text"

    def data_path(self, *parts: str) -> Path:
        path = self.data_dir.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


def get_settings() -> Settings:
    return Settings()

"""Load the declarative registry into the database (``aquameter devices sync``).

Upserts are keyed on the registry's own ids, so a sync is idempotent and a re-sync after editing the
file updates in place. Devices that disappeared from the file are marked inactive, not deleted:
their readings stay valid history.

Every sync bumps ``registry_version`` and sends ``NOTIFY aquameter_registry, '<version>'`` in the
same transaction, so running ingest workers (``ingest.registry_watch``) reload exactly when the
new registry is committed, never before, and a rolled-back sync notifies nobody.

Secrets never reach the database: ``devices.params`` holds where a device's key or password
lives (``psk_env``/``psk_file``/``password_env``/``password_file``), never the value, because the
table is readable by roles (analytics, billing) and copied by backups that must not hold keys.
A ``psk``/``password`` key inside a device's free-form ``params`` is dropped with a warning that
names the device and the key (migration 0007 scrubs what older syncs stored).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from aquameter.registry import Device, Registry
from ingest.units import CANONICAL, DEFAULT_RANGES

log = logging.getLogger("aquameter.registry_sync")

# Keys of ``devices.params`` that would hold a secret's value: never stored.
SECRET_PARAM_KEYS = ("psk", "password")


@dataclass
class SyncResult:
    dmas: int
    vendors: int
    devices: int
    meters: int
    sensors: int
    channels: int
    deactivated: int
    version: int | None = None  # registry_version after this sync; None before migration 0005
    # Marks made stale because what a flow judges them by changed (meter class or its
    # parameters; a DMA's holidays): {"meter_anomalies": meters, "dma_night_flow": DMAs}.
    invalidated: dict[str, int] | None = None


REGISTRY_CHANNEL = "aquameter_registry"


def bump_registry_version(conn: psycopg.Connection) -> int | None:
    """Increment ``registry_version`` and queue the notify, inside the caller's transaction.

    PostgreSQL delivers a NOTIFY only when the transaction commits, so listeners never reload a
    half-written registry. The row lock of the UPDATE orders concurrent syncs: each gets its own
    version. Returns None on a database not yet migrated to 0005 (no table), where there is no
    one to tell either.
    """
    exists = conn.execute("SELECT to_regclass('registry_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(
        "UPDATE registry_version SET version = version + 1, synced_at = now() RETURNING version"
    ).fetchone()
    if row is None:  # the seed row was deleted by hand: start again
        row = conn.execute(
            "INSERT INTO registry_version (version, synced_at) VALUES (1, now()) RETURNING version"
        ).fetchone()
    assert row is not None
    version = int(row[0])
    conn.execute("SELECT pg_notify(%s, %s)", (REGISTRY_CHANNEL, str(version)))
    return version


def device_params(dev: Device) -> dict[str, Any]:
    """What ``devices.params`` stores for ``dev``: its params, the *references* to its secrets
    and ``allow_plain_coap``, without any secret value."""
    params = dict(dev.params)
    for key in SECRET_PARAM_KEYS:
        if key in params:
            del params[key]
            log.warning(
                "device %s: params.%s not stored (secrets never go to the database); "
                "use %s_env or %s_file",
                dev.id,
                key,
                key,
                key,
            )
    params.update(dev.secret_refs())
    if dev.allow_plain_coap:
        params["allow_plain_coap"] = True
    return params


# What a meter's alerts and a DMA's leak events are judged by, beyond their readings: the meter's
# class with that class's registry settings, and its DMA's effective holidays (estimation profiles
# a holiday as a Sunday, the night-floor rule leaves holiday nights out); the DMA's effective
# holidays. One row per subject.
_DMA_JUDGED_BY = """
    SELECT d.id, array_to_string(ARRAY(
        SELECT DISTINCT h FROM unnest(d.holidays || coalesce(c.holidays, '{}')) h ORDER BY h), ',')
    FROM dmas d LEFT JOIN holiday_calendars c ON c.id = coalesce(d.calendar, 'default')"""
_METER_JUDGED_BY = f"""
    SELECT m.id, m.meter_class || ':' || coalesce(c.anomaly::text, '') || ':'
                 || coalesce(c.hold_codes::text, '') || ':' || coalesce(h.days, '')
    FROM meters m LEFT JOIN meter_classes c ON c.id = m.meter_class
    LEFT JOIN ({_DMA_JUDGED_BY}) h (dma_id, days) ON h.dma_id = m.dma_id"""


def _analysis_inputs(cur: psycopg.Cursor[Any]) -> dict[str, dict[str, str]]:
    """Per flow, per subject, what its analysis is judged by besides its readings."""
    return {
        "meter_anomalies": dict(cur.execute(_METER_JUDGED_BY).fetchall()),
        "dma_night_flow": dict(cur.execute(_DMA_JUDGED_BY).fetchall()),
    }


def _invalidate_changed(
    cur: psycopg.Cursor[Any],
    before: dict[str, dict[str, str]],
    after: dict[str, dict[str, str]],
) -> dict[str, int]:
    """Make the next incremental run recompute the subjects whose judging inputs this sync
    changed, in the same transaction as the change.

    Why here: the flows' fingerprints cover readings, edits and the run's settings, not a
    meter's class or a DMA's holidays, so without this a class change took effect only at the
    next ``--full``. The marks are kept (their days stay within the late horizon of the next
    plan) but their inputs no longer match: a meter's every marked day is recomputed, so its
    alerts (and then its bill's hold, whose fingerprint includes its alerts and class) follow
    the new class; for a DMA its latest marked day is enough, since its leak events are
    recomputed from its whole stored night series whenever any of its days is. A class changed
    by hand in SQL, outside a sync, is caught by the trigger of migration 0013, which marks that
    meter's days the same way."""
    counts: dict[str, int] = {}
    for flow, now in after.items():
        changed = [s for s, v in now.items() if s in before[flow] and before[flow][s] != v]
        counts[flow] = len(changed)
        if not changed:
            continue
        if flow == "dma_night_flow":
            cur.execute(
                """UPDATE analysis_marks m SET inputs = m.inputs || '|judged-by-changed'
                   WHERE m.flow = %s AND m.subject_id = ANY(%s)
                     AND m.day = (SELECT max(day) FROM analysis_marks x
                                  WHERE x.flow = m.flow AND x.subject_id = m.subject_id)""",
                (flow, changed),
            )
        else:
            cur.execute(
                "UPDATE analysis_marks SET inputs = inputs || '|judged-by-changed' "
                "WHERE flow = %s AND subject_id = ANY(%s)",
                (flow, changed),
            )
    return counts


def sync_registry(conn: psycopg.Connection, registry: Registry) -> SyncResult:
    """Upsert ``registry`` and deactivate devices no longer in it, in one transaction that also
    bumps the registry version (see :func:`bump_registry_version`)."""
    devices = registry.all_devices()
    serials = [d.serial for d in devices if d.serial is not None]
    if len(serials) != len(set(serials)):
        raise ValueError("device serials must be unique across the registry")
    dma_rows = [
        (
            d.id,
            d.name,
            d.timezone,
            d.mains_km,
            d.service_connections,
            d.private_pipe_km,
            d.avg_pressure_m,
            d.unmetered_households,
            d.unmetered_non_households,
            d.unauthorized_pct_of_siv,
            d.meter_under_registration_pct,
            d.data_handling_pct_of_billed_metered,
            d.calendar,
            d.holidays,
        )
        for d in registry.dmas
    ]
    calendar_rows = [(c.id, c.name, c.holidays) for c in registry.calendars]
    # Refused here, not at the next flow run: a misspelt anomaly key must fail the sync. Imported
    # here: ingest processes load this module (registry reloads) and need no polars/numpy.
    from pipelines.anomalies import MeterAnomalyParams, with_class_overrides

    with_class_overrides(
        MeterAnomalyParams(), {c.id: dict(c.anomaly) for c in registry.meter_classes}
    )
    class_rows = [(c.id, json.dumps(c.anomaly), c.hold_codes) for c in registry.meter_classes]
    vendor_rows = [(v.id, v.name, v.payload) for v in registry.vendors]
    device_rows, meter_rows, exchange_rows, sensor_rows, channel_rows = [], [], [], [], []
    for dev in devices:
        params = device_params(dev)
        device_rows.append(
            (
                dev.id,
                dev.vendor,
                dev.protocol,
                dev.dma,
                dev.gateway,
                dev.serial,
                json.dumps(params),
                dev.clock,
            )
        )
        meter_id = None
        if dev.meter is not None:
            m = dev.meter
            meter_id = m.id or dev.id
            meter_rows.append(
                (
                    meter_id,
                    dev.id,
                    dev.dma,
                    m.account,
                    m.customer_type,
                    m.meter_class,
                    m.dn,
                    m.q3,
                    m.q4,
                    m.register_digits,
                    m.install_date,
                )
            )
            for ex in m.exchanges:
                exchange_rows.append(
                    (
                        meter_id,
                        datetime.fromisoformat(ex.at),
                        ex.old_register_final,
                        ex.new_register_start,
                    )
                )
        for ch in registry.channels_of(dev):
            if ch.quantity not in CANONICAL:
                raise ValueError(
                    f"device {dev.id} channel {ch.name}: unknown quantity {ch.quantity}"
                )
            is_meter_channel = meter_id is not None and ch.kind in ("register", "")
            sensor_id = None if is_meter_channel else f"{dev.id}:{ch.name}"
            if sensor_id is not None:
                sensor_rows.append((sensor_id, dev.id, dev.dma, ch.kind or ch.quantity))
            lo, hi = DEFAULT_RANGES[ch.quantity]
            channel_rows.append(
                (
                    dev.id,
                    ch.name,
                    ch.quantity,
                    CANONICAL[ch.quantity],
                    ch.kind,
                    ch.role,
                    meter_id if is_meter_channel else None,
                    sensor_id,
                    dev.dma,
                    lo if ch.min is None else ch.min,
                    hi if ch.max is None else ch.max,
                    json.dumps({**ch.params, "unit": ch.unit or CANONICAL[ch.quantity]}),
                )
            )

    with conn.transaction(), conn.cursor() as cur:
        before = _analysis_inputs(cur)
        cur.executemany(
            """INSERT INTO dmas (id, name, timezone, mains_km, service_connections, private_pipe_km,
                   avg_pressure_m, unmetered_households, unmetered_non_households,
                   unauthorized_pct_of_siv, meter_under_registration_pct,
                   data_handling_pct_of_billed_metered, calendar, holidays)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::date[])
               ON CONFLICT (id) DO UPDATE SET name = excluded.name, timezone = excluded.timezone,
                   mains_km = excluded.mains_km, service_connections = excluded.service_connections,
                   private_pipe_km = excluded.private_pipe_km,
                   avg_pressure_m = excluded.avg_pressure_m,
                   unmetered_households = excluded.unmetered_households,
                   unmetered_non_households = excluded.unmetered_non_households,
                   unauthorized_pct_of_siv = excluded.unauthorized_pct_of_siv,
                   meter_under_registration_pct = excluded.meter_under_registration_pct,
                   data_handling_pct_of_billed_metered =
                       excluded.data_handling_pct_of_billed_metered,
                   calendar = excluded.calendar, holidays = excluded.holidays,
                   updated_at = now()""",
            dma_rows,
        )
        cur.execute("DELETE FROM holiday_calendars")
        cur.executemany(
            "INSERT INTO holiday_calendars (id, name, holidays) VALUES (%s, %s, %s::date[])",
            calendar_rows,
        )
        # The registry is the whole truth about classes: a class removed from it is default.
        cur.execute("DELETE FROM meter_classes")
        cur.executemany(
            """INSERT INTO meter_classes (id, anomaly, hold_codes)
               VALUES (%s, %s::jsonb, %s)""",
            class_rows,
        )
        cur.executemany(
            """INSERT INTO vendors (id, name, payload) VALUES (%s, %s, %s)
               ON CONFLICT (id) DO UPDATE SET name = excluded.name, payload = excluded.payload""",
            vendor_rows,
        )
        cur.executemany(
            """INSERT INTO devices
                   (id, vendor_id, protocol, dma_id, gateway, serial, params, clock, active)
               VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, true)
               ON CONFLICT (id) DO UPDATE SET vendor_id = excluded.vendor_id,
                   protocol = excluded.protocol, dma_id = excluded.dma_id,
                   gateway = excluded.gateway, serial = excluded.serial, params = excluded.params,
                   clock = excluded.clock, active = true, updated_at = now()""",
            device_rows,
        )
        cur.executemany(
            """INSERT INTO meters (id, device_id, dma_id, account, customer_type, meter_class,
                   dn, q3, q4, register_digits, install_date)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (id) DO UPDATE SET device_id = excluded.device_id,
                   dma_id = excluded.dma_id, account = excluded.account,
                   customer_type = excluded.customer_type, meter_class = excluded.meter_class,
                   dn = excluded.dn, q3 = excluded.q3,
                   q4 = excluded.q4, register_digits = excluded.register_digits,
                   install_date = excluded.install_date, active = true""",
            meter_rows,
        )
        cur.executemany(
            """INSERT INTO meter_exchanges VALUES (%s, %s, %s, %s)
               ON CONFLICT (meter_id, exchanged_at) DO UPDATE SET
                   old_register_final = excluded.old_register_final,
                   new_register_start = excluded.new_register_start""",
            exchange_rows,
        )
        cur.executemany(
            """INSERT INTO sensors (id, device_id, dma_id, kind) VALUES (%s, %s, %s, %s)
               ON CONFLICT (id) DO UPDATE SET device_id = excluded.device_id,
                   dma_id = excluded.dma_id, kind = excluded.kind""",
            sensor_rows,
        )
        cur.executemany(
            """INSERT INTO channels (device_id, name, quantity, unit, kind, role, meter_id,
                   sensor_id, dma_id, min_value, max_value, params)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)
               ON CONFLICT (device_id, name) DO UPDATE SET quantity = excluded.quantity,
                   unit = excluded.unit, kind = excluded.kind, role = excluded.role,
                   meter_id = excluded.meter_id, sensor_id = excluded.sensor_id,
                   dma_id = excluded.dma_id, min_value = excluded.min_value,
                   max_value = excluded.max_value, params = excluded.params""",
            channel_rows,
        )
        invalidated = _invalidate_changed(cur, before, _analysis_inputs(cur))
        ids = [r[0] for r in device_rows]
        cur.execute(
            "UPDATE devices SET active = false, updated_at = now() "
            "WHERE active AND NOT (id = ANY(%s))",
            (ids,),
        )
        deactivated = cur.rowcount
        version = bump_registry_version(conn)
    return SyncResult(
        len(dma_rows),
        len(vendor_rows),
        len(device_rows),
        len(meter_rows),
        len(sensor_rows),
        len(channel_rows),
        deactivated,
        version,
        invalidated,
    )

"""The one command line: ``aquameter <group> <command>``. Every command prints what it did in
numbers, so a run in CI or cron leaves a readable record."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from aquameter.mqtt_acl import mqtt_app
from aquameter.registry import load_registry
from aquameter.report_cli import db_serve_cmd, report_cmd
from aquameter.runtime import broker, database_url
from aquameter.settings import Settings

app = typer.Typer(help="Aquameter: smart-water telemetry pipeline.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
devices_app = typer.Typer(help="Device registry.", no_args_is_help=True)
simulate_app = typer.Typer(
    help="Simulators: fleets, DMAs, stations, CoAP meters.", no_args_is_help=True
)
flow_app = typer.Typer(help="Analytics flows (Prefect).", no_args_is_help=True)
export_app = typer.Typer(help="Exports for other systems.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(devices_app, name="devices")
app.add_typer(simulate_app, name="simulate")
app.add_typer(flow_app, name="flow")
app.add_typer(export_app, name="export")
app.add_typer(mqtt_app, name="mqtt")
app.command("report")(report_cmd)
db_app.command("serve")(db_serve_cmd)

console = Console()


def _settings() -> Settings:
    return Settings()


def _print_version(value: bool) -> None:
    """``--version``: the installed package's version (what pip installed, not a constant
    that could drift from pyproject.toml)."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        typer.echo(f"aquameter {version('aquameter')}")
    except PackageNotFoundError:
        typer.echo("aquameter (not installed: version unknown)")
    raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Logging as text, or JSON lines with AQUAMETER_LOG_FORMAT=json (aquameter.logs). With -v
    a failure shows its full traceback (aquameter.errors.main), else one line and the fix."""
    from aquameter.errors import set_verbose
    from aquameter.logs import resolve_format, setup_logging

    set_verbose(verbose)

    try:
        fmt = resolve_format()
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    setup_logging(verbose, fmt)
    # pymodbus logs every timeout as an ERROR with a frame dump; the poller's own counted
    # warnings say the same more plainly.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations (idempotent), create partitions ahead, (re)apply policies."""
    from sql.connect import connect
    from sql.migrate import migrate

    s = _settings()
    with connect(database_url(s)) as conn:
        r = migrate(
            conn,
            timescale=s.timescale,
            partition_days=s.partition_interval_days,
            partitions_ahead=s.partitions_ahead,
            compress_after_days=s.compress_after_days,
            retention_days=s.retention_days,
        )
    console.print(
        f"backend={r.backend} applied={len(r.applied)} already_applied={r.already} "
        f"partitions_created={r.partitions_created}"
    )
    for name in r.applied:
        console.print(f"  applied {name}")


@db_app.command("status")
def db_status() -> None:
    """Row counts of the main tables and the quarantine by reason."""
    from sql.connect import connect

    s = _settings()
    with connect(database_url(s)) as conn:
        table = Table("table", "rows")
        for name in ("dmas", "devices", "meters", "channels", "readings", "quarantine"):
            row = conn.execute(f"SELECT count(*) FROM {name}").fetchone()  # noqa: S608
            table.add_row(name, f"{row[0] if row else 0:,}")
        console.print(table)
        # A row is one distinct rejected input; occurrences counts how often it came (0015).
        reasons = conn.execute(
            "SELECT reason, count(*), sum(occurrences) FROM quarantine GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
        for reason, n, received in reasons:
            again = f" (received {int(received):,} times)" if received != n else ""
            console.print(f"  quarantine {reason}: {n:,}{again}")


@db_app.command("roles")
def db_roles(
    login: Annotated[str, typer.Argument(help="The login to make, e.g. aq_ingest_1.")],
    role: Annotated[str, typer.Option(help="ingest, analytics or billing.")],
    password_env: Annotated[
        str | None, typer.Option(help="Env var holding the login's password.")
    ] = None,
    password_file: Annotated[
        Path | None, typer.Option(help="File holding the login's password.")
    ] = None,
) -> None:
    """Make a login in one of the least-privilege roles `db migrate` creates; print its URL
    (password masked) for the service's AQUAMETER_DATABASE_URL_<ROLE>."""
    import os

    from sql.connect import connect
    from sql.roles import ROLES, create_login, role_url

    group = f"aquameter_{role}"
    if group not in ROLES:
        raise typer.BadParameter(f"--role must be ingest, analytics or billing, not {role!r}")
    password = None
    if password_env is not None:
        password = os.environ.get(password_env)
        if not password:
            raise typer.BadParameter(f"env var {password_env} is not set or empty")
    elif password_file is not None:
        password = password_file.read_text().strip()
        if not password:
            raise typer.BadParameter(f"{password_file} is empty")
    s = _settings()
    owner = database_url(s)
    with connect(owner) as conn:
        create_login(conn, group, login, password)
    url = role_url(owner, login, "PASSWORD" if password else None).replace("PASSWORD", "***")
    console.print(f"login {login} in {group}: AQUAMETER_DATABASE_URL_{role.upper()}={url}")


@devices_app.command("sync")
def devices_sync(
    registry: Annotated[Path | None, typer.Option(help="Registry TOML file.")] = None,
) -> None:
    """Load the declarative device registry into the database (after `aquameter check`'s
    validation: a registry with any problem writes nothing)."""
    import sys

    from aquameter.check import check_registry
    from ingest.registry_sync import sync_registry
    from sql.connect import connect

    s = _settings()
    path = registry or s.registry
    problems = check_registry(path)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        n = len(problems)
        console.print(f"[red]devices sync: {n} problem(s) in {path}; nothing written[/]")
        raise typer.Exit(1)
    reg = load_registry(path)
    with connect(database_url(s)) as conn:
        r = sync_registry(conn, reg)
    console.print(
        f"dmas={r.dmas} vendors={r.vendors} devices={r.devices} meters={r.meters} "
        f"sensors={r.sensors} channels={r.channels} deactivated={r.deactivated} "
        f"stale: meters={(r.invalidated or {}).get('meter_anomalies', 0)} "
        f"dmas={(r.invalidated or {}).get('dma_night_flow', 0)}"
    )


def _counters_table(counters: object) -> Table:
    from ingest.counters import IngestCounters

    assert isinstance(counters, IngestCounters)
    snap = counters.snapshot()
    table = Table("counter", "value", title="ingest")
    for key in ("frames", "readings_received", "stored", "duplicates", "batches", "db_errors"):
        table.add_row(key, f"{snap[key]:,}")
    quarantined = snap["quarantined"]
    assert isinstance(quarantined, dict)
    table.add_row("quarantined", f"{sum(quarantined.values()):,}")
    for reason, n in sorted(quarantined.items()):
        table.add_row(f"  {reason}", f"{n:,}")
    repeats = snap["quarantine_repeats"]
    assert isinstance(repeats, dict)
    if repeats:  # the same rejected input again: its row counted it, no new row
        table.add_row("quarantine_repeats", f"{sum(repeats.values()):,}")
        for reason, n in sorted(repeats.items()):
            table.add_row(f"  {reason}", f"{n:,}")
    return table


def _workers_table(workers: object) -> Table:
    from ingest.workers import MqttWorkers

    assert isinstance(workers, MqttWorkers)
    table = Table(
        "worker",
        "pid",
        "restarts",
        "messages",
        "acked",
        "readings",
        "stored",
        "duplicates",
        "quarantined",
        "repeats",
        title="MQTT workers",
    )
    for r in workers.rows():
        status = str(r.pid) if r.alive else f"exit {r.last_exitcode}"
        table.add_row(
            str(r.index),
            status,
            str(r.restarts),
            f"{r.mqtt['messages']:,}",
            f"{r.mqtt['acked']:,}",
            f"{r.counters['readings_received']:,}",
            f"{r.counters['stored']:,}",
            f"{r.counters['duplicates']:,}",
            f"{sum(r.quarantined.values()):,}",
            f"{sum(r.quarantine_repeats.values()):,}",
        )
    return table


@app.command("ingest")
def ingest_cmd(
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    registry: Annotated[Path | None, typer.Option(help="Registry TOML file.")] = None,
    mqtt: Annotated[bool, typer.Option(help="Subscribe to MQTT meter traffic.")] = True,
    mqtt_workers: Annotated[
        int | None,
        typer.Option(
            "--mqtt-workers",
            min=1,
            help="MQTT ingest processes on the v5 shared subscription "
            "(default: AQUAMETER_MQTT_WORKERS, 1).",
        ),
    ] = None,
    cjt188_listen: Annotated[
        str | None,
        typer.Option(
            "--cjt188-listen",
            metavar="HOST:PORT",
            help="Accept CJ/T 188 DTUs/concentrators pushing frames over TCP on HOST:PORT.",
        ),
    ] = None,
) -> None:
    """Run every adapter the registry asks for into the validated write path until Ctrl-C.

    With ``--mqtt-workers N`` (N > 1, MQTT v5 broker, a shared group) MQTT runs in N worker
    processes on the shared subscription; CoAP, Modbus and OPC-UA stay in this process.

    Exits 1 (after a clean stop) when ingest cannot go on here: paho's network thread died, the
    pipeline reported ``failure``, or an async adapter's task ended with an exception. A process
    that reads nothing must not look alive; the service manager restarts it and the broker
    redelivers what was not acknowledged. (Worker processes watch themselves: ingest.workers.)"""
    from ingest.metrics import MetricSources, MetricsServer, start_metrics
    from ingest.service import (
        adapter_options,
        build_async_adapters,
        ingest_problem,
        make_pipeline,
        start_mqtt,
        vendor_formats,
    )
    from ingest.workers import MqttWorkers, effective_workers
    from protocols.mqtt import safe_url

    s = _settings()
    reg = load_registry(registry or s.registry)
    db = database_url(s, "ingest")
    pipeline = make_pipeline(s, db)
    # The exporter reads these at scrape time; MQTT and the adapters are filled in below, once
    # they exist, so /healthz answers while the broker connection is still being made.
    sources = MetricSources(
        pipeline=pipeline,
        database_url=db,
        flows_database_url=database_url(s, "analytics"),
        broker_expected=mqtt,
    )
    metrics: MetricsServer | None = None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    workers: MqttWorkers | None = None
    problem: str | None = None

    def close_pipeline() -> None:
        # A pipeline whose writer gave up may never drain: do not wait on it forever.
        pipeline.close(60.0 if problem is None else 15.0)

    def tick() -> None:
        line = pipeline.counters.line() if workers is None else workers.line(pipeline.counters)
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {line}")

    try:
        if s.metrics_port is not None:  # in the try: a port in use still closes the pipeline
            metrics = start_metrics(s.metrics_host, s.metrics_port, sources)
            console.print(f"metrics: {metrics.url}/metrics (probes: /healthz, /readyz)")
        with broker(s) as (url, v5):
            n = mqtt_workers or s.mqtt_workers
            n = effective_workers(n, v5=v5, shared_group=s.mqtt_shared_group) if mqtt else 1
            client = None
            if mqtt and n > 1:
                # The CoAP/Modbus/OPC-UA adapters below stay in this process, on `pipeline`.
                workers = MqttWorkers(s, db, url, vendor_formats(reg), n).start()
            elif mqtt:
                client = start_mqtt(s, reg, pipeline, url, v5)
            sources.mqtt, sources.workers = client, workers
            console.print(
                f"ingest: broker {safe_url(url)} (MQTT {'v5' if v5 else '3.1.1'}), "
                f"{len(pipeline.index()):,} channels"
                + (f", {n} MQTT worker processes" if workers is not None else "")
            )
            options = adapter_options(s)
            if cjt188_listen:
                host, _, port = cjt188_listen.rpartition(":")
                if not port.isdigit():
                    raise typer.BadParameter("--cjt188-listen takes HOST:PORT")
                options["cjt188"] = {"host": host or "0.0.0.0", "port": int(port)}
            adapters = build_async_adapters(reg, pipeline, options=options)
            sources.adapters = adapters

            def check() -> str | None:
                return ingest_problem(pipeline, client)

            try:
                problem = asyncio.run(
                    _until(stop, duration, adapters, tick, s.stats_interval_s, check)
                )
            except KeyboardInterrupt:
                pass
            finally:
                if problem is not None:
                    from rich.markup import escape

                    console.print(
                        f"[bold red]ingest stopped: {escape(problem)}. Nothing more is read here; "
                        "exiting with status 1 so the service manager restarts ingest (what "
                        "was not acknowledged is redelivered). If it recurs, check the log "
                        "above and the database.[/]"
                    )
                if client is not None:
                    client.shutdown(close_pipeline)  # commit and acknowledge what was read
                if workers is not None:
                    workers.stop()
    finally:
        close_pipeline()
        if workers is None:
            console.print(_counters_table(pipeline.counters))
        else:
            console.print(_counters_table(workers.counters(plus=pipeline.counters)))
            console.print(_workers_table(workers))
        if metrics is not None:
            metrics.stop()
    if problem is not None:
        raise typer.Exit(code=1)


async def _until(
    stop: threading.Event,
    duration: float | None,
    adapters: dict[str, object],
    tick: Callable[[], None],
    every: float,
    check: Callable[[], str | None] | None = None,
) -> str | None:
    """Run the adapters until ``stop``, ``duration`` or a failure; return what failed (None
    after a normal stop). ``check`` (dead MQTT thread, failed pipeline) runs every second."""
    from ingest.service import IngestFailed, run_adapters

    task = asyncio.create_task(run_adapters(adapters, duration, tick, every, check))
    while not task.done():
        if stop.is_set():
            task.cancel()
        await asyncio.sleep(0.2)
    await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    exc = task.exception()
    if isinstance(exc, IngestFailed):
        return str(exc)
    if exc is not None:
        return f"ingest loop failed: {type(exc).__name__}: {exc}"
    return None


@app.command("import")
def import_cmd(
    files: Annotated[list[Path], typer.Argument(help="CSV or Parquet files of readings.")],
) -> None:
    """Load historical readings through validation, de-duplication and the quarantine.

    Every file's columns are checked before anything is written; a bad row is quarantined,
    never the end of the file; progress goes to stderr (also without a terminal)."""
    from aquameter.errors import preflight_database
    from ingest.importer import check_columns, count_rows, import_file
    from ingest.service import make_pipeline

    for path in files:  # all of them, before the database is touched
        check_columns(path)
    s = _settings()
    preflight_database(database_url(s, "ingest"), ("channels", "readings", "quarantine"))
    pipeline = make_pipeline(s, database_url(s, "ingest"))
    try:
        for path in files:
            rows = count_rows(path)
            step = max(1, min(200_000, rows // 10))
            seen = [0, 0]  # rows done, rows at the last progress line

            def advance(
                n: int,
                path: Path = path,
                rows: int = rows,
                step: int = step,
                seen: list[int] = seen,
            ) -> None:
                seen[0] += n
                if seen[0] - seen[1] >= step or seen[0] >= rows:
                    seen[1] = seen[0]
                    typer.echo(f"import {path}: {seen[0]:,}/{rows:,} rows", err=True)

            r = import_file(path, pipeline, progress=advance)
            console.print(
                f"{path}: rows={r.rows:,} accepted={r.accepted:,} stored={r.stored:,} "
                f"duplicates={r.duplicates:,} quarantined={r.quarantined:,}"
                + (
                    f" already_quarantined={r.already_quarantined:,}"
                    if r.already_quarantined
                    else ""
                )
                + "".join(f" {k}={v:,}" for k, v in sorted(r.reasons.items())),
                soft_wrap=True,
            )
    finally:
        pipeline.close()
        console.print(_counters_table(pipeline.counters))


@app.command("check")
def check_cmd(
    registry: Annotated[Path | None, typer.Option(help="Registry TOML file.")] = None,
    poll: Annotated[
        str | None,
        typer.Option(
            metavar="DEVICE",
            help="Poll this Modbus/OPC-UA device once and print its decoded readings "
            "(nothing is written).",
        ),
    ] = None,
    listen: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            min=0.1,
            help="Subscribe to the broker this long and print decoded readings and rejected "
            "frames (nothing is written).",
        ),
    ] = None,
) -> None:
    """Validate the registry as `devices sync` would load it; each problem as FILE:LINE.
    With --poll DEVICE or --listen SECONDS, then show live traffic as ingest would store it,
    without writing anything (like Telegraf's --test)."""
    from aquameter.check import check_registry_text, check_url

    if poll is not None and listen is not None:
        typer.echo("check: give --poll DEVICE or --listen SECONDS, not both", err=True)
        raise typer.Exit(2)
    s = _settings()
    path = Path(registry or s.registry)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        typer.echo(f"{path}: cannot read the registry: {err.strerror or err}", err=True)
        raise typer.Exit(1) from None
    problems, summary = check_registry_text(path, text)
    lines = [str(p) for p in problems]
    if s.mqtt_url:
        bad = check_url(s.mqtt_url, ("mqtt", "mqtts", "ws", "wss"), "AQUAMETER_MQTT_URL")
        if bad:
            lines.append(f"environment: {bad}")
    for line in lines:
        typer.echo(line, err=True)
    if lines:
        typer.echo(f"{len(lines)} problem(s)", err=True)
        raise typer.Exit(1)
    if poll is None and listen is None:
        typer.echo(str(summary))
        return
    from aquameter.check_live import run_listen, run_poll

    reg = load_registry(path)
    if poll is not None:
        raise typer.Exit(run_poll(reg, poll, s, registry_path=str(path)))
    from aquameter.runtime import known_broker

    assert listen is not None
    raise typer.Exit(run_listen(reg, listen, s, known_broker(s)))


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@simulate_app.command("fleet")
def simulate_fleet_cmd(
    days: Annotated[int, typer.Option(help="Days of 15-minute reads to simulate.")] = 2,
    start: Annotated[str | None, typer.Option(help="UTC start (ISO); default: days ago.")] = None,
    seed: Annotated[int, typer.Option()] = 1,
    faults: Annotated[bool, typer.Option(help="Inject a random mix of faults.")] = True,
    reads_per_message: Annotated[int | None, typer.Option()] = None,
    malformed: Annotated[int, typer.Option(help="Malformed frames to inject.")] = 0,
    duplicate_fraction: Annotated[float, typer.Option()] = 0.0,
    manifest: Annotated[Path | None, typer.Option(help="Write the ground truth here.")] = None,
    registry: Annotated[Path | None, typer.Option(help="Registry TOML file.")] = None,
) -> None:
    """Simulate the registry's meter fleet and DMAs and publish the traffic over MQTT."""
    from aquameter.runtime import known_broker
    from simulators.faults import random_faults
    from simulators.fleet import customer_meters, meter_id_of, simulate_fleet, write_manifest
    from simulators.publish import publish
    from simulators.traffic import TrafficParams, build_traffic, with_traffic

    s = _settings()
    reg = load_registry(registry or s.registry)
    found = known_broker(s)
    if found is None:
        console.print("no broker: set AQUAMETER_MQTT_URL or start `aquameter ingest` first")
        raise typer.Exit(2)
    t0 = _when(start) or (datetime.now(UTC) - timedelta(days=days)).replace(
        minute=0, second=0, microsecond=0
    )
    ids = [meter_id_of(d) for d, _ in customer_meters(reg)]
    injected = (
        random_faults(ids, [d.id for d in reg.dmas], t0, int(max(1, days)), seed) if faults else []
    )
    fleet = simulate_fleet(reg, t0, days, seed=seed, faults=injected)
    traffic = build_traffic(
        fleet,
        reg,
        TrafficParams(
            root=s.mqtt_topic_root,
            reads_per_message=reads_per_message,
            seed=seed,
            malformed=malformed,
            duplicate_fraction=duplicate_fraction,
        ),
    )
    stats = publish(found[0], traffic.publishes, client_id=f"aquameter-sim-{seed}")
    console.print(
        f"simulated {len(ids):,} meters x {days:g} days: {fleet.reads.height:,} reads, "
        f"{len(injected)} faults; published {stats.sent:,} messages ({stats.readings:,} "
        f"readings), acked {stats.acked:,}, failed {stats.failed}, in {stats.seconds:.1f} s"
    )
    if manifest:
        write_manifest(with_traffic(fleet.manifest, traffic), manifest)
        console.print(f"ground truth: {manifest}")


@simulate_app.command("history")
def simulate_history_cmd(
    out: Annotated[Path, typer.Argument(help="Parquet file to write (for `aquameter import`).")],
    days: Annotated[int, typer.Option()] = 30,
    seed: Annotated[int, typer.Option()] = 1,
    manifest: Annotated[Path | None, typer.Option()] = None,
    registry: Annotated[Path | None, typer.Option(help="Registry TOML file.")] = None,
) -> None:
    """Generate days of history in seconds, as a file the bulk importer loads."""
    import polars as pl

    from simulators.faults import random_faults
    from simulators.fleet import customer_meters, meter_id_of, simulate_fleet, write_manifest

    s = _settings()
    reg = load_registry(registry or s.registry)
    t0 = (datetime.now(UTC) - timedelta(days=days + 1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    ids = [meter_id_of(d) for d, _ in customer_meters(reg)]
    injected = random_faults(ids, [d.id for d in reg.dmas], t0, int(max(1, days)), seed)
    fleet = simulate_fleet(reg, t0, days, seed=seed, faults=injected)
    device_of = {meter_id_of(d): d.id for d, _ in customer_meters(reg)}
    table = fleet.reads.select(
        pl.col("meter_id").replace_strict(device_of, default=pl.col("meter_id")).alias("device"),
        pl.lit("register").alias("channel"),
        pl.col("ts"),
        pl.col("register").alias("value"),
        pl.lit("m3").alias("unit"),
        pl.col("quality").cast(pl.Int64).alias("status"),
    )
    table.write_parquet(out)
    console.print(f"wrote {table.height:,} readings of {len(ids):,} meters to {out}")
    if manifest:
        write_manifest(fleet.manifest, manifest)


@simulate_app.command(
    "coap-meters", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def simulate_coap_cmd(ctx: typer.Context) -> None:
    """CoAP NB-IoT meter client (options: see `--help` of simulators.coap_meter)."""
    from simulators.coap_meter import main

    result = main(list(ctx.args))
    console.print({k: v for k, v in result.items() if not isinstance(v, list | dict)})


@simulate_app.command("wq-station")
def simulate_wq_cmd(
    port: Annotated[int, typer.Option()] = 4840,
    station: Annotated[str, typer.Option()] = "WQ1",
    duration: Annotated[float | None, typer.Option()] = None,
    fault: Annotated[
        list[str] | None, typer.Option(help="e.g. excursion:Turbidity:start=60")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    manifest: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Water-quality station OPC-UA server on 127.0.0.1 until Ctrl-C or --duration."""
    from simulators.wq_station import main

    result = main(
        port=port,
        station=station,
        duration_s=duration,
        faults=tuple(fault or ()),
        seed=seed,
        manifest_path=manifest,
    )
    console.print(f"wq-station {station}: served; manifest keys {sorted(result)}")


@simulate_app.command("pump-station")
def simulate_pump_cmd(
    port: Annotated[int, typer.Option(help="First station's port; others follow.")] = 5020,
    stations: Annotated[int, typer.Option()] = 1,
    pumps: Annotated[int, typer.Option()] = 3,
    time_scale: Annotated[float, typer.Option(help="Simulated seconds per real second.")] = 60.0,
    duration: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
    manifest: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Pump station Modbus TCP server(s) on 127.0.0.1 until Ctrl-C or --duration."""
    from simulators.pump_station import main

    result = main(
        port=port,
        stations=stations,
        pumps=pumps,
        time_scale=time_scale,
        duration_s=duration,
        seed=seed,
        manifest_path=str(manifest) if manifest else None,
    )
    console.print(f"pump-station: served {stations} station(s); manifest keys {sorted(result)}")


@flow_app.command("list")
def flow_list() -> None:
    """The flows and their default schedules."""
    from flows.runner import DEFAULT_SCHEDULES, flow_names

    for name in flow_names():
        console.print(f"{name:18} {DEFAULT_SCHEDULES.get(name) or '-'}")


DaskOption = Annotated[
    str | None,
    typer.Option(
        help="Fan tasks out on Dask: local:N (a LocalCluster of N worker processes) or "
        "tcp://host:port (a running scheduler)."
    ),
]


@flow_app.command("run")
def flow_run(
    name: Annotated[str, typer.Argument(help="Flow name (see `aquameter flow list`).")],
    since: Annotated[str | None, typer.Option(help="Window start (ISO date/time, UTC).")] = None,
    until: Annotated[str | None, typer.Option(help="Window end (ISO date/time, UTC).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Threshold override, e.g. vee.spike_k=6")
    ] = None,
    full: Annotated[bool, typer.Option(help="Recompute every unit, not only stale ones.")] = False,
    dask: DaskOption = None,
) -> None:
    """Run one flow once under Prefect and print its summary.

    Prefect's API is PREFECT_API_URL, else a local server started for this command (or the one
    a running `flow serve` keeps) and stopped after it. A failed flow prints one red line (the
    flow, the error, the fix when known), a summary saying FAILED, and exits 1."""
    import importlib
    import time as _time

    from rich.markup import escape

    from aquameter.prefect_api import prefect_api

    t0 = _time.monotonic()
    s = _settings()
    _check_dask(dask)
    error: str | None = None
    result: dict[str, object] = {}
    try:
        # The flow imports (Prefect, polars) while the server starts: both take seconds.
        with prefect_api(s, warmup=lambda: importlib.import_module("flows.runner").FLOWS.get(name)):
            from flows.overrides import parse_assignments
            from flows.runner import run_flow

            result = run_flow(
                name,
                _when(since),
                _when(until),
                database_url(s, "analytics"),
                overrides=parse_assignments(set_ or []),
                full=full,
                dask=dask,
            )
    except Exception as exc:
        from flows.runner import FlowFailed

        error = exc.line if isinstance(exc, FlowFailed) else FlowFailed(name, exc).line
    table = Table("key", "value", title=f"flow {name}")
    table.add_row("status", "[bold red]FAILED[/]" if error else "[green]COMPLETED[/]")
    for key, value in result.items():
        table.add_row(str(key), f"{value:,}" if isinstance(value, int) else str(value))
    table.add_row("seconds", f"{_time.monotonic() - t0:.1f}")
    console.print(table)
    if error:
        console.print(f"[bold red]{escape(error)}[/]", soft_wrap=True)
        raise typer.Exit(1)


@flow_app.command("serve")
def flow_serve(
    only: Annotated[list[str] | None, typer.Option(help="Serve only these flows.")] = None,
    dask: DaskOption = None,
) -> None:
    """Serve every flow on its schedule (Prefect) until Ctrl-C.

    Without PREFECT_API_URL a local Prefect server (with its scheduler) runs for as long as
    this command does; `aquameter flow run` in another shell reuses it."""
    from flows.runner import serve_all

    _check_dask(dask)
    serve_all(database_url(_settings(), "analytics"), names=only, dask=dask)


def _check_dask(spec: str | None) -> None:
    """A bad ``--dask`` is one line and exit 2, before any server or cluster starts."""
    if spec is None:
        return
    from flows.dask_runner import DaskSpecError, parse_dask_spec

    try:
        parse_dask_spec(spec)
    except DaskSpecError as exc:
        console.print(f"[bold red]{exc}[/]", soft_wrap=True)
        raise typer.Exit(2) from None


@export_app.command("billing")
def export_billing_cmd(
    period: Annotated[str, typer.Option(help="YYYY-MM or YYYY-MM-DD..YYYY-MM-DD (local dates).")],
    format_: Annotated[str, typer.Option("--format", help="csv or parquet")] = "csv",
    output: Annotated[Path | None, typer.Option(help="Output file.")] = None,
) -> None:
    """Write the current billing determinants of a period, with replacements listed."""
    from flows.export import export_billing

    if format_ not in ("csv", "parquet"):
        raise typer.BadParameter("--format must be csv or parquet")
    from flows.export import PeriodNotComputedError

    try:
        r = export_billing(database_url(_settings(), "billing"), period, format_, output)  # type: ignore[arg-type]
    except PeriodNotComputedError as err:
        console.print(f"[red]billing export: {err}[/]")
        raise typer.Exit(1) from None
    console.print(f"billing export {r.path}: rows={r.rows:,} replacements={r.replacements:,}")


@app.command("demo")
def demo_cmd(
    duration: Annotated[
        float, typer.Option(help="Seconds from start until the analytics run (live traffic).")
    ] = 90.0,
    days: Annotated[int, typer.Option(help="Days of history.")] = 30,
    meters: Annotated[int | None, typer.Option(help="Override the number of meters.")] = None,
    report_dir: Annotated[Path, typer.Option()] = Path("demo-report"),
    seed: Annotated[int, typer.Option()] = 7,
) -> None:
    """A living utility on embedded defaults: simulate, ingest, analyse, report.

    Exits 1 when any analytics flow failed or any injected fault was missed, after one red
    line per reason (the report shows failed flows in a red banner)."""
    from aquameter.demo import run_demo

    summary = run_demo(
        _settings(),
        duration_s=duration,
        days=days,
        meters=meters,
        report_dir=report_dir,
        seed=seed,
    )
    if summary.get("failed") or summary.get("failed_flows"):  # run_demo printed each, in red
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

"""aquameter.logs (text and JSON lines) and ``aquameter --version``."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from aquameter.cli import app
from aquameter.logs import JsonFormatter, resolve_format, setup_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_json_lines_parse_and_carry_the_exception(restore_root):
    out = io.StringIO()
    setup_logging(verbose=True, fmt="json", stream=out)
    log = logging.getLogger("aquameter.test")
    log.info("stored %d readings", 42)
    log.warning("two\nlines stay one record")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("batch %s failed", "b-7")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    records = [json.loads(line) for line in lines]
    assert [r["level"] for r in records] == ["INFO", "WARNING", "ERROR"]
    assert {r["logger"] for r in records} == {"aquameter.test"}
    assert records[0]["message"] == "stored 42 readings"
    assert records[1]["message"] == "two\nlines stay one record"
    assert records[2]["message"] == "batch b-7 failed"
    exc = records[2]["exception"]
    assert exc.startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: division by zero" in exc
    assert "exception" not in records[0]
    for r in records:
        assert r["ts"].endswith("Z") and "T" in r["ts"]


def test_text_format_and_levels(restore_root):
    out = io.StringIO()
    setup_logging(verbose=False, fmt="text", stream=out)
    log = logging.getLogger("aquameter.test")
    log.info("hidden at WARNING")
    log.warning("shown")
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" WARNING aquameter.test: shown")


def test_setup_twice_replaces_only_its_own_handler(restore_root):
    foreign = logging.NullHandler()
    logging.getLogger().addHandler(foreign)
    first = setup_logging(fmt="text", stream=io.StringIO())
    second = setup_logging(fmt="json", stream=io.StringIO())
    handlers = logging.getLogger().handlers
    assert second in handlers and first not in handlers and foreign in handlers
    assert isinstance(second.formatter, JsonFormatter)


def test_format_from_environment(monkeypatch):
    monkeypatch.setenv("AQUAMETER_LOG_FORMAT", "JSON")
    assert resolve_format() == "json"
    monkeypatch.delenv("AQUAMETER_LOG_FORMAT")
    assert resolve_format() == "text"
    with pytest.raises(ValueError, match="expected one of text, json"):
        resolve_format("xml")


def test_version_via_cli_runner():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"aquameter {version('aquameter')}"


def test_version_and_json_logs_in_a_real_process():
    """The installed entry point's wiring: --version, and AQUAMETER_LOG_FORMAT=json making the
    CLI callback log JSON lines (exception text included) on stderr."""
    exe = os.path.join(os.path.dirname(sys.executable), "aquameter")
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"aquameter {version('aquameter')}"

    code = (
        "import logging\n"
        "from aquameter.cli import app\n"
        "app(['db', '--help'], standalone_mode=False)\n"
        "try:\n"
        "    raise RuntimeError('disk on fire')\n"
        "except RuntimeError:\n"
        "    logging.getLogger('aquameter.x').exception('commit failed')\n"
    )
    env = {**os.environ, "AQUAMETER_LOG_FORMAT": "json"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert record["message"] == "commit failed" and record["logger"] == "aquameter.x"
    assert "RuntimeError: disk on fire" in record["exception"]

    env["AQUAMETER_LOG_FORMAT"] = "xml"
    done = subprocess.run([exe, "db", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "expected one of text, json" in done.stderr


def test_default_handler_follows_the_current_stderr(restore_root, monkeypatch):
    setup_logging(fmt="json")
    for _ in range(2):  # a new stderr each time, as CliRunner and pytest's capture do
        fresh = io.StringIO()
        monkeypatch.setattr(sys, "stderr", fresh)
        logging.getLogger("aquameter.test").warning("here")
        assert json.loads(fresh.getvalue())["message"] == "here"


def test_tagged_process_and_explicit_level(restore_root: None) -> None:
    """What an ingest worker process sets up (ingest.workers.worker_main): its parent's format
    and level, each record tagged with the worker."""
    out = io.StringIO()
    setup_logging(fmt="json", stream=out, level=logging.DEBUG, tag="w3")
    logging.getLogger("aquameter.ingest.workers").debug("connected")
    record = json.loads(out.getvalue())
    assert record["process"] == "w3" and record["level"] == "DEBUG"
    assert record["message"] == "connected"

    out = io.StringIO()
    setup_logging(verbose=True, fmt="text", stream=out, level=logging.ERROR, tag="w0")
    log = logging.getLogger("aquameter.ingest.workers")
    log.warning("below the explicit level")
    log.error("shown")
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" ERROR aquameter.ingest.workers[w0]: shown")


def test_ingest_worker_process_logs_json_lines(db_url: str, mqtt_url: str) -> None:
    """A real MQTT worker process (spawned: fresh interpreter, bare logging) with
    AQUAMETER_LOG_FORMAT=json: its records (paho's connect, at the parent's INFO level) are JSON
    lines tagged with the worker, like the rest of the command's output."""
    code = (
        "import logging, sys\n"
        "from aquameter.settings import Settings\n"
        "from ingest.workers import MqttWorkers\n"
        "if __name__ == '__main__':\n"
        "    s = Settings(database_url=sys.argv[1], mqtt_url=sys.argv[2],\n"
        "                 mqtt_client_id='aqt-logs-' + sys.argv[3], mqtt_shared_group='aqtlogs')\n"
        "    assert s.log_format == 'json'\n"
        "    w = MqttWorkers(s, sys.argv[1], sys.argv[2], {}, 1,\n"
        "                    log_level=logging.INFO, stop_timeout_s=30).start()\n"
        "    ok = w.wait_all('connected', 120)\n"
        "    w.stop()\n"
        "    sys.exit(0 if ok else 3)\n"
    )
    env = {**os.environ, "AQUAMETER_LOG_FORMAT": "json"}
    done = subprocess.run(
        [sys.executable, "-c", code, db_url, mqtt_url, str(os.getpid())],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    connected = [r for r in records if "MQTT connected" in r["message"]]
    assert connected and all(r["process"] == "w0" for r in connected), done.stderr

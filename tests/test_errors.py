"""The CLI's common failures: exit 1 with one line on stderr that says the fix, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AQUAMETER_DATABASE_URL": db, "COLUMNS": "80"}
    return subprocess.run(
        [sys.executable, "-c", "from aquameter.errors import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def one_line(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_unreachable_database(tmp_path: Path) -> None:
    csv = tmp_path / "ok.csv"
    csv.write_text("device,ts,value\nAQN00001,2026-01-01T00:00:00Z,1\n")
    url = "postgresql://postgres:hunter2@127.0.0.1:1/postgres"
    line = one_line(
        run(["import", str(csv)], url, tmp_path),
        "cannot reach PostgreSQL at 127.0.0.1:1",
        "set AQUAMETER_DATABASE_URL",
    )
    assert "hunter2" not in line


def test_unmigrated_database(empty_db_url: str, tmp_path: Path) -> None:
    csv = tmp_path / "ok.csv"
    csv.write_text("device,ts,value\nAQN00001,2026-01-01T00:00:00Z,1\n")
    one_line(run(["import", str(csv)], empty_db_url, tmp_path), "aquameter db migrate")


def test_toml_syntax_error(db_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "registry.toml"
    bad.write_text('[[dma]]\nid = "A"\nname = "unclosed\n')
    one_line(
        run(["devices", "sync", "--registry", str(bad)], db_url, tmp_path),
        f"{bad}:3:",
        "TOML syntax error",
    )


def test_csv_without_required_columns(db_url: str, tmp_path: Path) -> None:
    csv = tmp_path / "other.csv"
    csv.write_text("meter,time,reading\nAQN00001,2026-01-01T00:00:00Z,1\n")
    one_line(run(["import", str(csv)], db_url, tmp_path), "device (or channel_id), ts, value")


def flow_line(proc: subprocess.CompletedProcess[str], *expected: str) -> None:
    """`flow run` reports its own failure (one line at the end of its summary, exit 1)."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1]
    for text in expected:
        assert text in last, last


def test_unknown_flow(db_url: str, tmp_path: Path) -> None:
    flow_line(run(["flow", "run", "no-such-flow"], db_url, tmp_path), "unknown flow", "known:")


def test_bad_date(db_url: str, tmp_path: Path) -> None:
    proc = run(["export", "billing", "--since", "yesterday"], db_url, tmp_path)
    if "No such option" in proc.stderr:  # the export has no date option: use flow run's
        proc = run(["flow", "run", "water_balance", "--since", "yesterday"], db_url, tmp_path)
        flow_line(proc, "yesterday")
    else:
        one_line(proc, "bad date", "ISO 8601")


@pytest.mark.parametrize("flag", [[], ["-v"]])
def test_unknown_failure_points_to_verbose(flag: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    proc = run([*flag, "import", str(missing)], "postgresql://x@127.0.0.1:1/x", tmp_path)
    assert proc.returncode == 1
    if flag:
        assert "Traceback" in proc.stderr
    else:
        assert len(proc.stderr.strip().splitlines()) == 1

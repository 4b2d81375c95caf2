"""One line and the fix: the common failures of the command line, explained.

Why: an operator who points ``aquameter`` at a stopped database, an unmigrated one, a registry
with a typo or a CSV from another system got forty lines of traceback ending in something like
``KeyError: 'ts'``. :func:`explain` maps what we know to one line that says what to do;
:func:`main` (the ``aquameter`` console script) prints that line in red and exits 1, prints
anything else as one line with a pointer to ``-v``, and with ``-v`` the whole traceback.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
import traceback
from pathlib import Path
from typing import Any

# Set by the CLI's -v/--verbose callback: show tracebacks instead of one line.
VERBOSE = False

REQUIRED_COLUMNS = ("device or channel_id", "ts", "value")


class MissingColumns(ValueError):
    """An import file without the columns the importer needs (raised before anything is
    written)."""

    def __init__(self, path: Path | str, missing: list[str], found: list[str]) -> None:
        self.path = str(path)
        self.missing = missing
        self.found = found
        super().__init__(
            f"{path}: missing column(s) {', '.join(missing)}: an import needs "
            f"{', '.join(REQUIRED_COLUMNS)} (optional: channel, unit, status); "
            f"the file has {', '.join(found) or 'no columns'}"
        )


def set_verbose(verbose: bool) -> None:
    global VERBOSE
    VERBOSE = verbose


def preflight_database(url: str, tables: tuple[str, ...] = ("channels", "readings")) -> None:
    """Connect once and touch ``tables``, so that an unreachable or unmigrated database fails
    here, as one explained error, before a command starts threads that would log about it."""
    from sql.connect import connect

    with connect(url, connect_timeout=10) as conn:
        for table in tables:
            conn.execute(f"SELECT 1 FROM {table} LIMIT 0")


def _database_target() -> str:
    from aquameter.secrets import mask_url

    url = os.environ.get("AQUAMETER_DATABASE_URL")
    return mask_url(url) if url else "the embedded server"


def _toml_file(exc: BaseException) -> str | None:
    """The file a TOMLDecodeError came from: tomllib does not say, the loader's frame does."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        for name in ("fh", "path", "registry", "file"):
            value: Any = tb.tb_frame.f_locals.get(name)
            if isinstance(value, str | Path):
                if str(value).endswith(".toml"):
                    found = str(value)
            elif isinstance(getattr(value, "name", None), str):  # an open file
                found = value.name
        tb = tb.tb_next
    return found


def _pg_explain(exc: BaseException) -> str | None:
    import psycopg

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.errors.UndefinedTable):
        m = re.search(r'relation "([^"]+)"', str(exc))
        what = f" (no table {m.group(1)})" if m else ""
        return f"database not migrated{what}: run `aquameter db migrate`"
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return f"{text}: this database login lacks the right; see `aquameter db roles`"
    if isinstance(exc, psycopg.OperationalError):
        where = _database_target()
        m = re.search(r'at "([^"]+)", port (\d+)', str(exc)) or re.search(
            r'socket "([^"]+)"', str(exc)
        )
        server = f"{m.group(1)}:{m.group(2)}" if m and m.lastindex == 2 else where
        low = str(exc).lower()
        if "password authentication failed" in low or "no password supplied" in low:
            return (
                f"PostgreSQL at {server} refused the login: fix the user/password in "
                f"AQUAMETER_DATABASE_URL ({where})"
            )
        m_db = re.search(r'database "([^"]+)" does not exist', str(exc))
        if m_db:
            return (
                f"database {m_db.group(1)!r} does not exist on {server}: create it "
                f"(createdb {m_db.group(1)}) or fix AQUAMETER_DATABASE_URL"
            )
        return (
            f"cannot reach PostgreSQL at {server} ({where}): is it running? "
            f"set AQUAMETER_DATABASE_URL"
        )
    return None


def explain(exc: BaseException) -> str | None:
    """One line with the fix for a failure we know, else None."""
    if type(exc).__module__.startswith("psycopg"):
        line = _pg_explain(exc)
        if line:
            return line
    if isinstance(exc, tomllib.TOMLDecodeError):
        m = re.search(r"at line (\d+), column (\d+)", str(exc))
        pos = f"{m.group(1)}:{m.group(2)}" if m else "?"
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        return f"{_toml_file(exc) or 'TOML'}:{pos}: TOML syntax error: {msg}"
    if isinstance(exc, MissingColumns):
        return str(exc)
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        errors = exc.errors()
        msg = str(errors[0]["msg"] if errors else exc).removeprefix("Value error, ")
        n = exc.error_count()
        more = f" (and {n - 1} more)" if n > 1 else ""
        return f"invalid registry: {msg}{more}: run `aquameter check` for each with its line"
    text = str(exc)
    if isinstance(exc, ValueError):
        if text.startswith("unknown flow"):
            return f"{text} (see `aquameter flow list`)"
        m = re.match(r"Invalid isoformat string: (.*)", text)
        if m:
            return (
                f"bad date {m.group(1)}: use ISO 8601, e.g. 2026-01-31 or 2026-01-31T06:00:00+00:00"
            )
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename or text}"
    from aquameter.secrets import SecretError

    if isinstance(exc, SecretError):
        return text
    return None


def _print_error(line: str) -> None:
    if sys.stderr.isatty():
        line = f"\x1b[31m{line}\x1b[0m"
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """The ``aquameter`` console script: the typer app, with failures as one line."""
    import click

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        from aquameter.cli import app  # lazily: a broken import is reported like the rest

        rv = app(args=args, prog_name="aquameter", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _print_error("aborted")
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _print_error("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        verbose = VERBOSE or "-v" in args or "--verbose" in args
        if verbose:
            traceback.print_exc()
        line = explain(exc)
        if line is None:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
            if not verbose:
                line += " (run with -v for the traceback)"
        _print_error(line)
        sys.exit(1)
    if isinstance(rv, int) and rv:
        sys.exit(rv)


if __name__ == "__main__":
    main()

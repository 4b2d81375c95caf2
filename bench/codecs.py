"""Decode rate of the standards' codecs against ``binary-v1``, side by side on one core.

Each codec decodes the same number of frames of the shape its meters send (one current reading
each, as a meter uplink carries), through :func:`protocols.payloads.decode` exactly as ingest
calls it. The codecs run interleaved, round after round, pinned to one CPU, so a busy machine
slows all of them alike; the table gives each one's median frames/s and readings/s over the rounds
and its ratio to ``binary-v1`` in the same rounds. Every round asserts its reading count.
Run: ``.venv/bin/python bench/codecs.py [--frames N] [--rounds R]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import os
import statistics
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from protocols import wmbus
from protocols.cjt188 import encode_cjt188
from protocols.payloads import decode, encode_binary_v1
from protocols.senml import encode_senml
from protocols.uplink import Uplink
from protocols.wmbus import KeyRing, add_crcs, encode_wmbus

T0 = 1_767_225_600
KEY = bytes(range(16))


def corpora(n: int) -> dict[str, tuple[str, list[bytes], int]]:
    """name -> (format, frames, readings per frame)."""
    ids = [f"{10_000_000 + i:08d}" for i in range(n)]
    wmbus.set_keyring(KeyRing({i: KEY for i in ids}, from_env=False))
    ups = [Uplink(f"AQS{i:05d}", "register", [float(T0 + i)], [i / 1000], "m3") for i in range(n)]
    return {
        "binary-v1": ("binary-v1", [encode_binary_v1(i, T0 + i, 900, [i]) for i in range(n)], 1),
        "senml-json": ("senml-json", [encode_senml([u]) for u in ups], 1),
        "senml-cbor": ("senml-cbor", [encode_senml([u], cbor=True) for u in ups], 1),
        "wmbus (plain, CRC blocks)": (
            "wmbus",
            [add_crcs(encode_wmbus(m, i / 1000)) for i, m in enumerate(ids)],
            1,
        ),
        "wmbus (mode 5 AES)": (
            "wmbus",
            [encode_wmbus(m, i / 1000, key=KEY, access_number=i & 0xFF) for i, m in enumerate(ids)],
            1,
        ),
        "wmbus-hex (mode 5 AES)": (
            "wmbus-hex",
            [encode_wmbus(m, i / 1000, key=KEY).hex().encode() for i, m in enumerate(ids)],
            1,
        ),
        "cjt188": ("cjt188", [encode_cjt188(i + 1, i / 100, T0 + i) for i in range(n)], 1),
    }


def one_pass(fmt: str, frames: list[bytes]) -> tuple[float, int]:
    dec: Callable[..., list[Uplink]] = decode
    readings = 0
    start = time.perf_counter()
    for f in frames:
        for u in dec(f, fmt, None):
            readings += len(u.ts)
    return time.perf_counter() - start, readings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    data = corpora(args.frames)
    rates: dict[str, list[float]] = {k: [] for k in data}
    ratios: dict[str, list[float]] = {k: [] for k in data}
    for _ in range(args.rounds):
        this: dict[str, float] = {}
        for name, (fmt, frames, per) in data.items():
            secs, readings = one_pass(fmt, frames)
            assert readings == per * len(frames), (name, readings, len(frames))
            this[name] = len(frames) / secs
            rates[name].append(this[name])
        for name in data:
            ratios[name].append(this[name] / this["binary-v1"])
    table = Table(title=f"decode rate, one core, {args.frames:,} frames x {args.rounds} rounds")
    for col in ("codec", "frames/s", "readings/s", "vs binary-v1"):
        table.add_column(col, justify="left" if col == "codec" else "right")
    for name, (_, _, per) in data.items():
        fps = statistics.median(rates[name])
        table.add_row(
            name, f"{fps:,.0f}", f"{fps * per:,.0f}", f"{statistics.median(ratios[name]):.2f}x"
        )
    Console().print(table)


if __name__ == "__main__":
    main()

"""Counters every ingest process keeps and prints: what came in and what became of it.

Readings received end as ``stored``, ``duplicates`` (already stored: redeliveries),
``quarantined`` (a new quarantine row, by reason) or ``quarantine_repeats`` (the same rejected
input as a row already in the quarantine, which only counted it again, by reason): as
``duplicates`` to ``stored``, so ``quarantine_repeats`` to ``quarantined``.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class IngestCounters:
    frames: int = 0
    readings_received: int = 0
    stored: int = 0
    duplicates: int = 0
    batches: int = 0
    db_errors: int = 0
    processing_errors: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    quarantine_repeats: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def received(self, readings: int) -> None:
        """One frame of ``readings`` submitted: ``add`` without its keyword loop (per frame)."""
        with self._lock:
            self.frames += 1
            self.readings_received += readings

    def add_quarantined(self, reasons: dict[str, int]) -> None:
        with self._lock:
            self.quarantined.update(reasons)

    def add_quarantine_repeats(self, reasons: dict[str, int]) -> None:
        with self._lock:
            self.quarantine_repeats.update(reasons)

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    @property
    def quarantine_repeats_total(self) -> int:
        return sum(self.quarantine_repeats.values())

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "frames": self.frames,
                "readings_received": self.readings_received,
                "stored": self.stored,
                "duplicates": self.duplicates,
                "quarantined": dict(self.quarantined),
                "quarantine_repeats": dict(self.quarantine_repeats),
                "batches": self.batches,
                "db_errors": self.db_errors,
                "processing_errors": self.processing_errors,
            }

    def line(self) -> str:
        q = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined.items())) or "none"
        return (
            f"frames={self.frames} readings={self.readings_received} stored={self.stored} "
            f"duplicates={self.duplicates} quarantined={self.quarantined_total} ({q}) "
            f"batches={self.batches} db_errors={self.db_errors}"
            + (f" processing_errors={self.processing_errors}" if self.processing_errors else "")
            + (
                f" quarantine_repeats={self.quarantine_repeats_total}"
                if self.quarantine_repeats
                else ""
            )
        )

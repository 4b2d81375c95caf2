"""Retry delays: one rule for every reconnect, rebind, restart and rewrite loop.

Why one rule: an adapter that reconnects in a tight loop floods a broker or a pump station's
PLC the moment it comes back, and one that waits too long loses readings a gateway cannot hold.
Every loop that retries (an OPC-UA session, a Modbus station, the CoAP bind, the database writer,
the registry watch, a crashed ingest worker) waits ``min_s`` after its first failure, doubles
the wait after each further failure in a row, never waits more than ``max_s``, and starts again
from ``min_s`` after a success.

Jitter (± a share of each delay) keeps many devices that lost the same server from returning in
lock-step. It draws from a private generator, not the ``random`` module's shared state: a retry
in a background thread must not move a sequence someone else seeded (a simulator, a test).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_JITTER = random.Random()


def backoff_delay(failures: int, min_s: float, max_s: float, jitter: float = 0.0) -> float:
    """Seconds to wait after ``failures`` failures in a row (1 → ``min_s``; 0 counts as 1),
    doubling, capped at ``max_s``, then spread by ± ``jitter`` (a share: 0.1 is ± 10 %)."""
    if min_s < 0 or max_s < 0 or not 0.0 <= jitter < 1.0:
        raise ValueError("backoff needs min_s, max_s >= 0 and 0 <= jitter < 1")
    doublings = min(max(failures, 1) - 1, 64)  # 2**64 × any positive min_s is past any cap
    delay = float(min(max_s, min_s * 2.0**doublings))
    if jitter:
        delay *= _JITTER.uniform(1.0 - jitter, 1.0 + jitter)
    return delay


@dataclass
class Backoff:
    """A retry loop's state: failures in a row, and the delay the next one earns.

    ``failed()`` counts a failure and returns the seconds to wait before the next attempt;
    ``succeeded()`` starts again from ``min_s``.
    """

    min_s: float
    max_s: float
    jitter: float = 0.0
    failures: int = field(default=0)

    def __post_init__(self) -> None:
        backoff_delay(1, self.min_s, self.max_s, self.jitter)  # the same checks, at construction

    def failed(self) -> float:
        """Count a failure; the delay to wait before retrying."""
        self.failures += 1
        return backoff_delay(self.failures, self.min_s, self.max_s, self.jitter)

    def succeeded(self) -> None:
        """The next failure waits ``min_s`` again."""
        self.failures = 0

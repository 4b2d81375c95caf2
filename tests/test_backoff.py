"""The one retry rule (``aquameter.backoff``). The loops that use it are tested against their
servers: test_modbus, test_opcua, test_coap, test_registry_reload, test_mqtt_workers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aquameter.backoff import Backoff, backoff_delay


def test_delays_double_from_the_minimum_up_to_the_cap() -> None:
    assert [backoff_delay(k, 0.5, 5.0) for k in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff_delay(0, 0.5, 5.0) == 0.5  # no failure yet reads as the first


def test_a_success_starts_again_from_the_minimum() -> None:
    b = Backoff(0.1, 1.0)
    assert [b.failed() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.succeeded()
    assert b.failures == 0 and b.failed() == 0.1


def test_a_cap_below_the_minimum_wins() -> None:
    assert Backoff(0.5, 0.3).failed() == 0.3


def test_jitter_spreads_each_delay_within_its_share() -> None:
    delays = [backoff_delay(3, 1.0, 60.0, jitter=0.2) for _ in range(500)]
    assert all(3.2 <= d <= 4.8 for d in delays)
    assert (
        max(delays) - min(delays) > 0.8
    )  # spread, not one value: devices do not come back in step


def test_jitter_leaves_the_shared_random_state_alone() -> None:
    """A retry in a background thread must not move a sequence someone else seeded."""
    random.seed(7)
    expected = [random.random() for _ in range(3)]
    random.seed(7)
    for _ in range(50):
        backoff_delay(2, 1.0, 10.0, jitter=0.1)
    assert [random.random() for _ in range(3)] == expected


@pytest.mark.parametrize(
    ("min_s", "max_s", "jitter"), [(-1.0, 1.0, 0.0), (1.0, -1.0, 0.0), (1.0, 2.0, 1.0)]
)
def test_impossible_settings_are_refused_when_built(
    min_s: float, max_s: float, jitter: float
) -> None:
    with pytest.raises(ValueError):
        Backoff(min_s, max_s, jitter)


@given(
    failures=st.integers(min_value=-5, max_value=10_000),
    min_s=st.floats(min_value=0.0, max_value=1e4),
    max_s=st.floats(min_value=0.0, max_value=1e6),
    jitter=st.floats(min_value=0.0, max_value=0.5),
)
def test_any_failure_count_gives_a_finite_delay_within_the_cap(
    failures: int, min_s: float, max_s: float, jitter: float
) -> None:
    d = backoff_delay(failures, min_s, max_s, jitter)
    assert 0.0 <= d <= max_s * (1.0 + jitter) + 1e-9
    assert d >= min(min_s, max_s) * (1.0 - jitter) - 1e-9

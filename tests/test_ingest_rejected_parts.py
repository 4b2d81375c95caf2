"""A message whose codec refuses some of its parts (a wM-Bus telegram with a wrong key among good
ones) keeps the good parts: each refused part is its own quarantine row with its own bytes.

The codec reports such parts in ``rejected`` on the list it returns (``protocols.payloads``'
``Decoded``); the validator reads it with ``getattr``, so a plain list behaves as before."""

from __future__ import annotations

import pytest

import ingest.validate as validate
from ingest.channels import ChannelIndex, ChannelInfo
from ingest.validate import Validator
from protocols.uplink import Frame, PayloadError, Uplink

T0 = 1_767_571_200.0


class _Decoded(list[Uplink]):
    """What a codec returns when it refused some parts of a message."""

    rejected: list[tuple[PayloadError, bytes]]


def _validator() -> Validator:
    index = ChannelIndex(
        [
            ChannelInfo(i, dev, "register", "volume", "m3", "m3", 0.0, 1e9, None, True)
            for i, dev in enumerate(["A", "B"], 1)
        ],
        {},
    )
    return Validator(lambda: index, future_tolerance_s=3600, earliest_epoch=0.0)


def _decoding_to(
    monkeypatch: pytest.MonkeyPatch, good: list[Uplink], bad: list[tuple[PayloadError, bytes]]
) -> None:
    result = _Decoded(good)
    result.rejected = bad

    def decode(*args: object, **kwargs: object) -> list[Uplink]:
        return result

    monkeypatch.setattr(validate, "decode", decode)


def test_refused_parts_are_quarantined_and_the_good_ones_kept(monkeypatch: pytest.MonkeyPatch):
    wrong_key = PayloadError("DECRYPT_FAILED", "MAC mismatch", "B")
    _decoding_to(
        monkeypatch,
        [Uplink("A", "register", [T0], [12.5])],
        [(wrong_key, b"\x2e\x44telegram-B")],
    )
    prepared = _validator().prepare(Frame("wmbus", "gw", b"whole", "wmbus", received_at=T0 + 60))
    assert prepared.values == [12.5] and prepared.channel_ids == [1]
    [row] = prepared.rejections
    assert (row.reason, row.detail, row.device, row.raw, row.readings) == (
        "DECRYPT_FAILED",
        "MAC mismatch",
        "B",
        b"\x2e\x44telegram-B",
        1,
    )


def test_only_refused_parts_leave_only_their_rows(monkeypatch: pytest.MonkeyPatch):
    errors = [
        (PayloadError("DECRYPT_FAILED", "no key", "A"), b"tA"),
        (PayloadError("BAD_CRC", "crc", None), b"tB"),
    ]
    _decoding_to(monkeypatch, [], errors)
    prepared = _validator().prepare(Frame("wmbus", "gw", b"whole", "wmbus", received_at=T0 + 60))
    assert len(prepared) == 0
    assert [(r.reason, r.device, r.raw) for r in prepared.rejections] == [
        ("DECRYPT_FAILED", "A", b"tA"),
        ("BAD_CRC", None, b"tB"),
    ]


def test_a_plain_list_behaves_as_before(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(
        validate, "decode", lambda *a, **k: [Uplink("A", "register", [T0, T0 + 900], [1.0, 2.0])]
    )
    prepared = _validator().prepare(Frame("mqtt", "t", b"x", "json", received_at=T0 + 3600))
    assert (prepared.values, prepared.rejections) == ([1.0, 2.0], [])

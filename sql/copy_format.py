"""PostgreSQL's binary COPY format for readings rows, as numpy sees it.

Both directions use it: ingest builds a whole COPY stream with one numpy assignment per column,
flows read ``COPY … TO STDOUT (FORMAT BINARY)`` back with ``np.frombuffer``. Rows of
(integer, timestamptz, float8, smallint), all NOT NULL, have a fixed width, which is what makes
that possible.
"""

from __future__ import annotations

import numpy as np

PG_EPOCH_S = 946_684_800  # 2000-01-01 in unix seconds: PostgreSQL's timestamp origin
PG_EPOCH_US = PG_EPOCH_S * 1_000_000

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
COPY_HEADER = COPY_SIGNATURE + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"  # flags, extension
COPY_TRAILER = b"\xff\xff"

READING_ROW = np.dtype(
    [
        ("nfields", ">i2"),
        ("l_ch", ">i4"),
        ("ch", ">i4"),
        ("l_ts", ">i4"),
        ("ts", ">i8"),
        ("l_v", ">i4"),
        ("v", ">f8"),
        ("l_q", ">i4"),
        ("q", ">i2"),
    ]
)

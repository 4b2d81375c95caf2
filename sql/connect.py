"""Opening connections the same way everywhere."""

from __future__ import annotations

import os
from typing import Any

import psycopg


def connect(url: str, *, autocommit: bool = False, **kwargs: Any) -> psycopg.Connection:
    """Connect to PostgreSQL/TimescaleDB.

    ``AQUAMETER_DATABASE_PREPARE=false`` turns server-side prepared statements off, needed for
    servers behind a transaction pooler, where connections share one backend session.
    """
    if os.environ.get("AQUAMETER_DATABASE_PREPARE", "true").lower() in ("0", "false", "no"):
        kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(url, autocommit=autocommit, **kwargs)

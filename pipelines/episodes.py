"""Turn per-subject condition series into alert episodes, and merge them with stored alerts.

The domain rule is "one alert per episode, not one per reading": a leak that lasts three weeks is
one alert that opens, is updated while it lasts and closes when it ends. Detectors therefore only
say, for each subject (meter, sensor, pump) and each span of time, whether their condition held
(``active``) and which numbers justify it. This module owns everything about episodes so that every
alert code opens, continues and closes by the same rules:

* **Minimum duration to open.** A condition opens an episode only once it has held, without a
  break, for ``min_duration``; the episode's ``start_ts`` is then the *onset* of that stretch, not
  the moment it was confirmed (a leak confirmed after 24 h started 24 h earlier).
* **Quiet time to close (hysteresis).** An open episode closes only after the condition has been
  absent for ``quiet_time`` without a break; shorter absences are bridged, so a flapping status bit
  is one alert, not fifty. ``end_ts`` is the end of the last span in which the condition held.
* **Identity.** An alert is identified by ``(code, subject_id, start_ts)``. Stored alerts come back
  in as ``previous``; an episode that continues a stored one keeps the stored identity and is
  *updated* (status, end, evidence), never duplicated. Re-running on the same input gives the same
  output, which is what lets flows upsert alerts idempotently.

Conditions frame (input of :func:`find_episodes` and :func:`update_episodes`): one row per subject
and span, ``subject_id`` (String), ``start`` and ``end`` (UTC), ``active`` (Boolean) and any
evidence columns. Spans of one subject must not overlap. Missing data between spans neither opens
nor closes anything; durations are wall-clock time from the first span's start to the last span's
end.

How a detection window meets stored alerts, per subject, with ``window_start`` the earliest span of
that subject in ``conditions``:

* a stored alert that began before the window and was still running at its start (open, or closed at
  or after ``window_start``) is *carried in*: the state machine starts "open" with that identity,
  and its evidence is combined with the window's rows that end after its stored ``last_active``
  (so a re-run does not count the same rows twice);
* stored alerts that began inside the window are recomputed from the window's data; a recomputed
  episode overlapping a stored one takes the stored identity; a stored open alert that the data no
  longer supports is closed at its last active time;
* stored alerts of subjects absent from the window, and closed alerts before it, are returned
  unchanged.

Give detection windows a lookback of at least ``quiet_time`` before the previous run's data end, so
that an absence spanning two runs is seen whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, cast

import polars as pl

from pipelines.schemas import ALERTS, UTC_TS

SchemaDict = dict[str, pl.DataType | type[pl.DataType]]
ALERT_SCHEMA = pl.Schema(cast(SchemaDict, ALERTS))

AggKind = Literal["min", "max", "sum", "first", "last"]

#: Timestamp format inside evidence JSON (seconds precision, UTC).
EVIDENCE_TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

_NULL_TS = pl.lit(None, dtype=UTC_TS)


@dataclass(frozen=True)
class EpisodeParams:
    """When a condition becomes an alert and when the alert ends.

    ``min_duration``: the condition must hold this long without a break before an episode opens
    (zero: the first active span opens it). ``quiet_time``: the condition must be absent this long
    without a break before an open episode closes (zero: the first inactive span closes it).
    """

    min_duration: timedelta = timedelta(0)
    quiet_time: timedelta = timedelta(0)


@dataclass(frozen=True)
class Evidence:
    """One field of an alert's evidence JSON.

    ``column`` is read from the active rows of the episode and reduced with ``agg``; the same
    reduction combines a stored alert's value with new rows, so only reductions that can be
    combined are offered (no mean: give a sum and the duration instead). ``digits`` rounds floats
    so the JSON text is stable. ``dtype`` is Float64 for numbers or String for labels (first/last
    only).
    """

    name: str
    column: str
    agg: AggKind
    digits: int = 6
    dtype: type[pl.DataType] = pl.Float64


def with_spans(
    frame: pl.DataFrame,
    *,
    nominal_step: timedelta,
    max_step: timedelta,
    subject: str = "subject_id",
    ts: str = "ts",
    ts_marks: Literal["end", "start"] = "end",
) -> pl.DataFrame:
    """Add ``start``/``end`` span columns to a per-subject time series (sorted by subject, ts).

    ``ts_marks="end"``: each row describes the period ending at ``ts`` (interval consumption, rates
    averaged since the previous sample). ``"start"``: each row holds from ``ts`` until the next
    sample (sampled states, set-and-hold historians). The span length is the distance to the
    neighbouring sample; a distance above ``max_step`` is a data gap, not a period, and the row gets
    ``nominal_step`` instead, as does a subject with a single row.
    """
    t, subj = pl.col(ts), pl.col(subject)
    # Neighbours within the same subject, by shifting the sorted frame (no per-group hashing).
    back = pl.when(subj == subj.shift(1)).then(t - t.shift(1))
    ahead = pl.when(subj == subj.shift(-1)).then(t.shift(-1) - t)
    first, second = (back, ahead) if ts_marks == "end" else (ahead, back)
    step = pl.coalesce(first, second)
    nominal = pl.lit(nominal_step, dtype=pl.Duration("us"))
    step = (
        pl.when(step.is_null() | (step <= timedelta(0)) | (step > max_step))
        .then(nominal)
        .otherwise(step)
    )
    out = frame.with_columns(_step=step)
    if ts_marks == "end":
        return out.with_columns(start=t - pl.col("_step"), end=t).drop("_step")
    return out.with_columns(start=t, end=t + pl.col("_step")).drop("_step")


def find_episodes(
    conditions: pl.DataFrame,
    params: EpisodeParams,
    evidence: Sequence[Evidence] = (),
    carried: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Episodes found in ``conditions``, one row each.

    Returns ``subject_id, start_ts, last_active_ts, closed, carried`` and one column per evidence
    field. ``carried`` (optional) holds, per subject, a stored episode the window starts inside of:
    ``subject_id, start_ts, last_active_ts, stored_closed`` and the evidence fields; such a
    subject starts in the open state, and its first episode keeps the stored start and combines the
    stored evidence with rows ending after the stored ``last_active_ts``.
    """
    ev_cols = list(dict.fromkeys(e.column for e in evidence))
    cond = conditions.select("subject_id", "start", "end", "active", *ev_cols)
    has_carry = carried is not None and carried.height > 0
    if carried is None:
        carried = _empty_carried(evidence)

    cond = sorted_by_subject(cond, "start")
    min_dur = pl.lit(params.min_duration, dtype=pl.Duration("us"))

    # Run-length structure from the rows where a run starts and ends (filters, no grouping): only
    # subjects with a run long enough to open, or with an episode carried in, can have episodes.
    # Most meters never raise most codes, so the per-run grouping below stays small.
    new_subject = (pl.col("subject_id") != pl.col("subject_id").shift(1)).fill_null(True)
    new_run = (new_subject | (pl.col("active") != pl.col("active").shift(1))).fill_null(True)
    cond = cond.with_columns(_sidx=new_subject.cum_sum(), _new_run=new_run)
    cond = cond.with_columns(_run=pl.col("_new_run").cum_sum())
    last_of_run = (pl.col("_run") != pl.col("_run").shift(-1)).fill_null(True)
    light = pl.concat(
        [
            cond.filter(pl.col("_new_run")).select("_sidx", "subject_id", "active", "start"),
            cond.filter(last_of_run).select("end"),
        ],
        how="horizontal",
    )
    can_open = light.filter(
        pl.col("active") & ((pl.col("end") - pl.col("start")) >= min_dur)
    ).get_column("_sidx")
    if has_carry:
        carried_sidx = (
            light.select("_sidx", "subject_id")
            .unique("_sidx")
            .join(carried.select("subject_id"), on="subject_id", how="semi")
            .get_column("_sidx")
        )
        can_open = pl.concat([can_open, carried_sidx])
    cond = cond.filter(pl.col("_sidx").is_in(can_open.unique().implode()))
    if cond.height == 0:
        return _empty_episodes(evidence)

    if has_carry:
        cond = cond.join(
            carried.select("subject_id", pl.col("last_active_ts").alias("_wm")),
            on="subject_id",
            how="left",
            maintain_order="left",
        )
        fresh: pl.Expr | None = pl.col("_wm").is_null() | (pl.col("end") > pl.col("_wm"))
    else:
        fresh = None

    run_aggs: list[pl.Expr] = [
        pl.col("subject_id").first(),
        pl.col("active").first(),
        pl.col("start").min(),
        pl.col("end").max(),
    ]
    for col in ev_cols:
        for e in evidence:
            if e.column == col:
                src = pl.col(col) if fresh is None else pl.col(col).filter(fresh)
                run_aggs.append(_reduce(src, e.agg).alias(_run_col(e)))
    runs = cond.group_by("_run", maintain_order=True).agg(run_aggs).drop("_run")

    quiet = pl.lit(params.quiet_time, dtype=pl.Duration("us"))
    duration = pl.col("end") - pl.col("start")
    runs = runs.with_columns(
        _seg=(~pl.col("active") & (duration >= quiet)).cast(pl.Int32).cum_sum().over("subject_id")
    )
    runs = runs.join(
        carried.select("subject_id", pl.col("start_ts").alias("_c_start")),
        on="subject_id",
        how="left",
        maintain_order="left",
    ).with_columns(
        _max_seg=pl.col("_seg").max().over("subject_id"),
        _ws=pl.col("start").min().over("subject_id"),
        _carried=pl.col("_c_start").is_not_null() & (pl.col("_seg") == 0),
    )
    opener = pl.col("active") & ((duration >= min_dur) | pl.col("_carried"))
    runs = runs.with_columns(
        _open=pl.when(opener).then(pl.col("start")).min().over("subject_id", "_seg")
    )
    ep_runs = runs.filter(
        pl.col("active") & pl.col("_open").is_not_null() & (pl.col("start") >= pl.col("_open"))
    )
    found = ep_runs.group_by("subject_id", "_seg", maintain_order=True).agg(
        pl.col("_open").first().alias("start_ts"),
        pl.col("end").max().alias("last_active_ts"),
        (pl.col("_seg").first() < pl.col("_max_seg").first()).alias("closed"),
        pl.col("_carried").first().alias("carried"),
        *[_reduce(pl.col(_run_col(e)), e.agg).alias(e.name) for e in evidence],
    )
    found = found.drop("_seg")
    if not has_carry:
        return _cast_episodes(found, evidence)

    # Carried episodes that continue in the window: stored identity, combined evidence.
    stored = carried.rename({c: f"_p_{c}" for c in carried.columns if c != "subject_id"})
    cont = found.filter(pl.col("carried")).join(stored, on="subject_id", how="inner")
    # A stored closed alert stays closed unless the window shows activity after its end.
    no_news = pl.col("_p_stored_closed") & (pl.col("last_active_ts") <= pl.col("_p_last_active_ts"))
    cont = cont.with_columns(
        (pl.col("closed") | no_news).alias("closed"),
        pl.col("_p_start_ts").alias("start_ts"),
        pl.max_horizontal("last_active_ts", "_p_last_active_ts").alias("last_active_ts"),
        *[_combine(e) for e in evidence],
    ).select(found.columns)

    # Carried episodes with no active span in the window: closed if the window shows a quiet
    # stretch long enough, at the earlier of the stored last activity and the window start.
    summary = runs.group_by("subject_id").agg(
        pl.col("_ws").first(), (pl.col("_max_seg").first() >= 1).alias("closed")
    )
    idle = (
        stored.join(
            found.filter(pl.col("carried")).select("subject_id"), on="subject_id", how="anti"
        )
        .join(summary, on="subject_id", how="inner")
        .with_columns(
            pl.col("closed") | pl.col("_p_stored_closed"),
            pl.col("_p_start_ts").alias("start_ts"),
            pl.when(pl.col("closed") & ~pl.col("_p_stored_closed"))
            .then(pl.min_horizontal("_p_last_active_ts", "_ws"))
            .otherwise(pl.col("_p_last_active_ts"))
            .alias("last_active_ts"),
            pl.lit(True).alias("carried"),
            *[pl.col(f"_p_{e.name}").alias(e.name) for e in evidence],
        )
        .select(found.columns)
    )
    fresh_found = found.filter(~pl.col("carried"))
    return _cast_episodes(
        pl.concat([_cast_episodes(f, evidence) for f in (cont, idle, fresh_found)], how="vertical"),
        evidence,
    )


def update_episodes(
    conditions: pl.DataFrame,
    *,
    code: str,
    params: EpisodeParams,
    evidence: Sequence[Evidence] = (),
    previous: pl.DataFrame | None = None,
    severity: str | pl.Expr = "warning",
    accept: pl.Expr | None = None,
) -> pl.DataFrame:
    """Alerts of one ``code``: its stored alerts merged with the episodes in ``conditions``.

    ``accept`` (an expression over the evidence columns) drops newly found episodes that do not
    justify an alert, e.g. a leak whose night flow stays under the floor; carried-in episodes are
    never dropped by it, they were accepted when they opened. ``severity`` is a label or an
    expression over the evidence columns. The result (ALERTS schema) is the full state of this code
    for the stored alerts given plus the window: write it back with an upsert on
    ``(code, subject_id, start_ts)``.
    """
    prev = _previous_of(previous, code)
    # Window start of the subjects that have stored alerts (only those need one).
    windows = (
        conditions.filter(
            pl.col("subject_id").is_in(prev.get_column("subject_id").unique().implode())
        )
        .group_by("subject_id")
        .agg(pl.col("start").min().alias("_ws"))
    )
    prev = prev.join(windows, on="subject_id", how="left")
    before_window = pl.col("_ws").is_not_null() & (pl.col("start_ts") < pl.col("_ws"))
    running_at_window = (pl.col("status") == "open") | (pl.col("end_ts") >= pl.col("_ws"))
    carry_rows = (
        prev.filter(before_window & running_at_window)
        .sort("start_ts")
        .group_by("subject_id", maintain_order=True)
        .last()
    )
    carried = _parse_stored(carry_rows, evidence)

    eps = find_episodes(conditions, params, evidence, carried)
    if accept is not None:
        eps = eps.filter(pl.col("carried") | accept)

    recomputed = prev.filter(pl.col("_ws").is_not_null() & (pl.col("start_ts") >= pl.col("_ws")))
    fresh, matched = _inherit_identity(eps.filter(~pl.col("carried")), recomputed)
    eps = pl.concat([eps.filter(pl.col("carried")), fresh], how="vertical")

    key = ["subject_id", "start_ts"]
    dropped = recomputed.join(matched, on=key, how="anti")
    stale_open = _parse_stored(dropped.filter(pl.col("status") == "open"), evidence)
    closed_stale = (
        dropped.filter(pl.col("status") == "open")
        .join(stale_open.select(*key, "last_active_ts"), on=key, how="left")
        .with_columns(
            pl.coalesce("last_active_ts", "start_ts").alias("end_ts"),
            pl.lit("closed").alias("status"),
        )
    )
    kept_stale = dropped.filter(pl.col("status") != "open")
    untouched = prev.join(recomputed.select(key), on=key, how="anti").join(
        carry_rows.select(key), on=key, how="anti"
    )
    parts = [
        untouched.select(ALERTS.keys()),
        closed_stale.select(ALERTS.keys()),
        kept_stale.select(ALERTS.keys()),
        to_alerts(eps, code=code, evidence=evidence, severity=severity),
    ]
    out = pl.concat([p.cast(ALERT_SCHEMA) for p in parts], how="vertical")
    return out.sort("code", "subject_id", "start_ts")


def to_alerts(
    episodes: pl.DataFrame,
    *,
    code: str,
    evidence: Sequence[Evidence] = (),
    severity: str | pl.Expr = "warning",
) -> pl.DataFrame:
    """ALERTS rows for episodes; evidence JSON holds the fields, ``last_active`` and ``duration_h``.

    ``last_active`` is stored even for open alerts: it is the watermark a later run continues from,
    and tells an operator how current an open alert is.
    """
    sev = pl.lit(severity) if isinstance(severity, str) else severity
    fields: list[pl.Expr] = []
    for e in evidence:
        col = pl.col(e.name)
        if e.dtype == pl.Float64:
            col = pl.when(col.is_finite()).then(col.round(e.digits))
        fields.append(col.alias(e.name))
    fields.append(pl.col("last_active_ts").dt.to_string(EVIDENCE_TS_FORMAT).alias("last_active"))
    hours = (pl.col("last_active_ts") - pl.col("start_ts")).dt.total_seconds() / 3600.0
    fields.append(hours.round(3).alias("duration_h"))
    out = episodes.select(
        pl.lit(code).alias("code"),
        pl.col("subject_id"),
        pl.col("start_ts"),
        pl.when(pl.col("closed"))
        .then(pl.col("last_active_ts"))
        .otherwise(_NULL_TS)
        .alias("end_ts"),
        pl.when(pl.col("closed")).then(pl.lit("closed")).otherwise(pl.lit("open")).alias("status"),
        sev.alias("severity"),
        pl.struct(fields).struct.json_encode().alias("evidence"),
    )
    return out.cast(ALERT_SCHEMA)


def sorted_by_subject(frame: pl.DataFrame, time_col: str) -> pl.DataFrame:
    """The frame sorted by ``subject_id`` and ``time_col``.

    Checking the order is much cheaper than sorting 28 M rows again, and callers nearly always
    pass sorted data (prepared intervals, database order).
    """
    subject, t = pl.col("subject_id"), pl.col(time_col)
    in_order = (subject > subject.shift(1)) | ((subject == subject.shift(1)) & (t >= t.shift(1)))
    if frame.height < 2 or frame.select(in_order.fill_null(True).all()).item():
        return frame
    return frame.sort("subject_id", time_col)


# --- internals ---------------------------------------------------------------------------------


def _reduce(col: pl.Expr, agg: AggKind) -> pl.Expr:
    if agg == "min":
        return col.min()
    if agg == "max":
        return col.max()
    if agg == "sum":
        return col.sum()
    if agg == "first":
        return col.drop_nulls().first()
    return col.drop_nulls().last()


def _combine(e: Evidence) -> pl.Expr:
    """Stored value of a carried episode combined with the window's value, per reduction."""
    new, old = pl.col(e.name), pl.col(f"_p_{e.name}")
    if e.agg == "min":
        return pl.min_horizontal(new, old).alias(e.name)
    if e.agg == "max":
        return pl.max_horizontal(new, old).alias(e.name)
    if e.agg == "sum":
        return (new.fill_null(0.0) + old.fill_null(0.0)).alias(e.name)
    if e.agg == "first":
        return pl.coalesce(old, new).alias(e.name)
    return pl.coalesce(new, old).alias(e.name)


def _run_col(e: Evidence) -> str:
    return f"_r_{e.name}"


def _episode_schema(evidence: Sequence[Evidence]) -> SchemaDict:
    schema: SchemaDict = {
        "subject_id": pl.String,
        "start_ts": UTC_TS,
        "last_active_ts": UTC_TS,
        "closed": pl.Boolean,
        "carried": pl.Boolean,
    }
    schema.update({e.name: e.dtype for e in evidence})
    return schema


def _empty_episodes(evidence: Sequence[Evidence]) -> pl.DataFrame:
    return pl.DataFrame(schema=_episode_schema(evidence))


def _cast_episodes(frame: pl.DataFrame, evidence: Sequence[Evidence]) -> pl.DataFrame:
    schema = _episode_schema(evidence)
    return frame.select(schema.keys()).cast(pl.Schema(schema))


def _empty_carried(evidence: Sequence[Evidence]) -> pl.DataFrame:
    schema: SchemaDict = {
        "subject_id": pl.String,
        "start_ts": UTC_TS,
        "last_active_ts": UTC_TS,
        "stored_closed": pl.Boolean,
    }
    schema.update({e.name: e.dtype for e in evidence})
    return pl.DataFrame(schema=schema)


def _previous_of(previous: pl.DataFrame | None, code: str) -> pl.DataFrame:
    if previous is None or previous.height == 0:
        return pl.DataFrame(schema=ALERT_SCHEMA)
    return previous.select(ALERTS.keys()).cast(ALERT_SCHEMA).filter(pl.col("code") == code)


def _parse_stored(rows: pl.DataFrame, evidence: Sequence[Evidence]) -> pl.DataFrame:
    """Stored alerts back into episode columns: identity, last activity and evidence fields."""
    ev = pl.col("evidence")
    last = ev.str.json_path_match("$.last_active").str.to_datetime(
        EVIDENCE_TS_FORMAT, time_zone="UTC", time_unit="us", strict=False
    )
    cols: list[pl.Expr] = [
        pl.col("subject_id"),
        pl.col("start_ts"),
        pl.coalesce(last, pl.col("end_ts"), pl.col("start_ts")).alias("last_active_ts"),
        (pl.col("status") == "closed").alias("stored_closed"),
    ]
    for e in evidence:
        raw = ev.str.json_path_match(f"$.{e.name}")
        cols.append(
            (raw.cast(pl.Float64, strict=False) if e.dtype == pl.Float64 else raw).alias(e.name)
        )
    return rows.select(cols)


def _inherit_identity(
    fresh: pl.DataFrame, recomputed: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Give recomputed episodes the identity of the stored alert they overlap (earliest wins).

    Returns the episodes with adjusted ``start_ts`` and the stored keys that found a match.
    """
    key_schema: SchemaDict = {"subject_id": pl.String, "start_ts": UTC_TS}
    if fresh.height == 0 or recomputed.height == 0:
        return fresh, pl.DataFrame(schema=key_schema)
    e = fresh.with_row_index("_e").with_columns(
        pl.when(pl.col("closed")).then(pl.col("last_active_ts")).alias("_e_end")
    )
    p = recomputed.select(
        "subject_id",
        pl.col("start_ts").alias("_p_start"),
        pl.when(pl.col("status") == "closed").then(pl.col("end_ts")).alias("_p_end"),
    )
    pairs = (
        e.select("_e", "subject_id", "start_ts", "_e_end")
        .join(p, on="subject_id", how="inner")
        .filter(
            (pl.col("_p_end").is_null() | (pl.col("start_ts") <= pl.col("_p_end")))
            & (pl.col("_e_end").is_null() | (pl.col("_p_start") <= pl.col("_e_end")))
        )
        .sort("_e", "_p_start")
        .group_by("_e", maintain_order=True)
        .first()
        .sort("start_ts")
        .group_by("subject_id", "_p_start", maintain_order=True)
        .first()
        .select("_e", "_p_start")
    )
    out = (
        e.join(pairs, on="_e", how="left")
        .with_columns(pl.coalesce("_p_start", "start_ts").alias("start_ts"))
        .drop("_e", "_e_end", "_p_start")
    )
    matched = pairs.join(e.select("_e", "subject_id"), on="_e").select(
        "subject_id", pl.col("_p_start").alias("start_ts")
    )
    return out, matched.cast(pl.Schema(key_schema))

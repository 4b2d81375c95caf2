"""The analytics rules of ``pipelines``/``dma`` written again in plain pandas, as a baseline.

``bench/analytics.py`` runs these next to the polars implementations on the same data, asserts that
both give the same rows, and compares speed and memory. The code is what a competent analyst would
write: sorted frames, ``groupby``/``shift``/``cumsum``/``rolling``, categorical meter ids, no
per-row Python loops. It follows the polars modules rule by rule, with their default parameters
(``VeeParams``, ``MeterAnomalyParams``, ``NightFlowParams``), for:

* interval consumption with register rollover (meter exchanges are not covered: the benchmark
  fleet has none);
* VEE: GAP (incl. the trailing gap to ``as_of``), DUPLICATE_TS, FUTURE_TS, BEFORE_INSTALL,
  REGISTER_DECREASE, OVER_Q4, ZERO_CONSUMPTION, SPIKE (with the polars side's candidate rule: only
  intervals above the floor are examined), STATUS_* bits, and the validated interval series
  (VALID / SUSPECT / FAILED);

Like the polars side (and a flow), the caller cleans the reads once (:func:`clean_reads`) and hands
the clean reads to every stage (``clean=`` / ``cleaned=True``), so both sides do the same work.
* meter anomalies LEAK_CONTINUOUS, BURST, REVERSE_FLOW, STUCK_METER, TAMPER, OVER_CAPACITY as
  episodes (minimum duration to open, quiet time to close), without stored alerts;
* minimum night flow per DMA and local night.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from dma.night_flow import NightFlowParams
from pipelines.anomalies import (
    BURST,
    LEAK_CONTINUOUS,
    OVER_CAPACITY,
    QUALITY_REVERSE_FLOW,
    QUALITY_TAMPER,
    REVERSE_FLOW,
    STUCK_METER,
    TAMPER,
    MeterAnomalyParams,
)
from pipelines.consumption import ConsumptionParams
from pipelines.vee import (
    BEFORE_INSTALL,
    DUPLICATE_TS,
    FUTURE_TS,
    GAP,
    OVER_Q4,
    REGISTER_DECREASE,
    SPIKE,
    STATUS_RULES,
    ZERO_CONSUMPTION,
    VeeParams,
)

# (name, column, reduction) of an evidence field, as in pipelines.episodes.Evidence.
EvidenceSpec = tuple[str, str, str]

FAILURE_COLUMNS = ["meter_id", "ts", "rule", "hard", "value"]


# --- interval consumption ---------------------------------------------------------------------


def clean_reads(reads: pd.DataFrame) -> pd.DataFrame:
    """Keys present, finite register, sorted by meter and time, first read per (meter, ts)."""
    r = reads.loc[
        reads["meter_id"].notna() & reads["ts"].notna() & np.isfinite(reads["register"]),
        ["meter_id", "ts", "register", "quality"],
    ]
    r = r.assign(quality=r["quality"].fillna(0).astype("int16"))
    r = r.sort_values(["meter_id", "ts"], kind="stable")
    return r[~r.duplicated(["meter_id", "ts"], keep="first")].reset_index(drop=True)


def interval_consumption(
    reads: pd.DataFrame,
    meters: pd.DataFrame,
    params: ConsumptionParams | None = None,
    *,
    cleaned: bool = False,
) -> pd.DataFrame:
    """Volume between consecutive reads of each meter, a decrease that fits a wrap unwrapped.

    ``cleaned``: ``reads`` are :func:`clean_reads` output already (cleaned once by the caller, as
    the polars side does), so they are not cleaned again."""
    p = params or ConsumptionParams()
    r = reads if cleaned else clean_reads(reads)
    digits = meters.drop_duplicates("meter_id").set_index("meter_id")["register_digits"]
    cap = 10.0 ** r["meter_id"].map(digits).astype("float64").fillna(p.default_register_digits)
    same = r["meter_id"].eq(r["meter_id"].shift())
    prev_ts = r["ts"].shift().where(same)
    diff = r["register"] - r["register"].shift().where(same)
    wrapped = diff + cap
    is_wrap = (diff < 0) & (wrapped <= cap * p.rollover_max_fraction)
    out = pd.DataFrame(
        {
            "meter_id": r["meter_id"],
            "ts": r["ts"],
            "volume": diff.where(~is_wrap, wrapped),
            "quality": r["quality"],
            "flag": "A",
            "prev_ts": prev_ts,
            "interval_s": (r["ts"] - prev_ts).dt.total_seconds(),
            "register": r["register"],
            "rollover": is_wrap,
        }
    )
    return out[prev_ts.notna()].reset_index(drop=True)


# --- VEE ---------------------------------------------------------------------------------------


def _meter_attributes(meters: pd.DataFrame, dmas: pd.DataFrame, p: VeeParams) -> pd.DataFrame:
    m = meters.drop_duplicates("meter_id").set_index("meter_id")
    account = m["account"].astype("object")
    zones = dmas.drop_duplicates("dma_id").set_index("dma_id")["timezone"]
    tz = m["timezone"] if "timezone" in m.columns else m["dma_id"].map(zones)
    return pd.DataFrame(
        {
            "q4_eff": m["q4"].fillna(m["q3"] * p.q4_per_q3),
            "install_date": m["install_date"],
            "active_account": account.notna() & (account.str.strip() != ""),
            "timezone": tz.fillna("UTC"),
        }
    )


def _failures(frame: pd.DataFrame, rule: str, hard: bool | pd.Series, value: Any) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "meter_id": frame["meter_id"].array,
            "ts": frame["ts"].array,
            "rule": rule,
            "hard": hard if isinstance(hard, bool) else hard.to_numpy(),
            "value": np.asarray(value, dtype="float64"),
        }
    )


def _install_utc(attrs: pd.DataFrame) -> pd.Series:
    """Local midnight of the install date as a UTC instant, per meter (a handful of zones)."""
    out = pd.Series(pd.NaT, index=attrs.index, dtype="datetime64[us, UTC]")
    known = attrs[attrs["install_date"].notna()]
    for zone, part in known.groupby("timezone"):
        local = pd.to_datetime(part["install_date"]).dt.tz_localize(
            str(zone), ambiguous=True, nonexistent="shift_forward"
        )
        out.loc[part.index] = local.dt.tz_convert("UTC")
    return out


def validate(
    reads: pd.DataFrame,
    meters: pd.DataFrame,
    dmas: pd.DataFrame,
    *,
    as_of: datetime,
    params: VeeParams | None = None,
    clean: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """All rule failures (meter_id, ts, rule, hard, value), like ``pipelines.vee.validate``;
    ``clean`` is ``clean_reads(reads)`` when the caller has it already."""
    p = params or VeeParams()
    attrs = _meter_attributes(meters, dmas, p)
    as_of_ts = pd.Timestamp(as_of).tz_convert("UTC")
    r = reads[reads["meter_id"].notna() & reads["ts"].notna()]
    r = r.assign(quality=r["quality"].fillna(0).astype("int16")).sort_values(
        ["meter_id", "ts"], kind="stable"
    )
    out: list[pd.DataFrame] = []

    dup_rows = r[r.duplicated(["meter_id", "ts"], keep=False)]
    dup = (
        dup_rows.groupby(["meter_id", "ts"], observed=True)["register"]
        .agg(["size", "nunique"])
        .reset_index()
    )
    out.append(
        _failures(
            dup, DUPLICATE_TS, (dup["nunique"] > 1) & (DUPLICATE_TS in p.hard_rules), dup["size"]
        )
    )

    deduped = r[~r.duplicated(["meter_id", "ts"], keep="first")]
    limit = as_of_ts + pd.Timedelta(seconds=p.future_tolerance_s)
    future = deduped[deduped["ts"] > limit]
    out.append(
        _failures(
            future,
            FUTURE_TS,
            FUTURE_TS in p.hard_rules,
            (future["ts"] - as_of_ts).dt.total_seconds(),
        )
    )

    install = deduped["meter_id"].map(_install_utc(attrs)).astype("datetime64[us, UTC]")
    early = deduped[deduped["ts"] < install]
    out.append(
        _failures(
            early,
            BEFORE_INSTALL,
            BEFORE_INSTALL in p.hard_rules,
            (install[early.index] - early["ts"]).dt.total_seconds(),
        )
    )
    for rule, bit in STATUS_RULES.items():
        hit = deduped[(deduped["quality"].astype("int32") & int(bit)) != 0]
        out.append(_failures(hit, rule, rule in p.hard_rules, hit["quality"]))
    single = pd.concat(out, ignore_index=True)

    usable = _without_hard(reads, single, clean)
    iv = interval_consumption(usable, meters, p.consumption, cleaned=True)
    paired = _interval_rules(iv, usable, attrs, as_of_ts, p)
    failures = pd.concat([single, paired], ignore_index=True)
    return failures.sort_values(["meter_id", "ts", "rule"], kind="stable").reset_index(drop=True)


def _without_hard(
    reads: pd.DataFrame, failures: pd.DataFrame, clean: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Clean reads minus the (meter, ts) that a hard rule failed."""
    if clean is None:
        clean = clean_reads(reads)
    bad = failures.loc[failures["hard"], ["meter_id", "ts"]].drop_duplicates()
    if bad.empty:
        return clean
    marked = clean.merge(bad.assign(_bad=True), on=["meter_id", "ts"], how="left")
    return marked[marked["_bad"].isna()].drop(columns="_bad").reset_index(drop=True)


def _interval_rules(
    iv: pd.DataFrame,
    usable: pd.DataFrame,
    attrs: pd.DataFrame,
    as_of: pd.Timestamp,
    p: VeeParams,
) -> pd.DataFrame:
    step = float(p.interval_s)
    q4 = iv["meter_id"].map(attrs["q4_eff"]).astype("float64")
    out: list[pd.DataFrame] = []

    gaps = iv[iv["interval_s"] > step + p.gap_tolerance_s]
    missing = (np.round(gaps["interval_s"] / step) - 1).clip(lower=1)
    out.append(_failures(gaps, GAP, GAP in p.hard_rules, missing))
    last = usable.groupby("meter_id", observed=True)["ts"].max().reset_index()
    open_s = (as_of - last["ts"]).dt.total_seconds()
    trailing = last[open_s > step + p.gap_tolerance_s].assign(ts=as_of)
    out.append(
        _failures(trailing, GAP, GAP in p.hard_rules, np.floor(open_s[trailing.index] / step))
    )

    decrease = iv[iv["volume"] < -p.decrease_tolerance_m3]
    hard = ~_reverse_flagged(decrease, p) & (REGISTER_DECREASE in p.hard_rules)
    out.append(_failures(decrease, REGISTER_DECREASE, hard, decrease["volume"]))
    over = iv[iv["volume"] > q4 * iv["interval_s"] / 3600 * p.q4_factor]
    out.append(_failures(over, OVER_Q4, OVER_Q4 in p.hard_rules, over["volume"]))

    active = iv["meter_id"].map(attrs["active_account"]).astype("boolean").fillna(True)
    out.append(_zero_runs(iv, active, p))
    out.append(_spikes(iv, p))
    return pd.concat(out, ignore_index=True)


def _reverse_flagged(iv: pd.DataFrame, p: VeeParams) -> pd.Series:
    """The closing read carries the vendor REVERSE_FLOW bit: a decrease that really flowed back."""
    if not p.reverse_flag_explains_decrease:
        return pd.Series(False, index=iv.index)
    return (iv["quality"].astype("int32") & int(STATUS_RULES["STATUS_REVERSE_FLOW"])) != 0


def _zero_runs(iv: pd.DataFrame, active: pd.Series, p: VeeParams) -> pd.DataFrame:
    zero = iv["volume"].abs() <= p.zero_tolerance_m3
    run = (iv["meter_id"].ne(iv["meter_id"].shift()) | zero.ne(zero.shift())).cumsum()
    z = iv[zero & active].assign(run=run)
    runs = z.groupby("run").agg(
        meter_id=("meter_id", "first"),
        ts=("ts", "max"),
        seconds=("interval_s", "sum"),
    )
    runs = runs[runs["seconds"] >= p.zero_days * 86400]
    return _failures(
        runs, ZERO_CONSUMPTION, ZERO_CONSUMPTION in p.hard_rules, runs["seconds"] / 86400
    )


# polars' "nearest" quantile takes the upper sample when q·(n−1) is exactly halfway, pandas' rounds
# half to even. Positions q·(n−1) for q = 0.95 step in 0.05, so this nudge only moves exact ties.
_NEAREST_TIE_UP = 1e-9


def _spikes(iv: pd.DataFrame, p: VeeParams) -> pd.DataFrame:
    """Rate-normalised volume above k × the meter's trailing P95 (14 days, current excluded).

    The same candidate rule as ``pipelines.vee``: only intervals above the absolute floor can be
    spikes, so the trailing window is examined for those alone (see :func:`_spike_rows`); the
    rolling quantile over every interval is the fallback when most intervals clear the floor.
    """
    v = (iv["volume"] * float(p.interval_s) / iv["interval_s"]).to_numpy(dtype="float64")
    window_us = int(pd.Timedelta(p.spike_window) / pd.Timedelta(microseconds=1))
    # Integer microseconds straight from the array (to_numpy() of a zone-aware column would
    # make one Timestamp object per row).
    us = np.asarray(iv["ts"].astype("datetime64[us, UTC]").array.asi8, dtype=np.int64)
    codes = iv["meter_id"].ne(iv["meter_id"].shift()).cumsum().to_numpy(dtype=np.int64)
    lo = int(us.min()) if us.size else 0
    block = (int(us.max()) - lo if us.size else 0) + window_us + 1
    key = (us - lo) + codes * block
    found = _spike_rows(v, key, window_us, p)
    frame = pd.DataFrame({"meter_id": iv["meter_id"], "ts": iv["ts"], "v": v})
    if found is not None:
        rows, pct = found
        hits = frame.iloc[rows].assign(pct=pct)
        return _failures(hits, SPIKE, SPIKE in p.hard_rules, hits["v"])
    pct_all = (
        frame.groupby("meter_id", observed=True, sort=False)
        .rolling(
            pd.Timedelta(p.spike_window),
            on="ts",
            closed="left",
            min_periods=p.spike_min_samples,
        )["v"]
        .quantile(p.spike_quantile + _NEAREST_TIE_UP, interpolation="nearest")
    )
    # groupby().rolling() returns the rows grouped by meter in frame order: frame is sorted by
    # meter already, so the values line up with the rows.
    frame["pct"] = pct_all.to_numpy()
    limit = np.maximum(frame["pct"] * p.spike_k, p.spike_floor_m3)
    hits = frame[frame["pct"].notna() & (frame["v"] > limit)]
    return _failures(hits, SPIKE, SPIKE in p.hard_rules, hits["v"])


# As pipelines.vee: above this share of intervals over the floor, the rolling quantile is cheaper.
_SPIKE_CANDIDATE_SHARE = 0.125


def _spike_rows(
    v: np.ndarray, key: np.ndarray, window_us: int, p: VeeParams
) -> tuple[np.ndarray, np.ndarray] | None:
    """SPIKE rows and their percentile, examining only intervals above the floor.

    With ``n`` earlier values in the window [t − w, t), the "nearest" quantile is the
    ``round(q·(n−1))``-th smallest (halves up); ``pct·k < x`` holds exactly when more window values
    ``w`` than that index have ``w·k < x``. ``key`` increases down the rows with meters further
    apart than the window. None: too many candidates, or non-finite values (use the rolling
    quantile).
    """
    if v.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    cand = np.flatnonzero(v > p.spike_floor_m3)
    if cand.size > _SPIKE_CANDIDATE_SHARE * v.size or not np.isfinite(v).all():
        return None
    if cand.size and not (key[1:] > key[:-1]).all():
        return None
    lo = np.searchsorted(key, key[cand] - window_us, side="left")
    n = cand - lo
    enough = n >= p.spike_min_samples
    cand, lo, n = cand[enough], lo[enough], n[enough]
    x = (n - 1) * p.spike_quantile
    whole = np.floor(x)
    nearest = (whole + (x - whole >= 0.5)).astype(np.int64)
    scaled = v * p.spike_k
    below = np.array(
        [np.count_nonzero(scaled[a:b] < t) for a, b, t in zip(lo, cand, v[cand], strict=True)],
        dtype=np.int64,
    )
    hit = below > nearest
    rows, lo, nearest = cand[hit], lo[hit], nearest[hit]
    pct = np.array(
        [np.partition(v[a:b], i)[i] for a, b, i in zip(lo, rows, nearest, strict=True)],
        dtype=np.float64,
    )
    return rows, pct


def validated_intervals(
    reads: pd.DataFrame,
    meters: pd.DataFrame,
    dmas: pd.DataFrame,
    failures: pd.DataFrame,
    params: VeeParams | None = None,
    clean: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Intervals of the reads that passed the hard rules, with status and rule list."""
    p = params or VeeParams()
    attrs = _meter_attributes(meters, dmas, p)
    iv = interval_consumption(
        _without_hard(reads, failures, clean), meters, p.consumption, cleaned=True
    )
    q4 = iv["meter_id"].map(attrs["q4_eff"]).astype("float64")
    decrease = (
        (iv["volume"] < -p.decrease_tolerance_m3)
        & (REGISTER_DECREASE in p.hard_rules)
        & ~_reverse_flagged(iv, p)
    )
    over = (iv["volume"] > q4 * iv["interval_s"] / 3600 * p.q4_factor) & (OVER_Q4 in p.hard_rules)
    hard = pd.Series(None, index=iv.index, dtype="object")
    hard[over] = OVER_Q4
    hard[decrease] = REGISTER_DECREASE
    soft = failures.loc[~failures["hard"], ["meter_id", "ts", "rule"]].assign(recheck=False)
    rechecked = iv.loc[hard.notna(), ["meter_id", "ts"]].assign(
        rule=hard[hard.notna()], recheck=True
    )
    flagged = pd.concat([soft, rechecked], ignore_index=True)
    flagged["suspect"] = flagged["rule"] != GAP
    grouped = flagged.groupby(["meter_id", "ts"], observed=True).agg(
        vee_rules=("rule", lambda s: ",".join(sorted(set(s)))),
        failed=("recheck", "any"),
        suspect=("suspect", "any"),
    )
    iv = iv.merge(grouped.reset_index(), on=["meter_id", "ts"], how="left")
    failed = iv["failed"].fillna(False).astype(bool)
    suspect = iv["suspect"].fillna(False).astype(bool)
    iv["volume"] = iv["volume"].where(~failed)
    iv["vee_status"] = np.where(failed, "FAILED", np.where(suspect, "SUSPECT", "VALID"))
    iv["vee_rules"] = iv["vee_rules"].fillna("")
    return iv[["meter_id", "ts", "volume", "interval_s", "vee_status", "vee_rules"]]


# --- meter anomalies -----------------------------------------------------------------------------


def prepare_intervals(intervals: pd.DataFrame, p: MeterAnomalyParams) -> pd.DataFrame:
    """Sorted intervals with the span (start, end], hours, rate and the zero-flow flag."""
    f = intervals[["meter_id", "ts", "volume", "quality", "flag"]].sort_values(
        ["meter_id", "ts"], kind="stable"
    )
    f = f.rename(columns={"meter_id": "subject_id"}).reset_index(drop=True)
    same_prev = f["subject_id"].eq(f["subject_id"].shift())
    same_next = f["subject_id"].eq(f["subject_id"].shift(-1))
    back = (f["ts"] - f["ts"].shift()).where(same_prev)
    ahead = (f["ts"].shift(-1) - f["ts"]).where(same_next)
    step = back.fillna(ahead)
    bad = step.isna() | (step <= pd.Timedelta(0)) | (step > p.max_interval)
    step = step.mask(bad, pd.Timedelta(p.interval))
    f["start"] = f["ts"] - step
    f["end"] = f["ts"]
    f["hours"] = step.dt.total_seconds() / 3600.0
    f["rate"] = f["volume"] / f["hours"]
    f["zero"] = f["volume"].abs() <= p.zero_volume_m3
    f["quality"] = f["quality"].fillna(0).astype("int32")
    f["flag"] = f["flag"].fillna("A")
    return f


def find_episodes(
    cond: pd.DataFrame,
    min_duration: pd.Timedelta,
    quiet_time: pd.Timedelta,
    evidence: list[EvidenceSpec],
) -> pd.DataFrame:
    """Episodes of a (subject, start)-sorted condition frame: the rules of pipelines.episodes.

    Runs are stretches of equal ``active``; an active run of at least ``min_duration`` opens an
    episode at its start, an inactive run of at least ``quiet_time`` closes it (later active runs
    in between are bridged into the episode).
    """
    subj = cond["subject_id"]
    new_run = subj.ne(subj.shift()) | cond["active"].ne(cond["active"].shift())
    run = new_run.cumsum()
    spans = cond[["start", "end"]].groupby(run.to_numpy()).agg({"start": "min", "end": "max"})
    heads = cond.loc[new_run, ["subject_id", "active"]].set_index(spans.index)
    runs = pd.concat([heads, spans], axis=1)
    runs["dur"] = runs["end"] - runs["start"]
    opens = runs["active"] & (runs["dur"] >= min_duration)
    candidates = runs.loc[opens, "subject_id"].unique()
    runs = runs[runs["subject_id"].isin(candidates)].copy()
    if runs.empty:
        return _no_episodes(evidence)

    rows = cond[subj.isin(candidates)].assign(_run=run[subj.isin(candidates)])
    rows = rows[rows["active"]]
    # groupby first/min/max skip NaN like the polars reductions; a sum of nothing is 0 in both.
    aggs = {f"_r_{name}": (col, agg) for name, col, agg in evidence}
    per_run = rows.groupby("_run").agg(**aggs) if aggs else pd.DataFrame(index=runs.index[:0])
    runs = runs.join(per_run)

    quiet = ~runs["active"] & (runs["dur"] >= quiet_time)
    runs["seg"] = quiet.astype("int64").groupby(runs["subject_id"], observed=True).cumsum()
    runs["max_seg"] = runs.groupby("subject_id", observed=True)["seg"].transform("max")
    opener_start = runs["start"].where(runs["active"] & (runs["dur"] >= min_duration))
    runs["open"] = opener_start.groupby([runs["subject_id"], runs["seg"]], observed=True).transform(
        "min"
    )
    ep = runs[runs["active"] & runs["open"].notna() & (runs["start"] >= runs["open"])]
    ep_aggs: dict[str, tuple[str, Any]] = {
        "start_ts": ("open", "first"),
        "last_active_ts": ("end", "max"),
        "seg": ("seg", "first"),
        "max_seg": ("max_seg", "first"),
    }
    ep_aggs |= {name: (f"_r_{name}", agg) for name, _, agg in evidence}
    found = ep.groupby(["subject_id", "seg"], observed=True, sort=False).agg(**ep_aggs)
    found["closed"] = found["seg"] < found["max_seg"]
    found = found.reset_index(level="subject_id").reset_index(drop=True)
    return found.drop(columns=["seg", "max_seg"])


def _no_episodes(evidence: list[EvidenceSpec]) -> pd.DataFrame:
    cols = ["subject_id", "start_ts", "last_active_ts", "closed"] + [e[0] for e in evidence]
    return pd.DataFrame(columns=cols)


def _alerts(eps: pd.DataFrame, code: str, evidence: list[EvidenceSpec]) -> pd.DataFrame:
    """ALERTS-like rows; evidence kept as numeric columns ``ev_<name>``."""
    out = pd.DataFrame(
        {
            "code": code,
            "subject_id": eps["subject_id"].astype("object").to_numpy(),
            "start_ts": pd.to_datetime(eps["start_ts"], utc=True).to_numpy(),
            "end_ts": pd.to_datetime(
                eps["last_active_ts"].where(eps["closed"].astype(bool)), utc=True
            ).to_numpy(),
            "status": np.where(eps["closed"].astype(bool), "closed", "open"),
        }
    )
    for name, _, _ in evidence:
        out[f"ev_{name}"] = eps[name].astype("float64").to_numpy()
    return out


def _meter_attr(f: pd.DataFrame, meters: pd.DataFrame, column: str) -> pd.Series:
    return f["subject_id"].map(meters.drop_duplicates("meter_id").set_index("meter_id")[column])


def leak_continuous(f: pd.DataFrame, meters: pd.DataFrame, p: MeterAnomalyParams) -> pd.DataFrame:
    if not p.leak_use_estimated:
        f = f[f["flag"] != "E"]
    tz = _meter_attr(f, meters, "timezone").astype("object").fillna(p.timezone)
    hour = pd.Series(0, index=f.index, dtype="int64")
    for zone in tz.unique():
        sel = tz == zone
        hour[sel] = f.loc[sel, "start"].dt.tz_convert(zone).dt.hour
    if p.night_start_hour <= p.night_end_hour:
        night = (hour >= p.night_start_hour) & (hour < p.night_end_hour)
    else:
        night = (hour >= p.night_start_hour) | (hour < p.night_end_hour)
    cond = pd.DataFrame(
        {
            "subject_id": f["subject_id"],
            "start": f["start"],
            "end": f["end"],
            "active": ~f["zero"],
            "night_rate": f["rate"].where(night),
            "rate": f["rate"],
            "volume": f["volume"],
            "one": 1.0,
        }
    )
    evidence = [
        ("min_night_flow_m3h", "night_rate", "min"),
        ("min_flow_m3h", "rate", "min"),
        ("max_flow_m3h", "rate", "max"),
        ("volume_m3", "volume", "sum"),
        ("intervals", "one", "sum"),
    ]
    eps = find_episodes(
        cond, pd.Timedelta(p.leak_min_duration), pd.Timedelta(p.leak_quiet_time), evidence
    )
    eps = eps[eps["min_night_flow_m3h"].astype("float64") >= p.leak_night_floor_m3h]
    return _alerts(eps, LEAK_CONTINUOUS, evidence)


def burst(f: pd.DataFrame, meters: pd.DataFrame, p: MeterAnomalyParams) -> pd.DataFrame:
    q3 = _meter_attr(f, meters, "q3").astype("float64")
    near = f["rate"] >= p.burst_q3_fraction * q3
    subjects = f.loc[near, "subject_id"].unique()
    sel = f["subject_id"].isin(subjects)
    sub = f[sel].assign(q3=q3[sel], day=f.loc[sel, "end"].dt.tz_convert("UTC").dt.floor("D"))
    daily = sub.groupby(["subject_id", "day"], observed=True)[["volume", "hours"]].sum()
    daily["day_rate"] = daily["volume"] / daily["hours"]
    daily = daily.reset_index()
    trail = (
        daily.groupby("subject_id", observed=True, sort=False)
        .rolling(f"{p.burst_baseline_days}D", on="day", closed="left")["day_rate"]
        .mean()
    )
    daily["baseline"] = trail.to_numpy()
    median = daily.groupby("subject_id", observed=True)["day_rate"].transform("median")
    daily["baseline"] = daily["baseline"].fillna(median)
    sub = sub.merge(daily[["subject_id", "day", "baseline"]], on=["subject_id", "day"], how="left")
    active = (sub["rate"] >= p.burst_q3_fraction * sub["q3"]) & (
        sub["rate"] >= p.burst_k * sub["baseline"]
    )
    cond = sub[["subject_id", "start", "end", "rate", "volume", "baseline", "q3"]].assign(
        active=active.fillna(False).astype(bool), one=1.0
    )
    evidence = [
        ("max_flow_m3h", "rate", "max"),
        ("volume_m3", "volume", "sum"),
        ("baseline_m3h", "baseline", "first"),
        ("q3_m3h", "q3", "first"),
        ("intervals", "one", "sum"),
    ]
    eps = find_episodes(
        cond, pd.Timedelta(p.burst_min_duration), pd.Timedelta(p.burst_quiet_time), evidence
    )
    return _alerts(eps, BURST, evidence)


def reverse_flow(f: pd.DataFrame, meters: pd.DataFrame, p: MeterAnomalyParams) -> pd.DataFrame:
    flagged = (f["quality"] & QUALITY_REVERSE_FLOW) != 0
    cond = pd.DataFrame(
        {
            "subject_id": f["subject_id"],
            "start": f["start"],
            "end": f["end"],
            "active": (f["volume"] < -p.reverse_volume_m3) | flagged,
            "reverse_volume": (-f["volume"]).clip(lower=0.0),
            "volume": f["volume"],
            "flagged": flagged.astype("float64"),
            "one": 1.0,
        }
    )
    evidence = [
        ("reverse_volume_m3", "reverse_volume", "sum"),
        ("min_volume_m3", "volume", "min"),
        ("flagged_intervals", "flagged", "sum"),
        ("intervals", "one", "sum"),
    ]
    eps = find_episodes(cond, pd.Timedelta(0), pd.Timedelta(p.reverse_quiet_time), evidence)
    return _alerts(eps, REVERSE_FLOW, evidence)


def stuck_meter(f: pd.DataFrame, meters: pd.DataFrame, p: MeterAnomalyParams) -> pd.DataFrame:
    account = _meter_attr(f, meters, "account").notna()
    used = f["volume"].clip(lower=0.0).fillna(0.0).groupby(f["subject_id"], observed=True).cumsum()
    cond = pd.DataFrame(
        {
            "subject_id": f["subject_id"],
            "start": f["start"],
            "end": f["end"],
            "active": f["zero"] & (used >= p.stuck_prior_use_m3) & account,
            "used_before": used,
            "one": 1.0,
        }
    )
    evidence = [("used_before_m3", "used_before", "first"), ("zero_intervals", "one", "sum")]
    eps = find_episodes(cond, pd.Timedelta(p.stuck_min_duration), pd.Timedelta(0), evidence)
    return _alerts(eps, STUCK_METER, evidence)


def tamper(f: pd.DataFrame, meters: pd.DataFrame, p: MeterAnomalyParams) -> pd.DataFrame:
    cond = pd.DataFrame(
        {
            "subject_id": f["subject_id"],
            "start": f["start"],
            "end": f["end"],
            "active": (f["quality"] & QUALITY_TAMPER) != 0,
            "one": 1.0,
        }
    )
    evidence = [("flagged_intervals", "one", "sum")]
    eps = find_episodes(cond, pd.Timedelta(0), pd.Timedelta(p.status_quiet_time), evidence)
    return _alerts(eps, TAMPER, evidence)


def over_capacity(f: pd.DataFrame, meters: pd.DataFrame, p: MeterAnomalyParams) -> pd.DataFrame:
    q4 = _meter_attr(f, meters, "q4").astype("float64")
    cond = pd.DataFrame(
        {
            "subject_id": f["subject_id"],
            "start": f["start"],
            "end": f["end"],
            "active": (f["volume"] > p.over_capacity_factor * q4 * f["hours"]).fillna(False),
            "volume": f["volume"],
            "rate": f["rate"],
            "q4": q4,
            "one": 1.0,
        }
    )
    evidence = [
        ("max_volume_m3", "volume", "max"),
        ("max_flow_m3h", "rate", "max"),
        ("q4_m3h", "q4", "first"),
        ("intervals", "one", "sum"),
    ]
    eps = find_episodes(cond, pd.Timedelta(0), pd.Timedelta(0), evidence)
    return _alerts(eps, OVER_CAPACITY, evidence)


DETECTORS = {
    LEAK_CONTINUOUS: leak_continuous,
    BURST: burst,
    REVERSE_FLOW: reverse_flow,
    STUCK_METER: stuck_meter,
    TAMPER: tamper,
    OVER_CAPACITY: over_capacity,
}


def detect_meter_anomalies(
    intervals: pd.DataFrame, meters: pd.DataFrame, params: MeterAnomalyParams | None = None
) -> pd.DataFrame:
    """The six covered codes on all meters at once."""
    p = params or MeterAnomalyParams()
    f = prepare_intervals(intervals, p)
    parts = [detect(f, meters, p) for detect in DETECTORS.values()]
    return pd.concat(parts, ignore_index=True).sort_values(
        ["code", "subject_id", "start_ts"], kind="stable"
    )


# --- minimum night flow -------------------------------------------------------------------------


def minimum_night_flow(
    flow: pd.DataFrame, dmas: pd.DataFrame, params: NightFlowParams | None = None
) -> pd.DataFrame:
    """Lowest rolling 1-h mean of net inflow inside the local night window, per DMA and night.

    Windows start at each sample and look forward, ``[t, t + 1 h)``. pandas' time-based rolling
    only looks back, so each DMA's series is rolled on a reversed clock (``T - ts``), where the
    forward window becomes the usual backward window ``(u - 1 h, u]``.
    """
    p = params or NightFlowParams()
    if p.night_start >= p.night_end:
        raise NotImplementedError("the reference covers night windows within one local day")
    f = flow[flow["flow_m3h"].notna() & np.isfinite(flow["flow_m3h"])]
    f = f.groupby(["dma_id", "ts"], observed=True)["flow_m3h"].mean().reset_index()
    zones = dmas.drop_duplicates("dma_id").set_index("dma_id")["timezone"]
    window_s = p.window.total_seconds()
    out = []
    for dma_id, s in f.groupby("dma_id", observed=True):
        zone = zones.get(dma_id)
        if zone is None:
            continue
        s = s.sort_values("ts")
        step_s = s["ts"].diff().dt.total_seconds()
        step_s = step_s[step_s > 0].median()
        rev = s.iloc[::-1]
        clock = pd.Timestamp("2000-01-01") + (s["ts"].max() - rev["ts"])
        rolled = rev.set_axis(pd.DatetimeIndex(clock))["flow_m3h"].rolling(p.window)
        w = pd.DataFrame(
            {
                "ts": rev["ts"].to_numpy(),
                "mnf_m3h": rolled.mean().to_numpy(),
                "n": rolled.count().to_numpy(),
            }
        ).iloc[::-1]
        w["mnf_end_ts"] = w["ts"] + p.window
        local_start = w["ts"].dt.tz_convert(zone).dt.tz_localize(None)
        local_end = w["mnf_end_ts"].dt.tz_convert(zone).dt.tz_localize(None)
        night = local_start.dt.normalize()
        covered = w["n"] * (window_s if pd.isna(step_s) else step_s) >= (
            p.min_window_coverage * window_s
        )
        valid = (
            (local_start >= night + pd.Timedelta(_since_midnight(p.night_start)))
            & (local_end <= night + pd.Timedelta(_since_midnight(p.night_end)))
            & covered
        )
        w = w.assign(night_date=night.dt.date, local_start=local_start)[valid]
        w = w.sort_values(["night_date", "mnf_m3h", "ts"], kind="stable")
        best = w.groupby("night_date").agg(
            mnf_m3h=("mnf_m3h", "first"),
            mnf_start_ts=("ts", "first"),
            mnf_end_ts=("mnf_end_ts", "first"),
            mnf_hour=("local_start", lambda x: x.iloc[0].hour),
            windows=("ts", "size"),
        )
        out.append(best.reset_index().assign(dma_id=dma_id))
    cols = ["dma_id", "night_date", "mnf_m3h", "mnf_start_ts", "mnf_end_ts", "mnf_hour", "windows"]
    if not out:
        return pd.DataFrame(columns=cols)
    return pd.concat(out, ignore_index=True)[cols].sort_values(["dma_id", "night_date"])


def _since_midnight(t: Any) -> pd.Timedelta:
    return pd.Timedelta(hours=t.hour, minutes=t.minute, seconds=t.second)

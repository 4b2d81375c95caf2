-- Results of the analytics flows (flows/), shaped like what the pure functions in pipelines/ and
-- dma/ return. Every table is written idempotently: a re-run replaces rows by key, never adds a
-- second copy. Local dates are the DMA's calendar (its IANA time zone); instants are UTC.

-- One row per DMA and local day: inflow, minimum night flow and its hour, legitimate night use
-- (measured + allowances), net night flow, the FAVAD night-day factor and daily real losses
-- (dma.daily.DMA_DAILY). The night belongs to the local day it falls in.
CREATE TABLE dma_daily (
    dma_id              text NOT NULL REFERENCES dmas (id),
    day                 date NOT NULL,
    day_hours           double precision NOT NULL,
    inflow_m3           double precision,
    inflow_coverage     double precision,
    mnf_m3h             double precision,
    mnf_hour            smallint,
    mnf_start_ts        timestamptz,
    lnu_measured_m3h    double precision,
    lnu_unreported_m3h  double precision,
    lnu_allowance_m3h   double precision,
    lnu_m3h             double precision,
    nnf_m3h             double precision,
    ndf_h               double precision,
    ndf_source          text,
    real_loss_m3        double precision,
    meters_expected     integer,
    meters_reporting    integer,
    reporting_share     double precision,
    computed_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dma_id, day)
);

-- Alert episodes (pipelines.schemas.ALERTS): one row per episode, opened, updated and closed in
-- place. (code, subject_id, start_ts) is the identity the episode logic keeps across runs.
CREATE TABLE alerts (
    id          bigserial PRIMARY KEY,
    code        text NOT NULL,
    subject_id  text NOT NULL,
    start_ts    timestamptz NOT NULL,
    end_ts      timestamptz,
    status      text NOT NULL CHECK (status IN ('open', 'closed')),
    severity    text NOT NULL,
    evidence    jsonb NOT NULL DEFAULT '{}',
    opened_at   timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT alerts_episode UNIQUE (code, subject_id, start_ts)
);
CREATE INDEX alerts_subject ON alerts (subject_id, code);
CREATE INDEX alerts_open ON alerts (code) WHERE status = 'open';

-- Bill determinants per service point (meter) and billing period, versioned: a recomputation that
-- changes what is billed adds version n+1 that replaces version n; one that changes nothing adds
-- nothing (pipelines.billing.DETERMINANTS + VERSION_COLUMNS). Periods are local dates, inclusive.
CREATE TABLE billing_volumes (
    meter_id           text NOT NULL,
    period_start       date NOT NULL,
    period_end         date NOT NULL,
    version            integer NOT NULL,
    account            text,
    dma_id             text,
    timezone           text,
    start_utc          timestamptz,
    end_utc            timestamptz,
    period_days        integer,
    period_hours       double precision,
    opening_register   double precision,
    opening_read_type  text NOT NULL CHECK (opening_read_type IN ('ACTUAL', 'ESTIMATED', 'MISSING')),
    closing_register   double precision,
    closing_read_type  text NOT NULL CHECK (closing_read_type IN ('ACTUAL', 'ESTIMATED', 'MISSING')),
    volume             double precision,
    unit               text NOT NULL DEFAULT 'm3',
    estimated_m3       double precision,
    edited_m3          double precision,
    estimated_share    double precision,
    flags              text[] NOT NULL DEFAULT '{}',
    methods            text[] NOT NULL DEFAULT '{}',
    exchanges          integer NOT NULL DEFAULT 0,
    vee_status         text NOT NULL CHECK (vee_status IN ('VALID', 'SUSPECT', 'INCOMPLETE')),
    vee_rules          text[] NOT NULL DEFAULT '{}',
    hold               boolean NOT NULL DEFAULT false,
    hold_codes         text[] NOT NULL DEFAULT '{}',
    charge_lines       jsonb NOT NULL DEFAULT '[]',
    charge_total       double precision,
    reason             text NOT NULL CHECK (reason IN ('INITIAL', 'LATE_READS', 'CORRECTION')),
    replaces_version   integer,
    changed_columns    text[] NOT NULL DEFAULT '{}',
    computed_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, period_start, period_end, version),
    CHECK (period_end >= period_start),
    CHECK (replaces_version IS NULL OR replaces_version < version)
);
CREATE INDEX billing_volumes_period ON billing_volumes (period_start, period_end);

-- What the billing system reads: the latest version of every meter and period, and whether it
-- replaces a version issued before (billing then cancels that one and rebills).
CREATE VIEW billing_export AS
SELECT DISTINCT ON (b.meter_id, b.period_start, b.period_end)
       b.meter_id, b.account, b.dma_id, b.period_start, b.period_end, b.version,
       b.replaces_version IS NOT NULL AS is_replacement, b.replaces_version, b.reason,
       b.opening_register, b.opening_read_type, b.closing_register, b.closing_read_type,
       b.volume, b.unit, b.estimated_m3, b.edited_m3, b.estimated_share, b.flags, b.methods, b.vee_status, b.vee_rules,
       b.hold, b.hold_codes, b.charge_lines, b.charge_total, b.changed_columns, b.computed_at
FROM billing_volumes b
ORDER BY b.meter_id, b.period_start, b.period_end, b.version DESC;

-- IWA/AWWA water balance per DMA and period (dma.water_balance): every component with its value
-- and whether it was measured or estimated, and the summary (NRW, CARL, UARL, ILI) beside it.
-- period_end is exclusive (the local date after the last day).
CREATE TABLE water_balance (
    dma_id        text NOT NULL REFERENCES dmas (id),
    period        text NOT NULL,
    component     text NOT NULL,
    period_start  date NOT NULL,
    period_end    date NOT NULL,
    value_m3      double precision,
    source        text NOT NULL CHECK (source IN ('measured', 'estimated')),
    computed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dma_id, period, component)
);

CREATE TABLE water_balance_summary (
    dma_id                     text NOT NULL REFERENCES dmas (id),
    period                     text NOT NULL,
    period_start               date NOT NULL,
    period_end                 date NOT NULL,
    period_days                double precision,
    siv_m3                     double precision,
    siv_coverage               double precision,
    billed_authorized_m3       double precision,
    billed_metered_estimated_share double precision,
    nrw_m3                     double precision,
    nrw_pct                    double precision,
    carl_m3                    double precision,
    carl_l_per_connection_day  double precision,
    avg_pressure_m             double precision,
    uarl_l_per_day             double precision,
    uarl_m3                    double precision,
    ili                        double precision,
    uarl_within_validity       boolean,
    computed_at                timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dma_id, period)
);

-- Read rate (抄表率) per local day, DMA, gateway and vendor: reads expected from the installed
-- meters versus reads received (each meter counted at most up to what it was expected to send).
-- gateway is 'direct' for meters that reach the head-end without a concentrator.
CREATE TABLE read_rates (
    day             date NOT NULL,
    dma_id          text NOT NULL,
    gateway         text NOT NULL,
    vendor_id       text NOT NULL,
    meters          integer NOT NULL,
    meters_silent   integer NOT NULL,
    expected_reads  bigint NOT NULL,
    received_reads  bigint NOT NULL,
    rate            double precision,
    computed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, dma_id, gateway, vendor_id)
);

-- Manual edits of interval volumes and their audit (pipelines.editing): a clerk records an edit,
-- the billing flow applies it and fills in what the value was before, or why it could not apply.
CREATE TABLE meter_edits (
    id             bigserial PRIMARY KEY,
    meter_id       text NOT NULL,
    ts             timestamptz NOT NULL,
    new_volume     double precision NOT NULL,
    edited_by      text NOT NULL,
    edited_at      timestamptz NOT NULL DEFAULT now(),
    reason         text NOT NULL,
    status         text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'applied', 'rejected')),
    old_volume     double precision,
    old_flag       text,
    old_method     text,
    reject_reason  text,
    applied_at     timestamptz
);
CREATE INDEX meter_edits_meter_ts ON meter_edits (meter_id, ts);

-- Late-data tracking: which unit (flow, subject, local day) was computed when, for data up to
-- which instant (as_of) and from which inputs (a fingerprint of the ingest_days rows it read).
-- A unit is recomputed when its inputs changed or when it was computed before its day was over.
CREATE TABLE analysis_marks (
    flow         text NOT NULL,
    subject_id   text NOT NULL,
    day          date NOT NULL,
    computed_at  timestamptz NOT NULL,
    as_of        timestamptz NOT NULL,
    inputs       text NOT NULL,
    PRIMARY KEY (flow, subject_id, day)
);

-- Flows read ingest_days by day range across all channels of a subject kind.
CREATE INDEX ingest_days_day ON ingest_days (day);

-- Meter classes (issue 11): what is normal for a meter depends on what it serves. A building's
-- flow never stops, so the single-dwelling leak rule (no zero interval for 24 h) would flag every
-- one; its class makes pipelines.anomalies judge it against its own night floor instead.
ALTER TABLE meters ADD COLUMN meter_class text NOT NULL DEFAULT 'residential'
    CHECK (meter_class IN ('residential', 'multi_dwelling', 'commercial', 'industrial', 'bulk'));

-- Per-class settings from the registry ([[meter_class]]): anomaly parameters that differ from the
-- defaults in code, and the alert codes that hold a bill (NULL: the default for the class).
-- Rewritten by every `devices sync`; a class without a row uses the defaults.
CREATE TABLE meter_classes (
    id          text PRIMARY KEY
        CHECK (id IN ('residential', 'multi_dwelling', 'commercial', 'industrial', 'bulk')),
    anomaly     jsonb NOT NULL DEFAULT '{}',
    hold_codes  text[],
    updated_at  timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT ON meter_classes TO aquameter_analytics;

-- Why a bill is held, in words, on the bill line: the open alerts that hold it for the meter's
-- class (code and since when) or the incomplete volume.
ALTER TABLE billing_volumes ADD COLUMN hold_reason text;
CREATE OR REPLACE VIEW billing_export AS
SELECT DISTINCT ON (b.meter_id, b.period_start, b.period_end)
       b.meter_id, b.account, b.dma_id, b.period_start, b.period_end, b.version,
       b.replaces_version IS NOT NULL AS is_replacement, b.replaces_version, b.reason,
       b.opening_register, b.opening_read_type, b.closing_register, b.closing_read_type,
       b.volume, b.unit, b.estimated_m3, b.edited_m3, b.estimated_share, b.flags, b.methods, b.vee_status, b.vee_rules,
       b.hold, b.hold_codes, b.charge_lines, b.charge_total, b.changed_columns, b.computed_at,
       b.hold_reason
FROM billing_volumes b
ORDER BY b.meter_id, b.period_start, b.period_end, b.version DESC;

-- Water balance: apparent-loss components per DMA (NULL: the default of WaterBalanceParams) and
-- the AWWA-style validity grade of each balance.
ALTER TABLE dmas
    ADD COLUMN unauthorized_pct_of_siv double precision,
    ADD COLUMN meter_under_registration_pct double precision,
    ADD COLUMN data_handling_pct_of_billed_metered double precision;
ALTER TABLE water_balance DROP CONSTRAINT IF EXISTS water_balance_source_check;
ALTER TABLE water_balance ADD CONSTRAINT water_balance_source_check
    CHECK (source IN ('measured', 'estimated', 'default'));
ALTER TABLE water_balance_summary
    ADD COLUMN validity text,
    ADD COLUMN carl_low_m3 double precision,
    ADD COLUMN carl_high_m3 double precision;

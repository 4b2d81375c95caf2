-- Holiday calendars (issue 11): a public holiday's night looks like a weekend night, so the
-- leak-event detector must judge it with weekend nights, not as a weekday night that "rose".
-- Named calendars from the registry ([[calendar]]), one per region; rewritten by every
-- `devices sync`. A DMA names its calendar (NULL: the calendar 'default', if any) and may add
-- dates of its own.
CREATE TABLE holiday_calendars (
    id          text PRIMARY KEY,
    name        text NOT NULL DEFAULT '',
    holidays    date[] NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT ON holiday_calendars TO aquameter_analytics;

ALTER TABLE dmas
    ADD COLUMN calendar text,
    ADD COLUMN holidays date[] NOT NULL DEFAULT '{}';

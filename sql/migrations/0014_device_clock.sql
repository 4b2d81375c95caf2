-- How a device's own clock keeps time, for frames that carry a wall-clock time without a zone
-- (a wireless M-Bus / OMS date/time record, type F): 'local' (the default, as OMS meters are
-- set) is the wall clock of the device's DMA's zone, 'utc' a device set to UTC. Ingest converts
-- such times to UTC with it (ingest/channels.py); times that carry their zone are not affected.
ALTER TABLE devices ADD COLUMN clock text NOT NULL DEFAULT 'local'
    CONSTRAINT devices_clock_known CHECK (clock IN ('local', 'utc'));
-- Ingest reads the zone with the registry (ChannelIndex.load): a DMA's id and timezone only.
GRANT SELECT (id, timezone) ON dmas TO aquameter_ingest;

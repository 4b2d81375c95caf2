-- The registry's version: bumped by every `devices sync` in the transaction that upserts the
-- registry, which also sends NOTIFY aquameter_registry with the new version. Running ingest
-- workers (ingest.registry_watch) reload their channel index when it changes: at once on the
-- notify, or at their next poll of this row when the notify was missed (reconnect, a pooler).
CREATE TABLE registry_version (
    version    bigint NOT NULL,
    synced_at  timestamptz NOT NULL
);
-- Exactly one row: a unique index on a constant refuses a second one.
CREATE UNIQUE INDEX registry_version_one_row ON registry_version ((true));
INSERT INTO registry_version (version, synced_at) VALUES (0, now());

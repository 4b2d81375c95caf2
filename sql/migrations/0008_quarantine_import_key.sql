-- A re-import must not add its quarantine rows twice: the importer looks rows up by
-- (source, address, reason), address being "<file>#<row>". Not unique on purpose: a unique
-- index would fail a whole batch's COPY, and one duplicate must never cost other rows.
CREATE INDEX IF NOT EXISTS quarantine_import_key ON quarantine (source, address, reason)
    WHERE source = 'import';

-- A meter's class changed by hand in SQL (`UPDATE meters SET meter_class = ...`), not by
-- `devices sync`, makes its analysed days stale the same way the sync does
-- (ingest/registry_sync.py, _invalidate_changed): every meter_anomalies mark of that meter gets
-- '|judged-by-changed' appended, so the next incremental run recomputes it and the next
-- billing_export run follows (a bill's fingerprint includes its alerts and its meter's class).
-- A sync's own class change fires it too; the second append is harmless, since the planner only
-- compares a mark's inputs for equality. Only the owner may UPDATE meters (0006_roles), so the
-- function runs as the caller; its search_path is fixed at the one the migration ran with.
CREATE OR REPLACE FUNCTION aq_meter_class_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE analysis_marks SET inputs = inputs || '|judged-by-changed'
    WHERE flow = 'meter_anomalies' AND subject_id = NEW.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER meters_class_changed
    AFTER UPDATE OF meter_class ON meters
    FOR EACH ROW
    WHEN (OLD.meter_class IS DISTINCT FROM NEW.meter_class)
    EXECUTE FUNCTION aq_meter_class_changed();

-- Secrets out of the database: `devices sync` used to copy a device's DTLS key (`psk`) in plain
-- text into devices.params, readable by every role that may read the registry and kept by every
-- backup. The registry now only names where a key lives (psk_env / psk_file, stored as such);
-- this removes the values older syncs stored (and any inline `password`). Rotate keys that were
-- stored: a backup taken before this migration still holds them.
UPDATE devices SET params = params - 'psk' - 'password'
WHERE params ?| array['psk', 'password'];

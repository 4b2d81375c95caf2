"""Schema, ordered migrations and the few database-side operations everyone shares."""

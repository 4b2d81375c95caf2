"""From frames to canonical readings: decode, validate, normalise, de-duplicate, write with COPY."""

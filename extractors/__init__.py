"""Pure extraction stages over files, arrays and records (no Ray, no Dagster)."""

"""Cohorts: many cases split over jobs (shards, from `--shard I/N` or a scheduler's array variables), each shard's
status file, and what `sslmedsam2 cohort status` reads from them. Used by `pseudolabel` and `predict --input`."""

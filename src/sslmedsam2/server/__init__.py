"""The interactive engine: a long-lived server that keeps SAM2 models and each open volume's slice features, so
that propagating again after an edit runs only the tracking; and its client.

Modules: wire (array encoding, numpy only), tokens (token files), limits (settings, memory budget), jobs (the
worker queue), service (sessions, no HTTP), app (the FastAPI routes), main (`sslmedsam2 serve`), client (requests
only: no torch, no FastAPI) and remote (`sslmedsam2 propagate --server`).
"""

"""`sslmedsam2 serve`: a long-lived server that keeps SAM2 models and each open volume's engine session (slice
features, prompts, last result), so that propagating again after an edit runs only the tracking.

Modules: gate and connections (tokens, limits and deadlines before a route runs), app and schema (the FastAPI routes
and their typed contract), service (sessions and jobs, no HTTP), sessions, jobs (the worker queue), limits
(settings, memory budget), upload (an image's bytes to slices), prompts (the wire's prompt planes), main (the
command). The client is sslmedsam2.remote; the session on top of it sslmedsam2.session.remote.
"""

"""The one engine session: an open volume with its prompts and last result, local (the SAM2 tracker in this
process, slice features kept) or remote (a `sslmedsam2 serve` server, reopened after a restart), with one API.
The command line, the server, the Slicer module and refine's SAM2 step all propagate through it."""

from sslmedsam2.session.base import EngineSession, SessionResult

__all__ = ["EngineSession", "SessionResult"]

"""The thin client of a `sslmedsam2 serve` server: HTTP calls, the wire format of arrays, token files. numpy and
requests only (what a cluster job or the Slicer module needs to reach a server, without torch)."""

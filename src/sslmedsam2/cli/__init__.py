"""The `sslmedsam2` command (command.py): the segmentation commands (segment.py), the study commands (study.py) and
`serve`, each a front door over the engine; the options every command shares (options.py)."""

from sslmedsam2.cli.command import main

__all__ = ["main"]

"""The command line: the only code that prints and chooses exit statuses.

`options` parses the command line once into a typed value, `commands` runs the pipeline
(kvmctl/engine.py) for each command, `report` prints results, `exits` maps errors to exit
statuses, `main` ties them together. The engine never imports this package.
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]

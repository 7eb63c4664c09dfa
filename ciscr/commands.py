"""The registry of ``ciscr`` sub-commands, apart from the CLI so nothing imports in a circle.

``ciscr.cli`` builds the parser and dispatches; the command modules (predict, report, bench,
visualize, export) register their sub-parser and handler here, importing only this module.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]

COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    """Decorator: register ``fn`` as the handler of ``ciscr NAME``."""

    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn

    return register

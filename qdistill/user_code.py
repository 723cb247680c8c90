"""The one place that imports code a user names (`package.module:attribute`): model factories, dataset hooks.

Nothing read from a file reaches it unless the user said `--trust-code` (see `cli.named_code`)."""

from __future__ import annotations

import importlib

from qdistill.errors import QDistillError


def load_object(spec: str, what: str):
    """Import ``package.module:attribute``."""
    if ":" not in spec:
        raise QDistillError(f"{what} must be given as 'package.module:name', got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise QDistillError(f"cannot import {what} module {mod_name!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise QDistillError(f"module {mod_name!r} has no {attr!r} (for the {what} {spec!r})") from None

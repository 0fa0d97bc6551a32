"""Moved to :mod:`flows.audit` (``verify`` and ``lineage``); this shim goes once flows/cli.py imports from there."""
from .audit import *  # noqa: F401,F403

"""Subcommands of the model pipeline: train, calibrate, export, score.

Registered into :mod:`triage.cli` at import time.
"""

from __future__ import annotations

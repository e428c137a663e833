"""The pure core: values in, values out.

Tiers and operating points (one definition of their order), the worklist's
order and ageing, gating rules, drift statistics, metrics, the turnaround
simulation and the error family. Nothing here reads the disk, the database,
the clock or the network, and nothing imports the rest of ``triage``; the
import-linter contracts in ``pyproject.toml`` keep it so.
"""

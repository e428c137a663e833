"""Pixels to model input: loading and gating files, the one MONAI chain, heatmap overlays.

The MONAI chain (:mod:`triage.imaging.transforms`) imports torch; the daemon
runs it only in its decoder processes (:mod:`triage.imaging.prepare`).
"""

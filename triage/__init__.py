"""triage: a DICOM-aware triage daemon for chest radiographs (a triage aid, not for diagnostic use)."""

__version__ = "0.1.0"

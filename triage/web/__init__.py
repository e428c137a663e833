"""The web edge: the worklist, study and history pages, overlays and a small JSON API."""

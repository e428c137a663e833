"""``triage replay``: retrospective validation on a labelled DICOM archive, and the archive builder."""

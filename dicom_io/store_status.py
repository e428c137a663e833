"""The C-STORE statuses triage answers with, and what each means.

Codes follow PS3.4 Annex B (Storage Service Class): A7xx refused for lack of
resources, A900 data set does not match SOP class, Cxxx cannot understand.
The C2xx sub-codes are ours; docs/conformance.md lists them for PACS admins.
"""

from __future__ import annotations

from dataclasses import dataclass

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # low free disk space, or the disk filled while writing
TOO_LARGE = 0xA701  # the data set is larger than dicom.max_dataset_mb
TOO_MANY_PIXELS = 0xA702  # Rows x Columns x Frames above dicom.max_pixels (before decoding)
# The database that records the instance cannot be reached (stopped, restarting, locked):
# PS3.4 B.2.3 gives Storage SCPs no other "temporarily unable" status than Out of
# Resources, which senders treat as "try again later"; Cxxx would tell them the data
# set itself is at fault and that resending it cannot help.
DB_UNAVAILABLE = 0xA703
# Refused: SOP Class not supported (PS3.7 C.4.2.1.4.1). The listener never sees one (its
# presentation contexts refuse the class); a DICOMweb STOW-RS part can carry any class.
SOP_CLASS_NOT_SUPPORTED = 0x0122
DATASET_MISMATCH = 0xA900  # data set does not match the SOP class it was sent as
UNREADABLE = 0xC210  # the data set could not be parsed
UNEXPECTED = 0xC211  # an unexpected error in the handler (pynetdicom uses it too)
BAD_UID = 0xC220  # a required UID is missing or not a valid UID

MEANING = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    TOO_LARGE: "Refused: Out of Resources (data set larger than the configured maximum)",
    TOO_MANY_PIXELS: "Refused: Out of Resources (more pixels than the configured maximum)",
    DB_UNAVAILABLE: "Refused: Out of Resources (the database is unavailable; send again later)",
    SOP_CLASS_NOT_SUPPORTED: "Refused: SOP Class not supported",
    DATASET_MISMATCH: "Error: Data Set does not match SOP Class",
    UNREADABLE: "Error: Cannot understand (data set unreadable)",
    UNEXPECTED: "Error: Cannot understand (unexpected processing failure)",
    BAD_UID: "Error: Cannot understand (missing or invalid UID)",
}


@dataclass(frozen=True)
class Refusal(Exception):
    """A C-STORE we refuse: the status to send and the reason to log."""

    status: int
    reason: str

    def __str__(self) -> str:
        return f"0x{self.status:04X} {self.reason}"

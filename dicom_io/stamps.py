"""Fixed time stamps for built objects, so that building the same object twice gives the same bytes.

highdicom stamps what it builds with the current time (instance creation,
content, secondary capture, contributing equipment). A result's objects are
stamped with the result's own time instead.
"""

from __future__ import annotations

import datetime as _dt

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

_PAIRS = (("InstanceCreationDate", "InstanceCreationTime"), ("ContentDate", "ContentTime"),
          ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"))


def stamp(ds: Dataset, when: _dt.datetime) -> Dataset:
    """Set every creation time stamp of ``ds`` that is present to ``when``; return ``ds``.

    ``when`` is written as local date and time, as modalities write theirs;
    microseconds are dropped.
    """
    when = when.replace(microsecond=0)
    for date_kw, time_kw in _PAIRS:
        if date_kw in ds:
            setattr(ds, date_kw, DA(when.date()))
        if time_kw in ds:
            setattr(ds, time_kw, TM(when.time()))
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)
    return ds

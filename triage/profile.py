"""A site profile: operating points re-fitted on a site's own labelled replay.

``triage site calibrate`` writes one (TOML); the daemon reads it through
``model.site_profile`` and ``triage replay --site-profile`` applies it. A
profile names the model (sha256) it was fitted for and is refused for any
other. Besides the thresholds it carries what the site looked like when it
was fitted: its size, dates, prevalence and score distribution, which the
drift watch then uses as the reference, so the site is compared with itself.

``triage site adapt`` writes a profile with an ``[adaptation]`` table instead:
a site variant of the model (its normalisation statistics re-estimated on the
site's unlabelled images), named by file and sha256, beside the profile. Such a
profile is for the configured model it was adapted from
(``base_model_sha256``); the variant then scores. ``site calibrate`` on a
replay made with it keeps the table, so one profile carries both.
"""

from __future__ import annotations

import datetime as _dt
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triage.core.errors import ConfigError
from triage.files import write_atomic

FORMAT = 1
CARD = "model card"


@dataclass(frozen=True)
class Adaptation:
    """A profile's site variant of the model: its files (resolved) and what it came from."""

    model_path: Path
    card_path: Path
    sha256: str
    base_sha256: str

    def to_table(self, profile_dir: Path) -> dict[str, str]:
        """Return the ``[adaptation]`` keys for a profile written in ``profile_dir``."""
        import os

        return {"model": os.path.relpath(self.model_path, profile_dir.resolve()),
                "card": os.path.relpath(self.card_path, profile_dir.resolve()),
                "model_sha256": self.sha256, "base_model_sha256": self.base_sha256}


@dataclass(frozen=True)
class SiteProfile:
    """The parts of a profile that scoring and drift use; ``raw`` holds the whole file."""

    path: Path
    model_sha256: str
    created: str
    site: str
    thresholds: dict[str, float | None]
    reference_scores: dict[str, list[float]] | None
    prevalence: float | None
    raw: dict[str, Any] = field(default_factory=dict)
    adaptation: Adaptation | None = None

    @property
    def source(self) -> str:
        """How results name where their thresholds came from."""
        name = f" {self.site}" if self.site else ""
        return f"site profile{name} of {self.created[:10]} ({self.path.name})"


def thresholds_source(profile: SiteProfile | None, model_name: str = "", model_sha: str = "",
                      overrides: Sequence[str] = ()) -> str:
    """Return the words results use for where their thresholds came from (at most 128 chars).

    The site profile's when one is applied, else the model card's (named by
    ``model_name`` and ``model_sha`` when given); ``worker.tier_overrides``
    that replace some points are named after it.
    """
    if profile is not None:
        text = profile.source
    elif model_name or model_sha:
        text = f"{CARD} {model_name} (sha256 {model_sha[:12]})".replace("  ", " ")
    else:
        text = CARD
    if overrides:
        text += "; worker.tier_overrides: " + ", ".join(sorted(overrides))
    return text[:128]


def applied_thresholds(card_thresholds: Mapping[str, float | None], profile: SiteProfile | None,
                       overrides: Mapping[str, float]) -> dict[str, float | None]:
    """Return the thresholds scoring uses: the card's, replaced by the profile's, then overrides.

    Raises ConfigError when ``worker.tier_overrides`` names a tier the model does
    not have (suggesting the closest name) or would invert the tiers' order.
    """
    base = {**card_thresholds, **(profile.thresholds if profile is not None else {})}
    check_overrides(base, overrides)
    return {**base, **overrides}


def check_overrides(base: Mapping[str, float | None], overrides: Mapping[str, float]) -> None:
    """Refuse overrides of unknown tiers (with "did you mean") and overrides that would put
    a more urgent tier's threshold at or below a less urgent one's."""
    import difflib

    names = sorted(n for n in base if n != "routine")
    for name in overrides:
        if name in base:
            continue
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"the model's tiers are {', '.join(names)}"
        raise ConfigError(f"config key 'worker.tier_overrides.{name}': the model has no tier "
                          f"{name!r}; {hint}")
    # The card's order, most urgent (highest threshold) first, must survive the overrides.
    points = {n: t for n, t in base.items() if t is not None and n != "routine"}
    order = sorted(points, key=lambda n: -float(points[n] or 0.0))
    merged = {**base, **overrides}
    for upper in order:
        for lower in order:
            if upper not in overrides and lower not in overrides:
                continue
            hi, lo = merged[upper], merged[lower]
            if (float(points[upper] or 0.0) > float(points[lower] or 0.0) and hi is not None
                    and lo is not None and hi <= lo):
                raise ConfigError(
                    f"config key 'worker.tier_overrides': {upper} ({hi:g}) must stay above "
                    f"{lower} ({lo:g}), as in the model's operating points; the order is "
                    + " > ".join(order))


def drift_reference(card: Mapping[str, Any], profile: SiteProfile | None) -> Mapping[str, Any]:
    """Return what the drift watch compares recent scores with.

    The card's validation distributions, or, with a profile that carries them,
    the site's own (its replay's scores, prevalence and per-class scores).
    """
    if profile is None or not profile.reference_scores:
        return card
    raw = profile.raw
    return {**card, "reference_scores": profile.reference_scores,
            "reference_scores_pos": raw.get("reference_scores_pos"),
            "reference_scores_neg": raw.get("reference_scores_neg"),
            "reference_prevalence": profile.prevalence}


def read_profile(path: str | Path, model_sha256: str | None = None) -> SiteProfile:
    """Read a profile; with ``model_sha256``, refuse one made for another model.

    Raises ConfigError with a one-line reason (missing file, bad TOML, missing
    keys, another model's profile).
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"site profile {p}: cannot read it ({e.strerror or e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"site profile {p} is not valid TOML: {e}") from e
    try:
        head = data["profile"]
        # A profile from `site adapt` alone has no points: the card's apply.
        points: dict[str, float | None] = {str(op["name"]): float(op["threshold"])
                                            for op in data.get("operating_points", [])}
        sha = str(head["model_sha256"])
        adaptation = None
        if "adaptation" in data:
            a = data["adaptation"]
            adaptation = Adaptation((p.parent / str(a["model"])).resolve(),
                                    (p.parent / str(a["card"])).resolve(),
                                    str(a["model_sha256"]), str(a["base_model_sha256"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"site profile {p} lacks {e} (write it with `triage site calibrate`)") from e
    if adaptation is not None and adaptation.sha256 != sha:
        raise ConfigError(f"site profile {p}: its points were fitted for model {sha[:12]}, not "
                          f"for its own adapted model {adaptation.sha256[:12]}")
    if model_sha256 is not None and adaptation is not None:
        if adaptation.base_sha256 != model_sha256:
            raise ConfigError(f"site profile {p} adapts model {adaptation.base_sha256[:12]}, not "
                              f"the configured model {model_sha256[:12]}: run `triage site "
                              "adapt` again for this model")
    elif model_sha256 is not None and sha != model_sha256:
        raise ConfigError(f"site profile {p} was fitted for model {sha[:12]}, not for the "
                          f"configured model {model_sha256[:12]}: re-fit it with `triage site "
                          "calibrate` on a replay of this model")
    site = data.get("site", {})
    return SiteProfile(p, sha, str(head.get("created", "")), str(head.get("site", "")), points,
                       data.get("reference_scores"), site.get("prevalence"), data, adaptation)


def write_profile(path: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write a profile document as TOML, readable by the daemon's user only."""
    import tomli_w

    header = ("# triage site profile: what this site's own images changed (operating points\n"
              "# re-fitted on its labelled replay; a model adapted to its unlabelled images).\n"
              "# Written by `triage site calibrate` / `triage site adapt`; see "
              "docs/site-calibration.md.\n")
    return write_atomic(path, header + tomli_w.dumps(_toml_ready(doc)), fsync=True)


def _toml_ready(obj: Any) -> Any:
    """Drop None values (TOML has no null) and turn tuples into lists."""
    if isinstance(obj, Mapping):
        return {str(k): _toml_ready(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_toml_ready(v) for v in obj]
    return obj


def now_iso() -> str:
    """Return the current UTC time as ISO 8601 (seconds)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")

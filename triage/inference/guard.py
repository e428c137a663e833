"""The input guard: which prepared images the model may score, judged before it runs.

Three checks, each with a ``guard.*`` switch (:class:`triage.config.GuardConfig`):

1. population from the header: an age outside the model card's population;
2. population from the image: the guard network's P(adult), when the header
   gives no age or gives a child's. A header that states an age inside the
   population is overruled only by stronger evidence: the card's
   ``adult_child_header`` threshold, chosen so that adults presented with a
   child's age are still refused, by this check or the out-of-distribution
   one, as often as the card states (used only while both the header check
   and the out-of-distribution check run);
3. view from the image: the guard network's P(frontal chest radiograph), when
   the header states no view (or always).

A refused image keeps its decoded metadata and gets a reason a radiologist
reads at a glance; its network input is dropped so the model never scores it.
In "warn" mode the image is scored and the reason starts "scored although".
The daemon, ``triage replay`` and ``triage score`` call :meth:`Guard.judge`
on the same :class:`~triage.imaging.prepare.Prepared` images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from triage.config import GuardConfig
from triage.core.errors import TriageError
from triage.core.gating import format_age, gate_population

log = logging.getLogger(__name__)

# How refusals start, so the drift watch can count them among recent images.
REFUSAL_PREFIXES = ("outside the model's population", "looks like an adult's",
                    "does not look like a frontal", "unlike the radiographs")

# What the shipped model's card says when it names no population (it learned from children).
DEFAULT_POPULATION: dict[str, Any] = {"label": "children", "age_years": [0.0, 17.0]}


class Judged(Protocol):
    """A prepared image as the guard reads and marks it."""

    key: int
    meta: dict[str, Any]
    x: np.ndarray | None
    xg: np.ndarray | None
    reason: str | None


@dataclass(frozen=True)
class Population:
    """Whom the model was made for: an age range in years and its name in words."""

    low: float
    high: float
    label: str

    @classmethod
    def of(cls, card: Mapping[str, Any]) -> Population:
        """Return the population a model card names (the shipped default when it names none)."""
        pop = card.get("population") or DEFAULT_POPULATION
        low, high = (float(v) for v in pop["age_years"])
        return cls(low, high, str(pop.get("label", "children")))


class Guard:
    """The header check and, when its network is configured, the image checks."""

    def __init__(self, cfg: GuardConfig, population: Population, session: Any = None,
                 card: dict[str, Any] | None = None, batch_size: int = 64,
                 ood_session: Any = None) -> None:
        self.cfg, self.population = cfg, population
        self.session, self.card = session, card or {}
        self.ood_session = ood_session
        self.ood_t = float(self.card.get("out_of_distribution", {}).get("threshold", np.inf))
        self.batch_size = batch_size
        th = self.card.get("thresholds", {})
        self.adult_t = float(th.get("adult", 1.0))
        self.adult_child_t = max(self.adult_t, float(th.get("adult_child_header", self.adult_t)))
        self.frontal_t = float(th.get("frontal", 0.0))

    @classmethod
    def load(cls, cfg: GuardConfig, model_card: Mapping[str, Any]) -> Guard:
        """Return the configured guard; the network is loaded only when an image check is on.

        Raises TriageError when the configured guard file or its card is missing or unusable.
        """
        population = Population.of(model_card)
        path = cfg.onnx_path
        if not cfg.image_checks or path is None:
            return cls(cfg, population)
        from triage.inference.model import onnx_session

        card_path = path.with_suffix(".json")
        try:
            card = json.loads(card_path.read_text())
            session = onnx_session(path, cfg.threads)
        except FileNotFoundError as e:
            raise TriageError(f"input guard {e.filename} not found (config key guard.path; "
                              "\"\" turns the image checks off)") from e
        except (OSError, ValueError) as e:
            raise TriageError(f"input guard {path} is not usable: {e}") from e
        except Exception as e:  # onnxruntime raises its own types for a damaged file
            raise TriageError(f"input guard {path} is not usable: {type(e).__name__}") from e
        if "thresholds" not in card or "input" not in card:
            raise TriageError(f"input guard card {card_path} lacks thresholds or input")
        ood_session = None
        ood = card.get("out_of_distribution")
        if cfg.out_of_distribution != "off" and ood:
            ood_path = path.with_name(str(ood["file"]))
            try:
                ood_session = onnx_session(ood_path, cfg.threads)
            except Exception as e:  # a missing or damaged file: say which
                raise TriageError(f"input guard's out-of-distribution graph {ood_path} is not "
                                  f"usable: {type(e).__name__}") from e
        return cls(cfg, population, session, card, ood_session=ood_session)

    @property
    def input_card(self) -> dict[str, Any] | None:
        """The card whose chain the decoder processes run for the guard's input; None when the
        network does not run (``prepare.init``'s second argument)."""
        return self.card if self.session is not None else None

    @property
    def expected_refusal_rate(self) -> float | None:
        """The share of in-population frontal images the network refused on validation, or None
        when it does not run (the drift watch compares recent refusals with it)."""
        if self.session is None:
            return None
        val = self.card.get("validation", {})
        try:
            rate = float(sum(val[k]["value"] for k in ("children_refused_as_adults",
                                                       "frontal_refused_as_not_frontal")))
        except (KeyError, TypeError):
            return None
        ood = self.card.get("out_of_distribution", {}).get("validation", {})
        if self.ood_session is not None and ood.get("n"):
            rate += float(ood.get("refused", 0)) / float(ood["n"])
        return rate

    @property
    def describe(self) -> str:
        """One line for the log: which checks run."""
        c = self.cfg
        net = "off" if self.session is None else f"{self.card.get('name', 'guard')} " \
                                                  f"{str(self.card.get('sha256', ''))[:12]}"
        return (f"input guard: population from header {c.population_header}, from image "
                f"{c.population_from_image}, view from image {c.view_from_image}, out of "
                f"distribution {c.out_of_distribution if self.ood_session else 'off'}; "
                f"network {net}")

    def judge(self, images: Sequence[Judged]) -> None:
        """Mark every image the model must not score (in place): reason set, input dropped."""
        for im in images:
            if im.x is not None:
                self._header(im)
        todo = [im for im in images if im.x is not None and im.xg is not None]
        if self.session is None or not todo:
            return
        adult, frontal, dist = self.scores(np.stack([np.asarray(im.xg) for im in todo]))
        for im, pa, pf, d in zip(todo, adult, frontal, dist, strict=True):
            self._image(im, float(pa), float(pf), float(d))

    def scores(self, xg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (P(adult), P(frontal), out-of-distribution distance) for a batch of guard
        inputs; the distance is 0 when that check does not run."""
        names = ["adult", "frontal", "embedding"] if self.ood_session is not None else \
            ["adult", "frontal"]
        outs = [self.session.run(names, {"image": xg[i:i + self.batch_size]})
                for i in range(0, len(xg), self.batch_size)]
        adult = np.concatenate([o[0] for o in outs]).reshape(-1)
        frontal = np.concatenate([o[1] for o in outs]).reshape(-1)
        if self.ood_session is None:
            return adult, frontal, np.zeros_like(adult)
        emb = np.concatenate([o[2] for o in outs]).astype(np.float32)
        dist = self.ood_session.run(["distance"], {"embedding": emb})[0].reshape(-1)
        return adult, frontal, dist

    def _header(self, im: Judged) -> None:
        mode = self.cfg.population_header
        if mode == "off":
            return
        pop = self.population
        why = gate_population(im.meta.get("patient_age_years"), pop.low, pop.high, pop.label)
        if why is not None:
            self._mark(im, why, mode)

    def _image(self, im: Judged, p_adult: float, p_frontal: float, distance: float = 0.0) -> None:
        view_stated = bool(im.meta.get("view_position"))
        vmode = self.cfg.view_from_image
        if vmode == "always" or (vmode == "when_absent" and not view_stated):
            if p_frontal < self.frontal_t:
                self._mark(im, "does not look like a frontal chest radiograph "
                               f"(input guard, P(frontal) {p_frontal:.2f})", "refuse")
                return
        mode = self.cfg.population_from_image
        if mode != "off" and p_adult >= self.adult_threshold(im.meta.get("patient_age_years")):
            age = im.meta.get("patient_age_years")
            said = "no age in the header" if age is None else f"header says {format_age(float(age))}"
            self._mark(im, f"looks like an adult's radiograph ({said}; model: "
                           f"{self.population.label}; input guard, P(adult) {p_adult:.2f})", mode)
            if im.x is None:
                return
        if self.ood_session is not None and distance >= self.ood_t:
            self._mark(im, "unlike the radiographs the model learned from (input guard, "
                           f"distance {distance:.1f}, limit {self.ood_t:.1f})",
                       self.cfg.out_of_distribution)

    def adult_threshold(self, age: float | None) -> float:
        """Return the P(adult) at which the image overrules the header for this age.

        The card's plain threshold when the header gives no age; its
        ``adult_child_header`` threshold when the header's age lies inside the
        population and both the header check and the out-of-distribution check
        run (the latter's refusals are part of that threshold's guarantee).
        """
        if (age is None or self.cfg.population_header == "off" or self.ood_session is None
                or not self.population.low <= float(age) < self.population.high + 1):
            return self.adult_t
        return self.adult_child_t

    @staticmethod
    def _mark(im: Judged, why: str, mode: str) -> None:
        if mode == "warn":
            if im.reason is None:
                im.reason = f"scored although {why}"
            return
        im.reason, im.x, im.xg = why, None, None


def load_guard(cfg: GuardConfig, model_card: Mapping[str, Any]) -> Guard:
    """Return the configured guard and log which checks run. Raises TriageError."""
    guard = Guard.load(cfg, model_card)
    log.info("%s", guard.describe)
    return guard

"""What the generator draws: the findings, the attributes a caller may fix, :class:`SynthConfig`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from xlip.errors import InputError

SYNTH_FINDINGS: tuple[str, ...] = (
    "Cardiomegaly", "Pleural Effusion", "Consolidation", "Pneumothorax", "Nodule", "Mass", "Edema",
    "Atelectasis", "Support Devices",
)
NO_FINDING = "No Finding"
DEVICES = ("endotracheal tube", "nasogastric tube", "central venous catheter", "pacemaker")
ZONES = ("upper", "middle", "lower")
CM_PER_UNIT = 18.0  # centimetres per anatomy unit (thorax about 28 cm wide)

# Attributes a caller may fix through ``SynthConfig.force``; everything else is sampled.
ATTRIBUTE_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "Cardiomegaly": {"severity": ("moderate", "marked")},
    "Pleural Effusion": {"laterality": ("right", "left", "bilateral"),
                         "size": ("small", "moderate", "large")},
    "Consolidation": {"laterality": ("right", "left"), "zone": ZONES},
    "Pneumothorax": {"laterality": ("right", "left"), "size": ("small", "moderate", "large")},
    "Nodule": {"laterality": ("right", "left"), "zone": ZONES},
    "Mass": {"laterality": ("right", "left"), "zone": ZONES},
    "Edema": {"severity": ("mild", "moderate", "severe")},
    "Atelectasis": {"laterality": ("right", "left", "bilateral"),
                    "pattern": ("plate-like", "basilar")},
    "Support Devices": {"devices": DEVICES},
}


@dataclass
class SynthConfig:
    """What the generator draws.

    Args:
        size: image side in pixels (square images); geometry scales with it.
        prevalence: probability that a study shows each finding, one number for all or a dict
            ``{finding: p}`` (missing findings get 0.2). Co-occurrence is independent.
        normal_fraction: probability that a study is normal (``No Finding``).
        force: per finding, ``True`` (always present), ``False`` (never present) or a dict of
            attributes that makes it present with those attributes fixed, e.g.
            ``{"Pleural Effusion": {"laterality": "left", "size": "large"}}``. See
            :data:`ATTRIBUTE_CHOICES` for the attributes that can be fixed.
        noise: multiplier on the quantum-noise level (0 gives noise-free images).
    """

    size: int = 128
    prevalence: float | dict[str, float] = 0.2
    normal_fraction: float = 0.25
    force: dict[str, bool | dict[str, Any]] = field(default_factory=dict)
    noise: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 32:
            raise InputError(f"SynthConfig.size must be an int >= 32, got {self.size!r}")
        for name, p in self.prevalences().items():
            if not 0.0 <= p < 1.0:
                raise InputError(f"SynthConfig.prevalence[{name!r}] = {p} must be in [0, 1)")
        if not 0.0 <= self.normal_fraction < 1.0:
            raise InputError(f"SynthConfig.normal_fraction = {self.normal_fraction} "
                             "must be in [0, 1)")
        if self.noise < 0:
            raise InputError(f"SynthConfig.noise = {self.noise} must be >= 0")
        _check_names(self.force, "force")
        for name, value in self.force.items():
            if isinstance(value, dict):
                _check_attributes(name, value)
            elif not isinstance(value, bool):
                raise InputError(f"SynthConfig.force[{name!r}] must be True, False or a dict of "
                                 f"attributes, got {value!r}")

    def prevalences(self) -> dict[str, float]:
        """Target marginal prevalence per finding."""
        if isinstance(self.prevalence, dict):
            _check_names(self.prevalence, "prevalence")
            return {f: float(self.prevalence.get(f, 0.2)) for f in SYNTH_FINDINGS}
        return {f: float(self.prevalence) for f in SYNTH_FINDINGS}

    def presence_probabilities(self) -> dict[str, float]:
        """Per-finding draw probability inside an abnormal study, solved so that the marginal
        prevalence matches :meth:`prevalences` (an abnormal study with no draw gets one finding
        chosen in proportion to these probabilities)."""
        prevalences = self.prevalences()
        return dict(_presence_probabilities(tuple(prevalences[f] for f in SYNTH_FINDINGS),
                                            self.normal_fraction))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@lru_cache(maxsize=32)
def _presence_probabilities(prevalences: tuple[float, ...],
                            normal_fraction: float) -> tuple[tuple[str, float], ...]:
    target = [p / (1.0 - normal_fraction) for p in prevalences]
    q = list(target)
    for _ in range(50):  # fixed point of marginal(q) = target
        none = math.prod(1.0 - v for v in q)
        total = sum(q) or 1.0
        q = [min(0.99, t / (1.0 + none / total)) for t in target]
    return tuple(zip(SYNTH_FINDINGS, q))


def _check_names(mapping: dict, what: str) -> None:
    unknown = sorted(set(mapping) - set(SYNTH_FINDINGS))
    if unknown:
        raise InputError(f"SynthConfig.{what}: unknown finding(s) {unknown}; "
                         f"known: {list(SYNTH_FINDINGS)}")


def _check_attributes(name: str, attrs: dict[str, Any]) -> None:
    choices = ATTRIBUTE_CHOICES[name]
    for key, value in attrs.items():
        if key not in choices:
            raise InputError(f"SynthConfig.force[{name!r}]: unknown attribute {key!r}; "
                             f"known: {sorted(choices)}")
        values = value if key == "devices" else [value]
        if key == "devices" and (isinstance(value, str) or not value):
            raise InputError(f"SynthConfig.force[{name!r}]['devices'] must be a non-empty list "
                             f"from {DEVICES}")
        bad = [v for v in values if v not in choices[key]]
        if bad:
            raise InputError(f"SynthConfig.force[{name!r}][{key!r}]: {bad} not in {choices[key]}")

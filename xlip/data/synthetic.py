"""Synthetic chest radiographs with controllable findings and matching free-text reports.

The corpus the demo and the tests pre-train on. Every image is drawn from a random anatomy
(body habitus, lung shape, heart, mediastinum, spine, ribs, clavicles, diaphragm, gastric bubble)
under a random pose and exposure, with zero or more findings painted into it, and every report
describes exactly what was painted. Findings are visible only as local structure in the pixels:
no text is burned in, and the anatomy and exposure variation swamps what a finding does to global
intensity statistics (``tests/test_synthetic.py`` checks this with a logistic regression).

Conventions
    * Images follow the radiological convention: the patient's right is on the image's left. All
      laterality (``"left"``, ``"right"``, ``"bilateral"``) is the patient's side, as in reports.
    * Geometry lives in *anatomy units*: the image spans ``[-1, 1]`` in both directions before the
      per-study pose (scale, rotation, shift) is applied; one unit is about 18 cm, used to state
      sizes in reports. Sizes that the brief gives in pixels (nodule, mass, device lines) are
      relative to ``size`` so any image size works.
    * Determinism: a study depends only on the generator handed to :func:`render_study`. The
      anatomy, exposure and presence draws take a fixed amount from it, every finding gets its own
      stream, so forcing one finding on or off (``SynthConfig.force``) leaves the anatomy and the
      other findings of the same seed unchanged. :func:`synthesize` seeds sample ``i`` of a split
      with ``np.random.default_rng([seed, split_id, i])``, so the worker count changes no byte.
    * Visibility: a finding is only reported when drawn where it can be seen (lesions avoid the
      heart, effusion fluid, the pneumothorax gap and each other); one that fits nowhere is
      dropped from both image and labels.

Public API: :data:`SYNTH_FINDINGS`, :class:`SynthConfig`, :func:`render_study`,
:func:`write_report`, :func:`synthesize`, :func:`montage`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import multiprocessing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

SYNTH_FINDINGS: tuple[str, ...] = (
    "Cardiomegaly",
    "Pleural Effusion",
    "Consolidation",
    "Pneumothorax",
    "Nodule",
    "Mass",
    "Edema",
    "Atelectasis",
    "Support Devices",
)
NO_FINDING = "No Finding"
SPLITS = {"train": 0, "test": 1}
DEVICES = ("endotracheal tube", "nasogastric tube", "central venous catheter", "pacemaker")
ZONES = ("upper", "middle", "lower")
CM_PER_UNIT = 18.0  # centimetres per anatomy unit (thorax about 28 cm wide)

# Attributes a caller may fix through ``SynthConfig.force``; everything else is sampled.
ATTRIBUTE_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "Cardiomegaly": {"severity": ("moderate", "marked")},
    "Pleural Effusion": {
        "laterality": ("right", "left", "bilateral"),
        "size": ("small", "moderate", "large"),
    },
    "Consolidation": {"laterality": ("right", "left"), "zone": ZONES},
    "Pneumothorax": {"laterality": ("right", "left"), "size": ("small", "moderate", "large")},
    "Nodule": {"laterality": ("right", "left"), "zone": ZONES},
    "Mass": {"laterality": ("right", "left"), "zone": ZONES},
    "Edema": {"severity": ("mild", "moderate", "severe")},
    "Atelectasis": {"laterality": ("right", "left", "bilateral"), "pattern": ("plate-like", "basilar")},
    "Support Devices": {"devices": DEVICES},
}
_SIGN = {"right": -1.0, "left": 1.0}  # image x = sign * (distance from the midline)
_STREAMS = SYNTH_FINDINGS  # one random stream per finding


# --------------------------------------------------------------------------------------------
# configuration


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
            raise ValueError(f"SynthConfig.size must be an int >= 32, got {self.size!r}")
        for name, p in self.prevalences().items():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"SynthConfig.prevalence[{name!r}] = {p} must be in [0, 1)")
        if not 0.0 <= self.normal_fraction < 1.0:
            raise ValueError(f"SynthConfig.normal_fraction = {self.normal_fraction} must be in [0, 1)")
        if self.noise < 0:
            raise ValueError(f"SynthConfig.noise = {self.noise} must be >= 0")
        _check_names(self.force, "force")
        for name, value in self.force.items():
            if isinstance(value, dict):
                _check_attributes(name, value)
            elif not isinstance(value, bool):
                raise ValueError(
                    f"SynthConfig.force[{name!r}] must be True, False or a dict of attributes, got {value!r}"
                )

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
        return dict(
            _presence_probabilities(tuple(prevalences[f] for f in SYNTH_FINDINGS), self.normal_fraction)
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@lru_cache(maxsize=32)
def _presence_probabilities(
    prevalences: tuple[float, ...], normal_fraction: float
) -> tuple[tuple[str, float], ...]:
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
        raise ValueError(f"SynthConfig.{what}: unknown finding(s) {unknown}; known: {list(SYNTH_FINDINGS)}")


def _check_attributes(name: str, attrs: dict[str, Any]) -> None:
    choices = ATTRIBUTE_CHOICES[name]
    for key, value in attrs.items():
        if key not in choices:
            raise ValueError(
                f"SynthConfig.force[{name!r}]: unknown attribute {key!r}; known: {sorted(choices)}"
            )
        values = value if key == "devices" else [value]
        if key == "devices" and (isinstance(value, str) or not value):
            raise ValueError(
                f"SynthConfig.force[{name!r}]['devices'] must be a non-empty list from {DEVICES}"
            )
        bad = [v for v in values if v not in choices[key]]
        if bad:
            raise ValueError(f"SynthConfig.force[{name!r}][{key!r}]: {bad} not in {choices[key]}")


# --------------------------------------------------------------------------------------------
# small numerical helpers (all vectorised over the image grid)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: x grows to the right (columns), y downwards (rows)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    x = np.broadcast_to(c[None, :], (size, size))  # (H, W)
    y = np.broadcast_to(c[:, None], (size, size))  # (H, W)
    return x, y


@lru_cache(maxsize=16)
def _stretch_weights(g: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index and weight of every pixel when g samples are stretched over size pixels."""
    t = (np.arange(size) + 0.5) / size * (g - 1)
    i0 = np.clip(np.floor(t).astype(np.intp), 0, g - 2)
    return i0, (t - i0).astype(np.float32)


def _stretch(lattice: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly stretch a (g, g) lattice to (size, size) (elementwise: no BLAS threads)."""
    i0, w = _stretch_weights(lattice.shape[0], size)
    rows = lattice[i0] * (1 - w)[:, None] + lattice[i0 + 1] * w[:, None]  # (size, g)
    return rows[:, i0] * (1 - w) + rows[:, i0 + 1] * w  # (size, size)


def _smooth_noise(rng: np.random.Generator, g: int, size: int) -> np.ndarray:
    """Uniform noise on a g x g lattice, bilinearly stretched to (size, size); values in [0, 1]."""
    return _stretch(rng.random((g, g), dtype=np.float32), size)


def _soft(d: np.ndarray) -> np.ndarray:
    """Anti-aliased inside test: d is a signed distance in pixels, positive inside."""
    return np.clip(d + 0.5, 0.0, 1.0)


def _segment_distance(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> np.ndarray:
    """Euclidean distance from every (x, y) to the segment p0-p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    ex, ey = x - p0[0], y - p0[1]
    t = np.clip((ex * dx + ey * dy) * (1.0 / (dx * dx + dy * dy + 1e-12)), 0.0, 1.0)
    ex, ey = ex - t * dx, ey - t * dy
    return np.sqrt(ex * ex + ey * ey)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding."""
    if sigma < 0.2:
        return img
    r = max(1, int(math.ceil(2.0 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = img.shape
    p = np.pad(img, r, mode="edge")
    rows = sum(k[i] * p[:, i : i + w] for i in range(2 * r + 1))  # (H + 2r, W)
    return sum(k[i] * rows[i : i + h, :] for i in range(2 * r + 1))  # (H, W)


def _catmull_rom(points: list[tuple[float, float]], step: float) -> np.ndarray:
    """Smooth curve through the points, sampled every ``step`` (approximately); returns (N, 2)."""
    p = np.asarray(points, np.float64)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        n = max(2, int(np.linalg.norm(p2 - p1) / step) + 1)
        t = np.linspace(0.0, 1.0, n, endpoint=i == len(p) - 3)[:, None]
        out.append(
            0.5
            * (
                (2 * p1)
                + (-p0 + p2) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
            )
        )
    return np.vstack(out)


# --------------------------------------------------------------------------------------------
# anatomy


@dataclass
class _Lung:
    """One lung field in side-local coordinates: u = distance from the midline, y downwards."""

    uc: float  # centre
    yc: float
    a: float  # half-width
    b: float  # half-height
    box: float  # 0: elliptic base, 1: boxy base (sharper costophrenic angle)
    tilt: float  # the apex sits this much closer to the midline than the base
    dome_top: float  # highest point of the hemidiaphragm
    dome_u: float
    dome_k: float
    hilum: tuple[float, float]
    vessels: int  # which tree of the vessel bank

    def dome(self, u):
        return self.dome_top + self.dome_k * (u - self.dome_u) ** 2

    def radius(self, u, y):
        """Super-ellipse radius: < 1 inside the lung outline (before the diaphragm cut)."""
        dv = (y - self.yc) / self.b
        du = (u - self.uc + self.tilt * np.clip(-dv, 0.0, 1.0)) / self.a
        du2, dv2 = du * du, dv * dv
        r2 = np.sqrt(du2 + dv2)
        r4 = np.sqrt(np.sqrt(du2 * du2 + dv2 * dv2))  # 4-norm: boxier
        return r2 + (self.box * (dv > 0)) * (r4 - r2)

    @property
    def apex(self) -> float:
        return self.yc - self.b

    @property
    def lateral(self) -> float:
        return self.uc + self.a


@dataclass
class _Heart:
    """Cardiomediastinal silhouette: right border (right atrium), left border (aortic knob, left
    ventricle), superior mediastinum; all extents measured from the midline."""

    mw: float  # superior mediastinum half-width
    ra: float  # right heart border extent
    ra_y: float
    ra_h: float
    lv: float  # left heart border extent
    lv_y: float  # level of the widest point
    lv_h: float  # how far the left border curves up towards the hilum
    knob: tuple[float, float, float]  # aortic knob (x, y, r)
    density: float

    def edges(self, y):
        """(right border x, left border x) of the mediastinum at height y (x < 0 is patient right)."""
        mw = self.mw * (1 + 0.2 * np.clip((y + 0.6) / 0.5, 0.0, 1.0))
        below = y > self.lv_y
        t = (y - self.lv_y) / np.where(below, 0.32, self.lv_h)
        left = np.maximum(mw, self.lv * np.sqrt(np.clip(1 - t * t, 0.0, 1.0)))
        kx, ky, kr = self.knob  # a low, vertically stretched bump
        left = np.maximum(left, kx + np.sqrt(np.clip(kr * kr - ((y - ky) / 1.6) ** 2, 0.0, None)) - kr * 0.6)
        t = (y - self.ra_y) / self.ra_h
        right = np.maximum(mw, self.ra * np.sqrt(np.clip(1 - t * t, 0.0, 1.0)))
        return -right, left

    @property
    def top(self) -> float:
        return self.lv_y - self.lv_h


@dataclass
class _Scene:
    """Every number needed to draw one study (anatomy, pose, exposure, findings geometry)."""

    size: int
    scale: float
    angle: float
    shift: tuple[float, float]
    body_w: float
    body_t: float
    lung_air: float
    tissue: float
    lungs: dict[str, _Lung]
    heart: _Heart
    spine: tuple[float, float, float, float]  # centre x, half-width, density, vertebra period
    trachea: tuple[float, float, float]  # centre x, half-width, carina y
    ribs: dict[str, float]
    clavicle_y: float
    bubble: tuple[float, float, float] | None  # x, rx, ry
    vessel_amp: float
    texture: np.ndarray  # (g, g) lattice of the parenchymal texture
    exposure: dict[str, float] = field(default_factory=dict)
    # findings geometry, filled by the planners
    effusion: dict[str, tuple[float, float]] = field(default_factory=dict)  # side -> (level, meniscus)
    pneumothorax: dict[str, Any] = field(default_factory=dict)
    lesions: list[dict[str, Any]] = field(default_factory=list)  # nodule / mass / consolidation
    edema: float = 0.0
    kerley: np.ndarray | None = None  # which Kerley B lines are drawn
    atelectasis: list[dict[str, Any]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)

    @property
    def unit_px(self) -> float:
        """Anatomy units per pixel."""
        return 2.0 / (self.size * self.scale)

    @property
    def px128(self) -> float:
        """One pixel of a 128-px image, in anatomy units (for widths given at 128 px)."""
        return self.unit_px * self.size / 128

    def to_pixels(self, x, y):
        """Anatomy coordinates -> pixel (column, row) coordinates."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        xi = self.scale * (c * x - s * y) + self.shift[0]
        yi = self.scale * (s * x + c * y) + self.shift[1]
        return (xi + 1.0) * self.size / 2.0 - 0.5, (yi + 1.0) * self.size / 2.0 - 0.5

    def anatomy_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy coordinates (X, Y) of every pixel, each (H, W)."""
        px, py = _grid(self.size)
        c, s = math.cos(self.angle), math.sin(self.angle)
        gx, gy = px - self.shift[0], py - self.shift[1]
        return (c * gx + s * gy) / self.scale, (-s * gx + c * gy) / self.scale

    def fluid_top(self, side: str, u):
        """y of the effusion surface (meniscus rising towards the lateral chest wall)."""
        level, men = self.effusion[side]
        lung = self.lungs[side]
        t = np.clip((u - (lung.uc - lung.a)) / (2 * lung.a), 0.0, 1.0)
        return level - men * t**2


def _uniforms(rng: np.random.Generator, n: int):
    """``u(lo, hi)`` drawing from one pre-drawn block of n uniforms (one generator call)."""
    block = iter(rng.random(n).tolist())
    return lambda lo, hi: lo + (hi - lo) * next(block)


def _sample_anatomy(rng: np.random.Generator, size: int) -> _Scene:
    u = _uniforms(rng, 96)
    g = u(0.82, 1.16)  # overall lung size
    dome_r = u(0.2, 0.46)  # depth of inspiration
    lungs = {}
    for side, dome_top in (("right", dome_r), ("left", dome_r + u(0.0, 0.07))):
        a = u(0.32, 0.37) * g
        uc = u(0.42, 0.46) * (0.5 + 0.5 * g)
        lungs[side] = _Lung(
            uc=uc,
            yc=u(-0.14, -0.06),
            a=a,
            b=u(0.56, 0.66) * g,
            box=u(0.3, 0.9),
            tilt=u(0.04, 0.1),
            dome_top=dome_top,
            dome_u=uc - u(0.0, 0.1),
            dome_k=u(0.9, 1.5),
            hilum=(u(0.13, 0.18), u(-0.12, -0.02)),
            vessels=int(u(0, _N_TREES - 1e-9)),
        )
    mw = u(0.09, 0.12)
    heart = _Heart(
        mw=mw,
        ra=u(0.19, 0.24),
        ra_y=lungs["right"].dome_top - u(0.06, 0.12),
        ra_h=u(0.26, 0.34),
        lv=u(0.38, 0.46),
        lv_y=lungs["left"].dome_top - u(0.02, 0.08),
        lv_h=u(0.38, 0.48),
        knob=(mw + u(0.01, 0.04), u(-0.46, -0.36), u(0.05, 0.07)),
        density=u(0.03, 0.1),
    )
    return _Scene(
        size=size,
        scale=u(0.86, 1.06),
        angle=u(-0.07, 0.07),
        shift=(u(-0.04, 0.04), u(-0.05, 0.04)),
        body_w=u(0.78, 1.1),
        body_t=u(0.85, 1.1),
        lung_air=u(0.5, 0.75),
        tissue=u(0.03, 0.07),
        lungs=lungs,
        heart=heart,
        spine=(u(-0.01, 0.01), u(0.055, 0.07), u(0.03, 0.08), u(0.11, 0.14)),
        trachea=(u(-0.015, 0.015), u(0.03, 0.042), u(-0.36, -0.28)),
        ribs={
            "sp": u(0.1, 0.12),
            "off": u(0.0, 1.0),
            "u0": u(0.06, 0.16),
            "c2": u(0.8, 1.1),
            "fan": u(0.2, 0.45),
            "wf": u(0.4, 0.52),
            "amp": u(0.06, 0.13),
            "amp_a": u(0.03, 0.07),
            "off_a": u(0.0, 1.0),
            "amp_c": u(0.12, 0.22),
        },
        clavicle_y=u(-0.78, -0.66),
        bubble=(u(0.22, 0.34), u(0.06, 0.1), u(0.04, 0.06)) if u(0, 1) < 0.75 else None,
        vessel_amp=u(0.1, 0.17),
        texture=rng.random((max(8, size // 5),) * 2, dtype=np.float32),
    )


def _sample_exposure(rng: np.random.Generator, cfg: SynthConfig) -> dict[str, float]:
    u = _uniforms(rng, 10)
    return {
        "k": u(0.9, 2.0),  # attenuation -> detector response
        "p_lo": u(0.2, 8.0),  # auto-window percentiles
        "p_hi": u(98.0, 99.9),
        "headroom": u(0.1, 0.3),  # above the brightest anatomy, so metal stays visible
        "gamma": math.exp(u(math.log(0.6), math.log(1.7))),
        "out_lo": u(0.0, 0.1),
        "out_hi": u(0.82, 1.0),
        "blur": u(0.35, 0.85) * cfg.size / 128,
        "noise": u(0.006, 0.022) * cfg.noise,
        "mottle": u(0.0, 0.03),
    }


# --------------------------------------------------------------------------------------------
# findings: presence and planning (attributes + geometry)


def _presence(rng: np.random.Generator, cfg: SynthConfig) -> dict[str, dict[str, Any]]:
    """Which findings a study shows -> fixed attributes (empty dict: sample all)."""
    q = cfg.presence_probabilities()
    normal = rng.random() < cfg.normal_fraction
    draws = rng.random(len(SYNTH_FINDINGS))
    fallback = rng.random()
    present = {} if normal else {f: {} for f, d in zip(SYNTH_FINDINGS, draws) if d < q[f]}
    allowed = [f for f in SYNTH_FINDINGS if cfg.force.get(f, None) is not False]
    if not normal and not present and allowed:
        weights = np.array([q[f] for f in allowed])
        idx = int(np.searchsorted(np.cumsum(weights) / weights.sum(), fallback))
        present[allowed[min(idx, len(allowed) - 1)]] = {}
    for name, value in cfg.force.items():
        if value is False:
            present.pop(name, None)
        else:
            present[name] = dict(value) if isinstance(value, dict) else {}
    return present


def _pick(rng: np.random.Generator, fixed: dict, key: str, choices: tuple, p: list[float] | None = None):
    """Draw an attribute (always consuming the stream, so forcing does not shift later draws)."""
    weights = p or [1.0] * len(choices)
    r = rng.random() * sum(weights)
    drawn = choices[-1]
    for choice, w in zip(choices, weights):
        r -= w
        if r < 0:
            drawn = choice
            break
    return fixed.get(key, drawn)


def _sides(laterality: str) -> tuple[str, ...]:
    return ("right", "left") if laterality == "bilateral" else (laterality,)


def _plan_cardiomegaly(rng, scene: _Scene, fixed: dict) -> dict:
    severity = _pick(rng, fixed, "severity", ATTRIBUTE_CHOICES["Cardiomegaly"]["severity"], [0.5, 0.5])
    f = rng.uniform(1.36, 1.46) if severity == "moderate" else rng.uniform(1.5, 1.65)
    h = scene.heart
    h.lv = min(h.lv * f, scene.lungs["left"].lateral - 0.19)  # keep some lung lateral to the heart
    h.ra = min(h.ra * (1 + 0.8 * (f - 1)), scene.lungs["right"].lateral - 0.2)
    h.lv_h *= 1 + 0.3 * (f - 1)
    h.ra_h *= 1 + 0.3 * (f - 1)
    return {"severity": severity}


def _heart_ctr(scene: _Scene) -> float:
    """Cardiothoracic ratio: heart width over inner thoracic width."""
    return (scene.heart.ra + scene.heart.lv) / (scene.lungs["right"].lateral + scene.lungs["left"].lateral)


def _plan_atelectasis_volume(rng, scene: _Scene, fixed: dict) -> dict:
    choices = ATTRIBUTE_CHOICES["Atelectasis"]
    laterality = _pick(rng, fixed, "laterality", choices["laterality"], [0.4, 0.4, 0.2])
    pattern = _pick(rng, fixed, "pattern", choices["pattern"], [0.6, 0.4])
    lift = rng.uniform(0.07, 0.11, size=2)
    for i, side in enumerate(_sides(laterality)):
        scene.lungs[side].dome_top -= lift[i]
    return {"laterality": laterality, "pattern": pattern}


def _plan_effusion(rng, scene: _Scene, fixed: dict, atelectasis: dict | None) -> dict:
    choices = ATTRIBUTE_CHOICES["Pleural Effusion"]
    laterality = _pick(rng, fixed, "laterality", choices["laterality"], [0.35, 0.35, 0.3])
    size = _pick(rng, fixed, "size", choices["size"], [0.35, 0.4, 0.25])
    if (
        "size" not in fixed
        and atelectasis
        and set(_sides(laterality)) & set(_sides(atelectasis["laterality"]))
    ):
        size = "small"  # a larger effusion would hide the atelectasis at the same base
    rise = {"small": (-0.1, -0.06), "moderate": (0.18, 0.27), "large": (0.38, 0.5)}[size]
    draws = rng.uniform(0.0, 1.0, size=(2, 2))
    for i, side in enumerate(_sides(laterality)):
        lung = scene.lungs[side]
        level = lung.dome_top - (rise[0] + (rise[1] - rise[0]) * draws[i, 0])
        meniscus = (0.12 if size == "small" else 0.18) + 0.08 * draws[i, 1]
        scene.effusion[side] = (level, meniscus)
    return {"laterality": laterality, "size": size}


def _plan_pneumothorax(rng, scene: _Scene, fixed: dict) -> dict:
    choices = ATTRIBUTE_CHOICES["Pneumothorax"]
    side = _pick(rng, fixed, "laterality", choices["laterality"])
    size = _pick(rng, fixed, "size", choices["size"], [0.35, 0.4, 0.25])
    lo, hi = {"small": (0.82, 0.87), "moderate": (0.72, 0.78), "large": (0.58, 0.66)}[size]
    lung = scene.lungs[side]
    centre = (lung.uc - rng.uniform(0.2, 0.45) * lung.a, lung.dome_top - rng.uniform(0.0, 0.08))
    scene.pneumothorax = {
        "side": side,
        "factor": rng.uniform(lo, hi),
        "centre": centre,
        "dark": rng.uniform(0.06, 0.1),
    }
    return {"laterality": side, "size": size}


def _plan_atelectasis_shape(rng, scene: _Scene, attrs: dict) -> None:
    draws = rng.uniform(0.0, 1.0, size=(2, 5))
    for i, side in enumerate(_sides(attrs["laterality"])):
        lung = scene.lungs[side]
        d = draws[i]
        if attrs["pattern"] == "plate-like":
            uc = lung.uc + (0.1 + 0.3 * d[0]) * lung.a
            yc = lung.dome(uc) - 0.1 - 0.07 * d[2]
            if side in scene.effusion:
                yc = min(yc, float(scene.fluid_top(side, uc)) - 0.07)
            half = (0.11 + 0.06 * d[3]) * (lung.a / 0.34)
            tilt = (d[4] - 0.5) * 0.5
            p0 = (uc - half * math.cos(tilt), yc - half * math.sin(tilt))
            p1 = (uc + half * math.cos(tilt), yc + half * math.sin(tilt))
            scene.atelectasis.append(
                {"side": side, "kind": "plate", "p0": p0, "p1": p1, "amp": 0.3 + 0.12 * d[1]}
            )
        else:
            uw = lung.uc + (0.05 + 0.3 * d[0]) * lung.a
            scene.atelectasis.append(
                {
                    "side": side,
                    "kind": "wedge",
                    "u": uw,
                    "w": 0.22 + 0.08 * d[1],
                    "h": 0.18 + 0.08 * d[2],
                    "amp": 0.26 + 0.08 * d[3],
                }
            )


def _place(
    rng, scene: _Scene, side: str, zone: str, radius: float, strict: bool = True, tries: int = 48
) -> tuple[float, float] | None:
    """Sample a lesion centre (u, y) inside the visible ``zone`` of a lung, clear of the heart and
    mediastinum and (``strict``) of the effusion, pneumothorax gap and other lesions; None when
    nothing fits. All candidates are tested at once; the first that fits wins."""
    lung = scene.lungs[side]
    sign = _SIGN[side]
    z = ZONES.index(zone)
    tries = tries if strict else 4 * tries
    cu, cy = rng.uniform(0.0, 1.0, size=(2, tries))
    u = lung.uc + (2 * cu - 1) * (0.8 if strict else 0.95) * lung.a
    dome = lung.dome(u)
    base = np.minimum(dome, lung.yc + lung.b)
    y = lung.apex + (base - lung.apex) * (z + 0.15 + 0.7 * cy) / 3
    margin = 0.06 if strict else 0.0
    ok = (lung.radius(u, y) <= 1 - radius / min(lung.a, lung.b) - margin) & (y <= dome - radius - margin / 2)
    right, left = scene.heart.edges(y)
    ok &= u - radius >= (-right if side == "right" else left) + margin * 0.6
    if strict and side in scene.effusion:
        ok &= y <= scene.fluid_top(side, u) - radius - 0.06
    if strict and scene.pneumothorax.get("side") == side:
        ok &= _ptx_radius(scene, u, y) <= 1 - radius / lung.a - 0.08
    for l in scene.lesions if strict else ():
        ok &= np.hypot(sign * u - l["x"], y - l["y"]) >= radius + l["r"] + 0.05
    for a in scene.atelectasis if strict else ():
        if a["side"] == side:
            ok &= np.abs(y - _atelectasis_y(a, scene)) >= radius + 0.06
    hits = np.flatnonzero(ok)
    return (float(u[hits[0]]), float(y[hits[0]])) if len(hits) else None


def _atelectasis_y(a: dict, scene: _Scene) -> float:
    if a["kind"] == "plate":
        return 0.5 * (a["p0"][1] + a["p1"][1])
    return float(scene.lungs[a["side"]].dome(a["u"])) - a["h"] / 2


def _ptx_radius(scene: _Scene, u, y):
    """Lung radius evaluated on the collapsed lung (the lung shrunk towards its medial base)."""
    ptx = scene.pneumothorax
    lung = scene.lungs[ptx["side"]]
    cu, cy = ptx["centre"]
    f = ptx["factor"]
    return lung.radius(cu + (u - cu) / f, cy + (y - cy) / f)


def _plan_lesion(rng, scene: _Scene, fixed: dict, name: str) -> dict | None:
    """Nodule, Mass or Consolidation: laterality + zone + size, placed where it is visible."""
    choices = ATTRIBUTE_CHOICES[name]
    side = _pick(rng, fixed, "laterality", choices["laterality"])
    zone = _pick(rng, fixed, "zone", choices["zone"])
    size_draw, amp_draw, shape_seed = rng.random(), rng.random(), int(rng.integers(0, 2**31 - 1))
    px = {"Nodule": (5.0, 9.0), "Mass": (14.0, 24.0), "Consolidation": (18.0, 28.0)}[name]
    diameter_px = (px[0] + (px[1] - px[0]) * size_draw) * scene.size / 128
    radius = diameter_px / 2 * scene.unit_px  # anatomy units
    others = [
        (s, z)
        for s in (choices["laterality"] if "laterality" not in fixed else (side,))
        for z in (ZONES if "zone" not in fixed else (zone,))
        if (s, z) != (side, zone)
    ]
    order = rng.permutation(len(others))
    fit = {"Nodule": 1.0, "Mass": 0.6, "Consolidation": 0.4}[name]  # masses may abut the pleura
    # where it was drawn, else elsewhere it is free to go, else (when attributes were fixed)
    # overlapping other findings; a finding that fits nowhere is not shown and not reported
    attempts = (
        [(side, zone, True)] + [(*others[i], True) for i in order] + [(side, zone, False)] * bool(fixed)
    )
    for s, z, strict in attempts:
        spot = _place(rng, scene, s, z, radius * fit, strict)
        if spot is not None:
            break
    else:
        return None
    u, y = spot
    amp = {"Nodule": (0.45, 0.65), "Mass": (0.5, 0.7), "Consolidation": (0.4, 0.6)}[name]
    scene.lesions.append(
        {
            "kind": name,
            "side": s,
            "x": _SIGN[s] * u,
            "y": y,
            "r": radius,
            "amp": amp[0] + (amp[1] - amp[0]) * amp_draw,
            "seed": shape_seed,
        }
    )
    cx, cy = scene.to_pixels(_SIGN[s] * u, y)
    attrs = {
        "laterality": s,
        "zone": z,
        "diameter_px": round(float(diameter_px), 1),
        "center_px": [round(float(cx), 1), round(float(cy), 1)],
    }
    if name != "Consolidation":
        attrs["diameter_cm"] = round(float(2 * radius * CM_PER_UNIT), 1)
    return attrs


def _plan_edema(rng, scene: _Scene, fixed: dict) -> dict:
    severity = _pick(rng, fixed, "severity", ATTRIBUTE_CHOICES["Edema"]["severity"])
    lo, hi = {"mild": (0.2, 0.25), "moderate": (0.27, 0.33), "severe": (0.36, 0.44)}[severity]
    scene.edema = rng.uniform(lo, hi)
    scene.kerley = rng.random(64) < 0.7
    return {"severity": severity}


def _plan_devices(rng, scene: _Scene, fixed: dict) -> dict:
    draws = rng.random(len(DEVICES))
    chosen = [d for d, r, p in zip(DEVICES, draws, (0.5, 0.45, 0.55, 0.35)) if r < p]
    fallback = DEVICES[int(rng.integers(0, len(DEVICES)))]
    chosen = list(fixed.get("devices", chosen or [fallback]))
    u = rng.uniform(0.0, 1.0, size=12)
    attrs: dict[str, Any] = {"devices": [d for d in DEVICES if d in chosen]}
    tcx, _, carina = scene.trachea
    h = scene.heart
    w = scene.px128
    if "endotracheal tube" in chosen:
        tip = carina - 0.14 - 0.16 * u[0]
        pts = [(tcx + 0.01, -1.3), (tcx + 0.005, -0.9), (tcx, tip)]
        scene.devices.append({"points": pts, "width": 2.0 * w, "amp": 1.6})
        attrs["ett_cm_above_carina"] = int(round((carina - tip) * CM_PER_UNIT))
    if "nasogastric tube" in chosen:
        left = scene.lungs["left"]
        sx = 0.2 + 0.12 * u[1]
        dome_y = float(left.dome(sx))
        pts = [
            (0.03, -1.3),
            (0.035, -0.6),
            (0.04, 0.0),
            (0.07, left.dome_top + 0.1),
            (sx, dome_y + 0.16 + 0.06 * u[2]),
            (sx + 0.1, dome_y + 0.12),
        ]
        scene.devices.append({"points": pts, "width": 1.2 * w, "amp": 1.4})
    if "central venous catheter" in chosen:
        side = "right" if u[3] < 0.65 else "left"
        access = "internal jugular" if u[4] < 0.5 else "subclavian"
        s = _SIGN[side]
        svc_x = -0.8 * h.mw
        tip_at_junction = u[5] < 0.4
        tip_y = h.top + 0.08 if tip_at_junction else h.top - 0.06 - 0.08 * u[6]
        if access == "internal jugular":
            start = [(s * 0.14, -1.3), (s * 0.13, -0.85), (s * 0.1, -0.62)]
        else:
            start = [(s * 0.64, -0.88 + 0.03 * u[7]), (s * 0.42, scene.clavicle_y + 0.1), (s * 0.2, -0.6)]
        pts = start + [(svc_x + 0.02 * (s > 0), -0.45), (svc_x, tip_y)]
        scene.devices.append({"points": pts, "width": 1.2 * w, "amp": 1.3})
        attrs["central_line"] = {
            "laterality": side,
            "access": access,
            "tip": "cavoatrial junction" if tip_at_junction else "superior vena cava",
        }
    if "pacemaker" in chosen:
        side = "left" if u[8] < 0.8 else "right"
        s = _SIGN[side]
        bx, by = s * (0.5 + 0.08 * u[9]), scene.clavicle_y + 0.2 + 0.06 * u[10]
        leads = 2 if u[11] < 0.6 else 1
        scene.devices.append({"box": (bx, by, 0.075, 0.052), "amp": 2.0})
        via = [(bx - s * 0.06, by + 0.02), (s * 0.2, -0.6), (-0.7 * h.mw, -0.45), (-0.8 * h.mw, h.top + 0.02)]
        rv = via + [(-0.03, h.lv_y - 0.12), (0.55 * h.lv, h.lv_y + 0.02)]
        scene.devices.append({"points": rv, "width": 1.2 * w, "amp": 1.4})
        if leads == 2:
            ra = via + [(-0.6 * h.ra, h.ra_y - 0.14), (-0.65 * h.ra, h.ra_y - 0.06)]
            scene.devices.append({"points": ra, "width": 1.2 * w, "amp": 1.4})
        attrs["pacemaker"] = {"laterality": side, "leads": leads}
    return attrs


def _plan(streams: _Streams, scene: _Scene, present: dict[str, dict]) -> dict[str, dict]:
    """Attributes and geometry (into scene) of the findings a study shows."""
    findings: dict[str, dict] = {}
    if "Cardiomegaly" in present:
        findings["Cardiomegaly"] = _plan_cardiomegaly(streams["Cardiomegaly"], scene, present["Cardiomegaly"])
    if "Atelectasis" in present:
        findings["Atelectasis"] = _plan_atelectasis_volume(
            streams["Atelectasis"], scene, present["Atelectasis"]
        )
    if "Pleural Effusion" in present:
        findings["Pleural Effusion"] = _plan_effusion(
            streams["Pleural Effusion"], scene, present["Pleural Effusion"], findings.get("Atelectasis")
        )
    if "Pneumothorax" in present:
        findings["Pneumothorax"] = _plan_pneumothorax(streams["Pneumothorax"], scene, present["Pneumothorax"])
    if "Atelectasis" in present:
        _plan_atelectasis_shape(streams["Atelectasis"], scene, findings["Atelectasis"])
    for name in ("Mass", "Consolidation", "Nodule"):
        if name in present:
            attrs = _plan_lesion(streams[name], scene, present[name], name)
            if attrs is not None:
                findings[name] = attrs
    if "Edema" in present:
        findings["Edema"] = _plan_edema(streams["Edema"], scene, present["Edema"])
    if "Support Devices" in present:
        findings["Support Devices"] = _plan_devices(
            streams["Support Devices"], scene, present["Support Devices"]
        )
    if "Cardiomegaly" in findings:
        findings["Cardiomegaly"]["ctr"] = round(_heart_ctr(scene), 2)
    return {name: findings[name] for name in SYNTH_FINDINGS if name in findings}


# --------------------------------------------------------------------------------------------
# rendering


def _box(scene: _Scene, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """Pixel (rows, cols) slices covering the anatomy-coordinate box [x0, x1] x [y0, y1]."""
    c, s = math.cos(scene.angle) * scene.scale, math.sin(scene.angle) * scene.scale
    half = scene.size / 2.0
    xs = [(c * x - s * y + scene.shift[0] + 1.0) * half - 0.5 for x in (x0, x1) for y in (y0, y1)]
    ys = [(s * x + c * y + scene.shift[1] + 1.0) * half - 0.5 for x in (x0, x1) for y in (y0, y1)]
    n = scene.size
    c0, c1 = max(0, int(min(xs)) - 2), min(n, int(max(xs)) + 3)
    r0, r1 = max(0, int(min(ys)) - 2), min(n, int(max(ys)) + 3)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _render_density(scene: _Scene) -> np.ndarray:
    """Attenuation map (H, W) without devices: 0 air outside the body, ~1 soft tissue, more for bone.

    Structures are drawn inside their own bounding boxes (crops) to keep a 128-px study at a
    few milliseconds.
    """
    size = scene.size
    X, Y = scene.anatomy_grid()  # (H, W) each
    pu = scene.unit_px
    absx = np.abs(X)

    # body: soft tissue with a chord-length thickness profile, wider at the shoulders
    w = scene.body_w * (1 + 0.12 * np.clip(-Y - 0.5, 0, 1) - 0.08 * np.clip(Y - 0.4, 0, 1))
    inside = _soft((w - absx) / pu)
    t = X / w
    D = scene.body_t * (0.3 + 0.7 * np.sqrt(np.clip(1 - t * t, 0, 1))) * inside

    h = scene.heart
    lungs = scene.lungs.values()
    top = min(l.apex for l in lungs) - 0.15
    bottom = max(float(l.dome(l.lateral)) for l in lungs) + 0.12
    sl = _box(scene, -max(h.lv, h.ra) - 0.05, max(h.lv, h.ra) + 0.05, top, bottom)
    right, left = h.edges(Y[sl])
    solid = np.zeros_like(D)
    solid[sl] = _soft((X[sl] - right) / pu) * _soft((left - X[sl]) / pu)  # cardiomediastinal silhouette
    texture = _stretch(scene.texture, size)  # (H, W) smooth noise in [0, 1]
    ptx = scene.pneumothorax
    visible_full = np.zeros_like(D)
    vessels = _vessels(scene)
    for side, lung in scene.lungs.items():
        sign = _SIGN[side]
        lo_u, hi_u = lung.uc - lung.a - lung.tilt - 0.02, lung.lateral + 0.02
        bottom = max(lung.yc + lung.b, float(lung.dome(lung.lateral))) + 0.02
        sl = _box(
            scene, min(sign * lo_u, sign * hi_u), max(sign * lo_u, sign * hi_u), lung.apex - 0.02, bottom
        )
        Xs, Ys = X[sl], Y[sl]
        u = sign * Xs
        r = lung.radius(u, Ys)
        outline = _soft((1 - r) * (min(lung.a, lung.b) / pu))
        shape = outline * _soft((lung.dome(u) - Ys) / pu)  # lung field above the hemidiaphragm
        visible = shape * (1 - solid[sl])
        if side in scene.effusion:
            fluid = np.clip((Ys - scene.fluid_top(side, u)) * 16 + 0.3, 0, 1)  # fluid thins upwards
            D[sl] += 0.06 * fluid * shape * (1 - solid[sl])
            visible = visible * (1 - fluid)
        visible_full[sl] = visible
        apex_density = 1 - 0.3 * np.clip((-0.4 - Ys) / 0.35, 0, 1)
        hu, hy = lung.hilum
        du, dy = u - hu, Ys - hy
        parenchyma = scene.tissue + vessels[sl] + 0.04 * (texture[sl] - 0.5)
        parenchyma += 0.12 * np.exp((du * du + dy * dy) * (-1 / 0.008))  # hilar vessels
        Ds = -scene.lung_air * apex_density
        if ptx.get("side") == side:
            rc = _ptx_radius(scene, u, Ys)
            below = np.clip((ptx["centre"][1] + 0.05 - Ys) / 0.12, 0, 1)  # the gap stays apical/lateral
            scaled = lung.a * ptx["factor"] / pu  # radius units -> pixels
            gap = _soft((rc - 1) * scaled) * below
            line = np.clip(1 - np.abs(rc - 1) * (scaled / (0.6 * size / 128)), 0, 1) * below
            parenchyma = parenchyma * (1 - gap) + 0.03 * (1 - gap)
            Ds = Ds - ptx["dark"] * gap + 0.3 * line
        if scene.edema:
            Ds = Ds + _edema(scene, lung, u, Ys, du, dy, texture[sl])
        D[sl] += (Ds + parenchyma) * visible
    for a in scene.atelectasis:
        _draw_atelectasis(scene, a, D, X, Y, visible_full)
    for lesion in scene.lesions:
        _draw_lesion(scene, lesion, D, X, Y, visible_full)

    D += h.density * solid * np.clip((Y - h.top) / 0.1, 0, 1)
    sx, sw, sd, sper = scene.spine
    sl = _box(scene, sx - sw - 0.05, sx + sw + 0.05, -1.2, 1.2)
    spine = np.clip((sw - np.abs(X[sl] - sx)) / (3 * pu) + 0.5, 0, 1)
    vert = 1 - 0.4 * np.clip(np.abs(((Y[sl] / sper) % 1.0) - 0.5) * 6 - 2, 0, 1)  # disc spaces
    D[sl] += sd * spine * vert
    _draw_airways(scene, D, X, Y)
    _draw_ribs(scene, D, X, Y, solid)
    if scene.bubble is not None:
        bx, rx, ry = scene.bubble
        by = float(scene.lungs["left"].dome(bx)) + ry + 0.02
        sl = _box(scene, bx - rx, bx + rx, by - ry, by + ry)
        dx, dy = (X[sl] - bx) / rx, (Y[sl] - by) / ry
        D[sl] -= 0.3 * _soft((1 - np.sqrt(dx * dx + dy * dy)) * (ry / pu))
    return D


_N_TREES = 64


@lru_cache(maxsize=4)
def _vessel_bank(size: int) -> tuple[tuple[np.ndarray, int, int], ...]:
    """A fixed bank of rasterised vessel trees for a left lung of half-width 0.34 at scale 1.

    Each tree branches three times from the hilum (wide proximal vessels, thin distal ones) and
    is stored as (patch, hilum row, hilum column). Drawing trees once and pasting them per study
    (mirrored for the right lung) keeps rendering fast; the lung mask clips them to the lung.
    """
    rng = np.random.default_rng(20240607)  # fixed: the bank is part of the generator, not a study
    step = 1.0 / size  # half a pixel at scale 1
    px = 2.0 / size
    bank = []
    for _ in range(_N_TREES):
        ang = np.sort(rng.uniform(-1.5, 1.4, 8))
        start = np.column_stack([0.02 * np.cos(ang), 0.02 * np.sin(ang)])
        length = rng.uniform(0.32, 0.6, 8)
        strength = np.ones(8)
        parts = []
        for level in range(3):
            n_pts = int(length.max() / step) + 1
            theta = ang[:, None] + rng.normal(0.0, 0.06, (len(ang), n_pts)).cumsum(axis=1)  # (B, N)
            pts_u = start[:, :1] + step * np.cos(theta).cumsum(axis=1)  # (B, N)
            pts_y = start[:, 1:] + step * np.sin(theta).cumsum(axis=1)
            t = np.arange(1, n_pts + 1) * step / length[:, None]  # (B, N) fraction along the branch
            keep = t <= 1.0
            parts.append((pts_u[keep], pts_y[keep], 0.5 * (strength[:, None] * (1.0 - 0.65 * t))[keep]))
            # two children per branch, forking off at 30-75 % of its length
            parent = np.repeat(np.arange(len(ang)), 2)
            tc = rng.uniform(0.3, 0.75, len(parent))
            idx = np.minimum((tc * length[parent] / step).astype(int), n_pts - 1)
            start = np.column_stack([pts_u[parent, idx], pts_y[parent, idx]])
            ang = theta[parent, idx] + rng.choice([-1.0, 1.0], len(parent)) * rng.uniform(
                0.3, 0.7, len(parent)
            )
            length = (1 - tc) * length[parent] * rng.uniform(0.7, 1.0, len(parent))
            strength = strength[parent] * (1 - 0.65 * tc)
        u_all = np.concatenate([p[0] for p in parts])
        y_all = np.concatenate([p[1] for p in parts])
        u0, y0 = u_all.min() - 2 * px, y_all.min() - 2 * px
        w = int((u_all.max() - u0) / px) + 3
        h = int((y_all.max() - y0) / px) + 3
        layers = []
        for group in (parts[:1], parts[1:]):
            cu = np.concatenate([(p[0] - u0) / px for p in group])
            cy = np.concatenate([(p[1] - y0) / px for p in group])
            layers.append(_splat(cu, cy, (h, w), np.concatenate([p[2] for p in group])))
        patch = np.minimum(_widen(layers[0]) + layers[1], 1.2)  # proximal vessels are wider
        bank.append((patch.astype(np.float32), int(round(-y0 / px)), int(round(-u0 / px))))
    return tuple(bank)


def _vessels(scene: _Scene) -> np.ndarray:
    """Pulmonary vessel markings of both lungs, (H, W): one tree of the bank pasted per lung."""
    size = scene.size
    out = np.zeros((size, size), np.float32)
    bank = _vessel_bank(size)
    for side, lung in scene.lungs.items():
        patch, hr, hc = bank[lung.vessels]
        if side == "right":
            patch, hc = patch[:, ::-1], patch.shape[1] - 1 - hc
        cx, cy = scene.to_pixels(_SIGN[side] * lung.hilum[0], lung.hilum[1])
        r0, c0 = int(round(cy)) - hr, int(round(cx)) - hc
        h, w = patch.shape
        rs, cs = max(0, -r0), max(0, -c0)
        re, ce = min(h, size - r0), min(w, size - c0)
        if re > rs and ce > cs:
            out[r0 + rs : r0 + re, c0 + cs : c0 + ce] += patch[rs:re, cs:ce]
    return (scene.vessel_amp * (1.5 if scene.edema else 1.0)) * out


def _edema(scene: _Scene, lung: _Lung, u, Y, du, dy, texture) -> np.ndarray:
    """Perihilar (bat-wing) haze, reticular interstitial pattern and basal Kerley B lines."""
    haze = np.exp(du * du * (-1 / 0.34**2) + dy * dy * (-1 / 0.42**2))
    reticular = np.clip((texture - 0.45) * 4, 0, 1)
    periphery = np.clip((u - (lung.lateral - 0.12)) / 0.04, 0, 1) * np.clip((Y - lung.yc) / 0.15, 0, 1)
    spacing = 0.055
    phase = Y / spacing
    on = scene.kerley[np.floor(phase).astype(int) % len(scene.kerley)]
    kerley = np.clip(1 - np.abs(phase % 1.0 - 0.5) * (spacing / scene.px128), 0, 1) * periphery * on
    return scene.edema * (haze + 0.5 * reticular) + 0.3 * kerley


def _draw_atelectasis(scene: _Scene, a: dict, D, X, Y, visible) -> None:
    pu = scene.unit_px
    lung = scene.lungs[a["side"]]
    sign = _SIGN[a["side"]]
    if a["kind"] == "plate":
        (u0, y0), (u1, y1) = a["p0"], a["p1"]
        sl = _box(
            scene,
            min(sign * u0, sign * u1) - 0.03,
            max(sign * u0, sign * u1) + 0.03,
            min(y0, y1) - 0.03,
            max(y0, y1) + 0.03,
        )
        d = _segment_distance(sign * X[sl], Y[sl], a["p0"], a["p1"])
        D[sl] += a["amp"] * np.clip((1.5 * scene.px128 - d) / (1.5 * pu) + 0.5, 0, 1) * visible[sl]
        return
    # basilar: hazy triangular density on the (elevated) hemidiaphragm, capped by a linear band
    uu = a["u"]
    sl = _box(
        scene,
        sign * uu - a["w"] - 0.02,
        sign * uu + a["w"] + 0.02,
        lung.dome_top - a["h"] - 0.05,
        lung.yc + lung.b + 0.05,
    )
    u, Ys = sign * X[sl], Y[sl]
    tri = np.clip(1 - np.abs(u - uu) / a["w"], 0, 1)
    top = lung.dome(u) - a["h"] * tri
    haze = np.clip((Ys - top) / 0.1, 0, 1) * (tri > 0)
    band = np.clip(1.5 - np.abs(Ys - top - 0.03) / scene.px128, 0, 1) * (tri > 0.2)
    D[sl] += (a["amp"] * haze + 0.35 * band) * visible[sl]


def _draw_lesion(scene: _Scene, lesion: dict, D, X, Y, visible) -> None:
    """Nodule (round), mass (lobulated) or consolidation (patchy, ill-defined), in its crop."""
    pu = scene.unit_px
    R = lesion["r"]
    ext = 1.5 * R + 2 * pu
    sl = _box(scene, lesion["x"] - ext, lesion["x"] + ext, lesion["y"] - ext, lesion["y"] + ext)
    dx, dy = X[sl] - lesion["x"], Y[sl] - lesion["y"]
    r = np.sqrt(dx * dx + dy * dy)
    rng = np.random.default_rng(lesion["seed"])
    if lesion["kind"] == "Consolidation":
        theta = np.arctan2(dy, dx)
        k = rng.integers(2, 5)
        edge = R * (
            1
            + 0.25 * np.sin(k * theta + rng.uniform(0, 6.3))
            + 0.15 * np.sin((k + 2) * theta + rng.uniform(0, 6.3))
        )
        envelope = np.clip((edge - r) / (0.35 * R), 0, 1)
        patches = np.clip((_smooth_noise(rng, max(6, scene.size // 8), scene.size)[sl] - 0.3) / 0.3, 0, 1)
        density = lesion["amp"] * envelope * (0.35 + 0.65 * patches)
    else:
        if lesion["kind"] == "Mass":
            theta = np.arctan2(dy, dx)
            edge = R * (
                1
                + 0.1 * np.sin(3 * theta + rng.uniform(0, 6.3))
                + 0.06 * np.sin(5 * theta + rng.uniform(0, 6.3))
            )
        else:
            edge = R
        q = r / edge
        density = lesion["amp"] * (0.45 + 0.55 * np.sqrt(np.clip(1 - q * q, 0, 1))) * _soft((edge - r) / pu)
    D[sl] += density * visible[sl]


def _draw_airways(scene: _Scene, D, X, Y) -> None:
    """Trachea and main bronchi (air: darker than the mediastinum)."""
    tcx, tw, carina = scene.trachea
    pu = scene.unit_px
    sl = _box(scene, tcx - 0.2, tcx + 0.2, -1.3, carina + 0.17)
    Xs, Ys = X[sl], Y[sl]
    trachea = _soft((tw - np.abs(Xs - tcx)) / pu) * _soft((carina - Ys) / pu)
    for sgn in (-1.0, 1.0):
        bronchus = _segment_distance(Xs, Ys, (tcx, carina), (tcx + sgn * 0.14, carina + 0.14))
        trachea = np.maximum(trachea, _soft((tw * 0.75 - bronchus) / pu))
    D[sl] -= 0.16 * trachea


def _draw_ribs(scene: _Scene, D, X, Y, solid) -> None:
    """Posterior ribs (arcs falling laterally and fanning out), faint anterior ribs, clavicles."""
    rb = scene.ribs
    pu = scene.unit_px
    lungs = scene.lungs
    lat = max(l.lateral for l in lungs.values()) + 0.08
    top = min(l.apex for l in lungs.values()) - 0.12
    bottom = max(float(l.dome(l.lateral)) for l in lungs.values()) + 0.1
    sl = _box(scene, -lat - 0.1, lat + 0.1, top, bottom)
    Xs, Ys = X[sl], Y[sl]
    absx = np.abs(Xs)
    u = np.maximum(absx - 0.04, 0.0)
    cage = np.clip((lat - absx) * 10, 0, 1) * np.clip(np.minimum((Ys - top) * 10, (bottom - Ys) * 8), 0, 1)
    cage *= 1 - 0.6 * solid[sl]
    uu = u - rb["u0"]
    phase = (Ys + 0.95 - rb["c2"] * uu * uu) / (rb["sp"] * (1 + rb["fan"] * u)) + rb["off"]
    f = phase - np.floor(phase)
    wpx = rb["sp"] / pu * (1 + rb["fan"] * u)
    band = np.clip(np.minimum(f, rb["wf"] - f) * wpx + 0.5, 0, 1)
    pa = (Ys + 0.5 * u) / (rb["sp"] * 1.3) + rb["off_a"]
    fa = pa - np.floor(pa)
    anterior = np.clip(np.minimum(fa, 0.35 - fa) * (rb["sp"] * 1.3 / pu) + 0.5, 0, 1) * np.clip(
        (u - 0.3) * 5, 0, 1
    )
    D[sl] += (rb["amp"] * band + rb["amp_a"] * anterior) * cage
    cy = scene.clavicle_y
    sl = _box(scene, -0.85, 0.85, cy - 0.2, cy + 0.1)
    u = np.abs(X[sl])
    clav = np.minimum(
        _segment_distance(u, Y[sl], (0.05, cy + 0.05), (0.35, cy)),
        _segment_distance(u, Y[sl], (0.35, cy), (0.75, cy - 0.12)),
    )
    D[sl] += rb["amp_c"] * _soft((0.026 - clav) / pu) * (u > 0.05)


def _devices(scene: _Scene) -> np.ndarray:
    """Radio-opaque tubes, lines and pacemaker, splatted in pixel space (1-2 px wide)."""
    size = scene.size
    canvas = np.zeros((size, size), np.float32)
    for dev in scene.devices:
        if "box" in dev:
            bx, by, hwid, hhei = dev["box"]
            X, Y = scene.anatomy_grid()
            d = np.minimum(hwid - np.abs(X - bx), hhei - np.abs(Y - by))
            canvas = np.maximum(canvas, dev["amp"] * _soft(d / scene.unit_px))
            continue
        curve = _catmull_rom(dev["points"], step=0.5 * scene.unit_px)  # (N, 2) anatomy units
        cx, cy = scene.to_pixels(curve[:, 0], curve[:, 1])
        layer = np.minimum(_splat(cx, cy, size, np.full(len(cx), 0.8)), 1.0)
        if dev["width"] / scene.unit_px > 1.5:
            layer = _widen(layer)
        canvas = np.maximum(canvas, dev["amp"] * layer)
    return canvas


def _widen(layer: np.ndarray) -> np.ndarray:
    """Make lines one pixel wider (max with the left neighbour)."""
    out = layer.copy()
    np.maximum(layer[:, 1:], layer[:, :-1], out=out[:, 1:])
    return out


def _splat(
    cx: np.ndarray, cy: np.ndarray, shape: int | tuple[int, int], weight: np.ndarray, bilinear: bool = True
) -> np.ndarray:
    """Additive splat of weighted points (pixel coordinates) onto a canvas of ``shape`` (an int
    for square), bilinear or to the nearest pixel."""
    h, w = (shape, shape) if isinstance(shape, int) else shape
    ok = (cx >= 0) & (cx < w - 1) & (cy >= 0) & (cy < h - 1)
    cx, cy, weight = cx[ok], cy[ok], weight[ok]
    if not bilinear:
        idx = (cy + 0.5).astype(np.intp) * w + (cx + 0.5).astype(np.intp)
        return np.bincount(idx, weights=weight, minlength=h * w).reshape(h, w).astype(np.float32)
    x0, y0 = cx.astype(np.intp), cy.astype(np.intp)
    fx, fy = cx - x0, cy - y0
    i = y0 * w + x0
    idx = np.concatenate([i, i + 1, i + w, i + w + 1])
    wts = np.concatenate([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy]) * np.tile(weight, 4)
    return np.bincount(idx, weights=wts, minlength=h * w).reshape(h, w).astype(np.float32)


@lru_cache(maxsize=128)
def _gamma_lut(gamma: float) -> np.ndarray:
    return (np.linspace(0.0, 1.0, 4096, dtype=np.float64) ** gamma).astype(np.float32)


def _expose(
    D: np.ndarray, metal: np.ndarray | None, ex: dict[str, float], rng: np.random.Generator
) -> np.ndarray:
    """Attenuation -> detector response -> blur -> auto-window -> gamma -> noise -> uint8.

    The window comes from the anatomy alone (``D``), so that metal (``metal``) only brightens
    its own pixels and does not shift the global intensity statistics.
    """
    step = max(1, D.shape[0] // 64)
    sample = np.sort(1.0 - np.exp(D[::step, ::step] * -ex["k"]), axis=None)
    if metal is not None:
        D = D + metal
    img = 1.0 - np.exp(D * -ex["k"])
    img = _gaussian_blur(img.astype(np.float32), ex["blur"])
    lo = sample[int(ex["p_lo"] / 100 * (sample.size - 1))]
    hi = sample[int(ex["p_hi"] / 100 * (sample.size - 1))]
    hi += ex["headroom"] * (hi - lo)
    img = np.clip((img - lo) * (4095.0 / max(hi - lo, 1e-3)), 0.0, 4095.0)
    img = _gamma_lut(round(ex["gamma"], 2))[img.astype(np.int32)]
    img = ex["out_lo"] + (ex["out_hi"] - ex["out_lo"]) * img
    size = img.shape[0]
    img += ex["mottle"] * (_smooth_noise(rng, 6, size) - 0.5)
    img += (ex["noise"] * 3.4641) * (rng.random(img.shape, dtype=np.float32) - 0.5)  # uniform, std = noise
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


class _Streams(dict):
    """One generator per part of a study, created on first use from a fixed block of seeds."""

    def __init__(self, seeds: np.ndarray) -> None:
        super().__init__()
        self._seeds = dict(zip(_STREAMS, (int(s) for s in seeds)))

    def __missing__(self, name: str) -> np.random.Generator:
        self[name] = np.random.default_rng(self._seeds[name])
        return self[name]


def render_study(rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, dict[str, dict]]:
    """Draw one study.

    Args:
        rng: the study's generator. The anatomy, exposure, presence draws and one seed per
            finding come from it in a fixed amount (then the noise), so forcing a finding on or
            off changes neither the anatomy nor the other findings of the same seed.
        cfg: what to draw.

    Returns:
        image: uint8 (size, size) grayscale radiograph, patient's right on the image left.
        findings: ``{finding: attributes}`` for every finding the image shows (empty: normal),
            in :data:`SYNTH_FINDINGS` order. Attributes hold laterality (patient side), zone,
            size/severity, and for lesions their pixel centre and diameter.
    """
    scene = _sample_anatomy(rng, cfg.size)  # fixed number of draws from rng in this order ...
    scene.exposure = _sample_exposure(rng, cfg)
    present = _presence(rng, cfg)
    streams = _Streams(rng.integers(0, 2**62, size=len(_STREAMS)))  # ... findings on their own
    findings = _plan(streams, scene, present)
    density = _render_density(scene)
    metal = _devices(scene) if scene.devices else None
    return _expose(density, metal, scene.exposure, rng), findings


# --------------------------------------------------------------------------------------------
# reports


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _choice(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(0, len(options)))]


def _where(side: str, zone: str, rng: np.random.Generator) -> tuple[str, str]:
    """(noun phrase, adjective phrase) naming a lung zone: ("left upper lobe", "left upper lobe"),
    ("lingula", "lingular"), ..."""
    if zone == "upper":
        options = [f"{side} upper lobe", f"{side} upper lung zone", f"{side} upper lung"]
    elif zone == "middle":
        options = (
            ["right middle lobe", "right mid lung zone", "right mid lung"]
            if side == "right"
            else ["lingula", "left mid lung zone", "left mid lung"]
        )
    else:
        options = [f"{side} lower lobe", f"{side} lung base", f"{side} lower lung zone"]
    noun = _choice(rng, options)
    adjective = {"lingula": "lingular", f"{side} lung base": f"{side} basilar"}.get(noun, noun)
    return noun, adjective


def _phrases(name: str, a: dict, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(findings-sentence options, impression options) describing one present finding."""
    if name == "Cardiomegaly":
        sev = a["severity"]
        adv = "markedly" if sev == "marked" else "moderately"
        return [
            f"{_cap(sev)} cardiomegaly.",
            "The heart is enlarged.",
            f"The heart is enlarged, cardiothoracic ratio about {a['ctr']:.2f}.",
            f"The cardiac silhouette is {adv} enlarged, consistent with cardiomegaly.",
            "Enlarged cardiac silhouette.",
            f"{_cap(sev)} enlargement of the cardiac silhouette, consistent with cardiomegaly.",
            f"There is {sev} cardiomegaly.",
        ], [f"{_cap(sev)} cardiomegaly.", "Cardiomegaly.", "Enlarged heart."]
    if name == "Pleural Effusion":
        lat, size = a["laterality"], a["size"]
        plural = "effusions" if lat == "bilateral" else "effusion"
        angle = "both costophrenic angles" if lat == "bilateral" else f"the {lat} costophrenic angle"
        diaphragm = "hemidiaphragms" if lat == "bilateral" else f"{lat} hemidiaphragm"
        hemithorax = "hemithoraces" if lat == "bilateral" else "hemithorax"
        body = [
            f"{_cap(size)} {lat} pleural {plural}.",
            f"There {'are' if lat == 'bilateral' else 'is a'} {size} {lat} pleural {plural}.",
            f"{_cap(lat)} pleural {plural}, {size} in size.",
        ]
        if size == "small":
            body += [
                f"Blunting of {angle}, consistent with small pleural {plural}.",
                f"Small {lat} {plural} with blunting of {angle}.",
            ]
        else:
            body += [f"{_cap(size)} {lat} pleural {plural} obscuring the {diaphragm}."]
        if size == "large":
            body += [f"Large {lat} pleural {plural} with opacification of the lower {hemithorax}."]
        return body, [f"{_cap(size)} {lat} pleural {plural}.", f"{_cap(lat)} pleural {plural}."]
    if name in ("Consolidation", "Nodule", "Mass"):
        where, adj = _where(a["laterality"], a["zone"], rng)
        if name == "Consolidation":
            return [
                f"Patchy consolidation in the {where}.",
                f"There is focal consolidation in the {where}.",
                f"Airspace opacity in the {where}, consistent with consolidation.",
                f"Patchy airspace disease in the {where}.",
                f"Consolidation is present in the {where}.",
                f"{_cap(adj)} consolidation.",
            ], [
                f"{_cap(adj)} consolidation.",
                f"Consolidation in the {where}.",
                f"{_cap(adj)} airspace disease.",
            ]
        cm = a["diameter_cm"]
        if name == "Nodule":
            return [
                f"A {cm:.1f} cm nodule is seen in the {where}.",
                f"There is a rounded pulmonary nodule in the {where}.",
                f"Well-circumscribed nodule in the {where}, measuring {cm:.1f} cm.",
                f"Solitary pulmonary nodule projecting over the {where}.",
                f"{_cap(adj)} nodule.",
            ], [
                f"{_cap(adj)} pulmonary nodule; CT recommended.",
                f"Pulmonary nodule in the {where}.",
                f"{_cap(adj)} nodule.",
            ]
        return [
            f"There is a {cm:.1f} cm mass in the {where}.",
            f"Large lobulated mass in the {where}.",
            f"A rounded mass measuring {cm:.1f} cm projects over the {where}.",
            f"{_cap(adj)} mass, approximately {cm:.0f} cm.",
            f"{_cap(adj)} mass.",
        ], [
            f"{_cap(adj)} mass; further evaluation with CT is recommended.",
            f"Mass in the {where}.",
            f"{_cap(adj)} mass.",
        ]
    if name == "Pneumothorax":
        lat, size = a["laterality"], a["size"]
        apical = "apical " if size == "small" else ""
        return [
            f"{_cap(size)} {lat} {apical}pneumothorax.",
            f"There is a {size} {lat} {apical}pneumothorax.",
            f"{_cap(size)} {lat} pneumothorax with a visible pleural line and absent peripheral markings.",
            f"A {lat} visceral pleural line is seen, consistent with a {size} pneumothorax.",
        ], [f"{_cap(size)} {lat} pneumothorax.", f"{_cap(lat)} pneumothorax."]
    if name == "Edema":
        sev = a["severity"]
        return [
            f"{_cap(sev)} pulmonary edema.",
            f"Bilateral perihilar opacities and interstitial lines, consistent with {sev} pulmonary edema.",
            f"Pulmonary vascular congestion with {sev} interstitial edema.",
            f"Findings are consistent with {sev} pulmonary edema.",
            f"{_cap(sev)} interstitial pulmonary edema with perihilar haziness.",
        ], [f"{_cap(sev)} pulmonary edema.", "Pulmonary edema."]
    if name == "Atelectasis":
        lat, pattern = a["laterality"], a["pattern"]
        if lat == "bilateral":
            kind = "plate-like " if pattern == "plate-like" else ""
            return [
                f"Bibasilar {kind}atelectasis with elevated hemidiaphragms.",
                f"{'Plate-like' if pattern == 'plate-like' else 'Basilar'} atelectasis at both lung bases.",
                f"Bibasilar {kind}atelectasis.",
            ], ["Bibasilar atelectasis."]
        kind = _choice(rng, ["plate-like", "linear", "discoid"]) if pattern == "plate-like" else "basilar"
        return [
            f"{_cap(kind)} atelectasis at the {lat} lung base.",
            f"{_cap(lat)} {kind} atelectasis with elevation of the {lat} hemidiaphragm.",
            f"There is {kind} atelectasis at the {lat} base with mild volume loss.",
            f"{_cap(lat)} basilar atelectasis.",
        ], [f"{_cap(lat)} basilar atelectasis.", f"Atelectasis at the {lat} base."]
    if name == "Support Devices":
        parts = []
        if "endotracheal tube" in a["devices"]:
            parts.append(
                _choice(
                    rng,
                    [
                        f"Endotracheal tube terminates {a['ett_cm_above_carina']} cm above the carina.",
                        "The endotracheal tube is in standard position above the carina.",
                        "Endotracheal tube in place.",
                    ],
                )
            )
        if "nasogastric tube" in a["devices"]:
            parts.append(
                _choice(
                    rng,
                    [
                        "Nasogastric tube courses below the diaphragm with the tip in the stomach.",
                        "The nasogastric tube tip is in the stomach.",
                        "Nasogastric tube in the stomach.",
                    ],
                )
            )
        if "central venous catheter" in a["devices"]:
            cl = a["central_line"]
            line = f"{_cap(cl['laterality'])} {cl['access']}"
            tip = (
                "at the cavoatrial junction"
                if cl["tip"] == "cavoatrial junction"
                else "in the superior vena cava"
            )
            parts.append(
                _choice(
                    rng,
                    [
                        f"{line} central venous catheter with the tip {tip}.",
                        f"A {cl['laterality']} {cl['access']} central venous catheter terminates {tip}.",
                        f"{line} central venous catheter.",
                    ],
                )
            )
        if "pacemaker" in a["devices"]:
            pm = a["pacemaker"]
            chambers = "Dual" if pm["leads"] == 2 else "Single"
            leads = (
                "leads in the right atrium and right ventricle"
                if pm["leads"] == 2
                else "a single lead in the right ventricle"
            )
            parts.append(
                _choice(
                    rng,
                    [
                        f"{_cap(pm['laterality'])}-sided pacemaker with {leads}.",
                        f"{chambers}-chamber pacemaker, generator over the {pm['laterality']} chest.",
                    ],
                )
            )
        return [" ".join(parts)], [
            "Support devices in place.",
            "Lines and tubes in satisfactory position.",
            "Support devices as described.",
        ]
    raise KeyError(name)


_NEGATIONS: dict[str, list[str]] = {
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."],
    "Pleural Effusion": [
        "No pleural effusion.",
        "There is no pleural effusion.",
        "No pleural effusion is seen.",
    ],
    "Consolidation": ["No focal consolidation.", "There is no consolidation.", "No airspace disease."],
    "Edema": ["No pulmonary edema.", "No evidence of pulmonary edema.", "There is no pulmonary edema."],
    "Nodule": ["No pulmonary nodule.", "No suspicious nodule."],
    "Mass": ["No mass.", "No pulmonary mass is seen."],
    "Atelectasis": ["No atelectasis.", "No significant atelectasis."],
    "Cardiomegaly": [
        "Heart size is normal.",
        "The cardiac silhouette is within normal limits.",
        "Normal heart size.",
        "No cardiomegaly.",
    ],
}
_CLEAR_LUNGS = ["The lungs are clear.", "The lungs are clear bilaterally.", "Clear lungs."]
_NORMAL_IMPRESSIONS = [
    "No acute cardiopulmonary abnormality.",
    "No acute cardiopulmonary process.",
    "Normal chest radiograph.",
    "No acute intrathoracic process.",
]
_LUNG_FINDINGS = (
    "Consolidation",
    "Nodule",
    "Mass",
    "Edema",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
)
REPORT_WORDS = (18, 70)  # target range of words per report (fits 96 WordPiece tokens)


def write_report(findings: dict[str, dict], rng: np.random.Generator) -> str:
    """A free-text report, ``"FINDINGS: ...\\nIMPRESSION: ..."``, true of the given findings.

    Every present finding is described in the findings section with its laterality, zone and
    size/severity in varied wording, and summarised (up to three) in the impression, which also
    always names any support devices; absent findings are negated at random; normal studies
    read as normal. About 18-70 words.
    """
    unknown = set(findings) - set(SYNTH_FINDINGS)
    if unknown:
        raise ValueError(f"write_report: unknown finding(s) {sorted(unknown)}")
    options = {name: _phrases(name, attrs, rng) for name, attrs in findings.items()}
    picks = {name: (_choice(rng, body), _choice(rng, imp)) for name, (body, imp) in options.items()}
    disease = [n for n in findings if n != "Support Devices"]
    disease = [disease[i] for i in rng.permutation(len(disease))]
    if "Cardiomegaly" in disease and rng.random() < 0.6:  # the heart is usually discussed last
        disease = [n for n in disease if n != "Cardiomegaly"] + ["Cardiomegaly"]
    order = (["Support Devices"] if "Support Devices" in findings else []) + disease

    absent = [f for f in _NEGATIONS if f not in findings]
    candidates: list[str] = []  # negative statements, in the order they are added
    if not any(f in findings for f in _LUNG_FINDINGS):
        candidates.append(_choice(rng, _CLEAR_LUNGS))
    if "Nodule" in absent and "Mass" in absent and rng.random() < 0.5:
        absent = [f for f in absent if f not in ("Nodule", "Mass")]
        candidates.append(
            _choice(rng, ["No suspicious pulmonary nodules or masses.", "No pulmonary nodule or mass."])
        )
    candidates += [_choice(rng, _NEGATIONS[absent[i]]) for i in rng.permutation(len(absent))]
    n_neg = int(rng.integers(1, 4)) if len(disease) < 3 else int(rng.integers(0, 2))

    impressions = [picks[n][1] for n in disease][:3]
    if not impressions:
        impressions = [_choice(rng, _NORMAL_IMPRESSIONS)]
    # tubes and lines are always summarised, as in practice (first when the study is otherwise
    # normal, else last)
    devices = [picks["Support Devices"][1]] if "Support Devices" in findings else []
    lead = not disease

    def compose(body: list[str], negs: list[str], imp: list[str]) -> str:
        imp = devices + imp if lead else imp + devices
        return f"FINDINGS: {' '.join(body + negs)}\nIMPRESSION: {' '.join(imp)}"

    body = [picks[n][0] for n in order]
    negs = candidates[:n_neg]
    report = compose(body, negs, impressions)
    lo, hi = REPORT_WORDS
    while len(report.split()) < lo and len(negs) < len(candidates):  # too terse: negate more
        negs = candidates[: len(negs) + 1]
        report = compose(body, negs, impressions)
    if len(report.split()) > hi:  # too long: fewer negations, shortest wording, shorter impression
        negs = negs[:1] if negs and negs[0] in _CLEAR_LUNGS else []
        body = [min(options[n][0], key=len) for n in order]
        impressions = [min(options[n][1], key=len) for n in disease][: 2 - bool(devices)] or impressions
        report = compose(body, negs, impressions)
    return report


# --------------------------------------------------------------------------------------------
# corpus and montage


def _labels(findings: dict[str, dict]) -> str:
    return ";".join(f for f in SYNTH_FINDINGS if f in findings) or NO_FINDING


def study(seed: int, split: str, index: int, cfg: SynthConfig) -> tuple[np.ndarray, dict[str, dict], str]:
    """Image, findings and report of sample ``index`` of ``split``; depends only on these."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    image, findings = render_study(rng, cfg)
    return image, findings, write_report(findings, rng)


def _make_row(job: tuple) -> dict[str, str]:
    from PIL import Image

    out_dir, cfg, seed, split, index, kind = job
    image, findings, report = study(seed, split, index, cfg)
    rel = ""
    if kind != "text_only":
        rel = f"images/{split}/{index:06d}.png"
        Image.fromarray(image).save(Path(out_dir) / rel)
    patient = f"syn{seed}-{split}-{index:06d}"
    return {
        "image": rel,
        "text": "" if kind == "image_only" else report,
        "labels": _labels(findings),
        "split": split,
        "patient_id": patient,
        "study_id": f"{patient}-s1",
        "view": "PA",
        "source": "synthetic",
    }


def _train_kinds(n: int, image_only: float, text_only: float, seed: int) -> list[str]:
    kinds = np.array(["paired"] * n, dtype=object)
    n_img, n_txt = int(round(n * image_only)), int(round(n * text_only))
    perm = np.random.default_rng([seed, 7, n]).permutation(n)
    kinds[perm[:n_img]] = "image_only"
    kinds[perm[n_img : n_img + n_txt]] = "text_only"
    return list(kinds)


MANIFEST_COLUMNS = ("image", "text", "labels", "split", "patient_id", "study_id", "view", "source")


def synthesize(
    out_dir,
    *,
    n_train: int,
    n_test: int,
    seed: int = 0,
    cfg: SynthConfig | None = None,
    image_only_fraction: float = 0.25,
    text_only_fraction: float = 0.1,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write a synthetic corpus: PNGs, ``manifest.csv`` and ``synth.json``; returns the manifest.

    Training rows are split into image-only (image + labels), text-only (report + labels) and
    paired rows by the two fractions; test rows are all paired. Every byte depends only on
    ``(seed, split, index)`` and the config, not on ``workers``.
    """
    cfg = cfg or SynthConfig()
    if n_train < 0 or n_test < 0:
        raise ValueError(f"synthesize: n_train={n_train} and n_test={n_test} must be >= 0")
    if image_only_fraction < 0 or text_only_fraction < 0 or image_only_fraction + text_only_fraction > 1:
        raise ValueError(
            f"synthesize: image_only_fraction={image_only_fraction} and "
            f"text_only_fraction={text_only_fraction} "
            "must be >= 0 and sum to at most 1"
        )
    out = Path(out_dir)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    kinds = _train_kinds(n_train, image_only_fraction, text_only_fraction, seed)
    jobs = [(str(out), cfg, seed, "train", i, k) for i, k in enumerate(kinds)]
    jobs += [(str(out), cfg, seed, "test", i, "paired") for i in range(n_test)]
    if workers > 1:
        with multiprocessing.get_context().Pool(workers) as pool:
            rows_iter = pool.imap(_make_row, jobs, chunksize=32)
            rows = list(_progress(rows_iter, len(jobs), progress))
    else:
        rows = list(_progress(map(_make_row, jobs), len(jobs), progress))
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "generator": "xlip.data.synthetic",
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "image_only_fraction": image_only_fraction,
        "text_only_fraction": text_only_fraction,
        "config": cfg.to_dict(),
        "findings": list(SYNTH_FINDINGS),
    }
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return manifest


def _progress(it, total: int, show: bool):
    if not show:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="synthesize", unit="img")


def _caption(name: str, attrs: dict) -> str:
    if name == "Support Devices":
        short = {
            "endotracheal tube": "ETT",
            "nasogastric tube": "NGT",
            "central venous catheter": "CVC",
            "pacemaker": "PM",
        }
        return " ".join(short[d] for d in attrs["devices"])
    keys = ("laterality", "zone", "size", "severity", "pattern", "diameter_px")
    return " ".join(str(attrs[k]) for k in keys if k in attrs)


def montage(
    out_png, *, seed: int = 0, cfg: SynthConfig | None = None, per_finding: int = 4, scale: int = 2
) -> Path:
    """A labelled contact sheet: one row per finding (that finding alone, ``per_finding``
    examples) and a row of normal studies. Names and attributes go in the margins only."""
    from PIL import Image, ImageDraw, ImageFont

    cfg = cfg or SynthConfig()
    tile = cfg.size * scale
    margin, caption = 150, 16
    rows = [*SYNTH_FINDINGS, NO_FINDING]
    sheet = Image.new("L", (margin + per_finding * (tile + 4), len(rows) * (tile + caption + 4)), 255)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    for r, name in enumerate(rows):
        force = {f: f == name for f in SYNTH_FINDINGS}
        row_cfg = dataclasses.replace(cfg, force=force)
        top = r * (tile + caption + 4)
        draw.text((6, top + tile // 2 - 8), name, fill=0, font=font)
        for j in range(per_finding):
            image, findings = render_study(np.random.default_rng([seed, 100 + r, j]), row_cfg)
            left = margin + j * (tile + 4)
            sheet.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (left, top))
            text = (
                _caption(name, findings[name])
                if name in findings
                else ("normal" if name == NO_FINDING else "(not placed)")
            )
            draw.text((left + 2, top + tile + 1), text, fill=0, font=font)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out

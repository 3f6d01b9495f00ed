"""A study's anatomy, pose and exposure: the :class:`Scene` every finding is planned into.

Geometry is in anatomy units (the image spans [-1, 1] before the pose); lungs are described in
side-local coordinates, ``u`` the distance from the midline, with image ``x = SIGN[side] * u``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xlip.data.synthetic.config import SynthConfig
from xlip.data.synthetic.raster import grid

SIGN = {"right": -1.0, "left": 1.0}  # image x = sign * (distance from the midline)
N_TREES = 64  # vessel trees in the bank a lung draws its markings from


@dataclass
class Lung:
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
class Heart:
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
        """(right border x, left border x) of the mediastinum at height y (x < 0: patient right)."""
        mw = self.mw * (1 + 0.2 * np.clip((y + 0.6) / 0.5, 0.0, 1.0))
        below = y > self.lv_y
        t = (y - self.lv_y) / np.where(below, 0.32, self.lv_h)
        left = np.maximum(mw, self.lv * np.sqrt(np.clip(1 - t * t, 0.0, 1.0)))
        kx, ky, kr = self.knob  # a low, vertically stretched bump
        left = np.maximum(left, kx + np.sqrt(np.clip(kr * kr - ((y - ky) / 1.6) ** 2, 0.0, None))
                          - kr * 0.6)
        t = (y - self.ra_y) / self.ra_h
        right = np.maximum(mw, self.ra * np.sqrt(np.clip(1 - t * t, 0.0, 1.0)))
        return -right, left

    @property
    def top(self) -> float:
        return self.lv_y - self.lv_h


@dataclass
class Scene:
    """Every number needed to draw one study (anatomy, pose, exposure, findings geometry)."""

    size: int
    scale: float
    angle: float
    shift: tuple[float, float]
    body_w: float
    body_t: float
    lung_air: float
    tissue: float
    lungs: dict[str, Lung]
    heart: Heart
    spine: tuple[float, float, float, float]  # centre x, half-width, density, vertebra period
    trachea: tuple[float, float, float]  # centre x, half-width, carina y
    ribs: dict[str, float]
    clavicle_y: float
    bubble: tuple[float, float, float] | None  # x, rx, ry
    vessel_amp: float
    texture: np.ndarray  # (g, g) lattice of the parenchymal texture
    exposure: dict[str, float] = field(default_factory=dict)
    # findings geometry, filled by the planners
    # side -> (level, meniscus)
    effusion: dict[str, tuple[float, float]] = field(default_factory=dict)
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
        px, py = grid(self.size)
        c, s = math.cos(self.angle), math.sin(self.angle)
        gx, gy = px - self.shift[0], py - self.shift[1]
        return (c * gx + s * gy) / self.scale, (-s * gx + c * gy) / self.scale

    def fluid_top(self, side: str, u):
        """y of the effusion surface (meniscus rising towards the lateral chest wall)."""
        level, men = self.effusion[side]
        lung = self.lungs[side]
        t = np.clip((u - (lung.uc - lung.a)) / (2 * lung.a), 0.0, 1.0)
        return level - men * t**2


def ptx_radius(scene: Scene, u, y):
    """Lung radius evaluated on the collapsed lung (the lung shrunk towards its medial base)."""
    ptx = scene.pneumothorax
    lung = scene.lungs[ptx["side"]]
    cu, cy = ptx["centre"]
    f = ptx["factor"]
    return lung.radius(cu + (u - cu) / f, cy + (y - cy) / f)


def _uniforms(rng: np.random.Generator, n: int):
    """``u(lo, hi)`` drawing from one pre-drawn block of n uniforms (one generator call)."""
    block = iter(rng.random(n).tolist())
    return lambda lo, hi: lo + (hi - lo) * next(block)


def sample_anatomy(rng: np.random.Generator, size: int) -> Scene:
    """A random normal chest under a random pose (a fixed number of draws from ``rng`` per size)."""
    u = _uniforms(rng, 96)
    g = u(0.82, 1.16)  # overall lung size
    dome_r = u(0.2, 0.46)  # depth of inspiration
    lungs = {}
    for side, dome_top in (("right", dome_r), ("left", dome_r + u(0.0, 0.07))):
        a = u(0.32, 0.37) * g
        uc = u(0.42, 0.46) * (0.5 + 0.5 * g)
        lungs[side] = Lung(uc=uc, yc=u(-0.14, -0.06), a=a, b=u(0.56, 0.66) * g,
                           box=u(0.3, 0.9), tilt=u(0.04, 0.1), dome_top=dome_top,
                           dome_u=uc - u(0.0, 0.1), dome_k=u(0.9, 1.5),
                           hilum=(u(0.13, 0.18), u(-0.12, -0.02)),
                           vessels=int(u(0, N_TREES - 1e-9)))
    mw = u(0.09, 0.12)
    heart = Heart(mw=mw, ra=u(0.19, 0.24), ra_y=lungs["right"].dome_top - u(0.06, 0.12),
                  ra_h=u(0.26, 0.34), lv=u(0.38, 0.46),
                  lv_y=lungs["left"].dome_top - u(0.02, 0.08), lv_h=u(0.38, 0.48),
                  knob=(mw + u(0.01, 0.04), u(-0.46, -0.36), u(0.05, 0.07)),
                  density=u(0.03, 0.1))
    return Scene(
        size=size, scale=u(0.86, 1.06), angle=u(-0.07, 0.07),
        shift=(u(-0.04, 0.04), u(-0.05, 0.04)), body_w=u(0.78, 1.1), body_t=u(0.85, 1.1),
        lung_air=u(0.5, 0.75), tissue=u(0.03, 0.07), lungs=lungs, heart=heart,
        spine=(u(-0.01, 0.01), u(0.055, 0.07), u(0.03, 0.08), u(0.11, 0.14)),
        trachea=(u(-0.015, 0.015), u(0.03, 0.042), u(-0.36, -0.28)),
        ribs={"sp": u(0.1, 0.12), "off": u(0.0, 1.0), "u0": u(0.06, 0.16), "c2": u(0.8, 1.1),
              "fan": u(0.2, 0.45), "wf": u(0.4, 0.52), "amp": u(0.06, 0.13),
              "amp_a": u(0.03, 0.07), "off_a": u(0.0, 1.0), "amp_c": u(0.12, 0.22)},
        clavicle_y=u(-0.78, -0.66),
        bubble=(u(0.22, 0.34), u(0.06, 0.1), u(0.04, 0.06)) if u(0, 1) < 0.75 else None,
        vessel_amp=u(0.1, 0.17),
        texture=rng.random((max(8, size // 5),) * 2, dtype=np.float32),
    )


def sample_exposure(rng: np.random.Generator, cfg: SynthConfig) -> dict[str, float]:
    """Detector response, windowing, blur and noise of one study (10 draws from ``rng``)."""
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

"""Findings: which ones a study shows, their attributes, and their geometry in the scene.

Each finding draws from its own stream (:class:`Streams`), and every attribute draw consumes the
stream whether or not it is forced, so fixing one attribute does not shift the others.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from xlip.data.synthetic.anatomy import SIGN, Scene, ptx_radius
from xlip.data.synthetic.config import (
    ATTRIBUTE_CHOICES, CM_PER_UNIT, DEVICES, SYNTH_FINDINGS, ZONES, SynthConfig,
)


class Streams(dict):
    """One generator per finding, created on first use from a fixed block of seeds."""

    def __init__(self, seeds: np.ndarray) -> None:
        super().__init__()
        self._seeds = dict(zip(SYNTH_FINDINGS, (int(s) for s in seeds)))

    def __missing__(self, name: str) -> np.random.Generator:
        self[name] = np.random.default_rng(self._seeds[name])
        return self[name]


def presence(rng: np.random.Generator, cfg: SynthConfig) -> dict[str, dict[str, Any]]:
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


def plan(streams: Streams, scene: Scene, present: dict[str, dict]) -> dict[str, dict]:
    """Attributes (returned, in :data:`SYNTH_FINDINGS` order) and geometry (into ``scene``) of
    the findings a study shows; a lesion that fits nowhere visible is left out."""
    findings: dict[str, dict] = {}
    if "Cardiomegaly" in present:
        findings["Cardiomegaly"] = _plan_cardiomegaly(streams["Cardiomegaly"], scene,
                                                      present["Cardiomegaly"])
    if "Atelectasis" in present:
        findings["Atelectasis"] = _plan_atelectasis_volume(streams["Atelectasis"], scene,
                                                           present["Atelectasis"])
    if "Pleural Effusion" in present:
        findings["Pleural Effusion"] = _plan_effusion(streams["Pleural Effusion"], scene,
                                                      present["Pleural Effusion"],
                                                      findings.get("Atelectasis"))
    if "Pneumothorax" in present:
        findings["Pneumothorax"] = _plan_pneumothorax(streams["Pneumothorax"], scene,
                                                      present["Pneumothorax"])
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
        findings["Support Devices"] = _plan_devices(streams["Support Devices"], scene,
                                                    present["Support Devices"])
    if "Cardiomegaly" in findings:
        findings["Cardiomegaly"]["ctr"] = round(_heart_ctr(scene), 2)
    return {name: findings[name] for name in SYNTH_FINDINGS if name in findings}


def _pick(rng: np.random.Generator, fixed: dict, key: str, choices: tuple,
          p: list[float] | None = None):
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


def _plan_cardiomegaly(rng, scene: Scene, fixed: dict) -> dict:
    severity = _pick(rng, fixed, "severity", ATTRIBUTE_CHOICES["Cardiomegaly"]["severity"],
                     [0.5, 0.5])
    f = rng.uniform(1.36, 1.46) if severity == "moderate" else rng.uniform(1.5, 1.65)
    h = scene.heart
    h.lv = min(h.lv * f, scene.lungs["left"].lateral - 0.19)  # keep some lung lateral to the heart
    h.ra = min(h.ra * (1 + 0.8 * (f - 1)), scene.lungs["right"].lateral - 0.2)
    h.lv_h *= 1 + 0.3 * (f - 1)
    h.ra_h *= 1 + 0.3 * (f - 1)
    return {"severity": severity}


def _heart_ctr(scene: Scene) -> float:
    """Cardiothoracic ratio: heart width over inner thoracic width."""
    return ((scene.heart.ra + scene.heart.lv)
            / (scene.lungs["right"].lateral + scene.lungs["left"].lateral))


def _plan_atelectasis_volume(rng, scene: Scene, fixed: dict) -> dict:
    choices = ATTRIBUTE_CHOICES["Atelectasis"]
    laterality = _pick(rng, fixed, "laterality", choices["laterality"], [0.4, 0.4, 0.2])
    pattern = _pick(rng, fixed, "pattern", choices["pattern"], [0.6, 0.4])
    lift = rng.uniform(0.07, 0.11, size=2)
    for i, side in enumerate(_sides(laterality)):
        scene.lungs[side].dome_top -= lift[i]
    return {"laterality": laterality, "pattern": pattern}


def _plan_effusion(rng, scene: Scene, fixed: dict, atelectasis: dict | None) -> dict:
    choices = ATTRIBUTE_CHOICES["Pleural Effusion"]
    laterality = _pick(rng, fixed, "laterality", choices["laterality"], [0.35, 0.35, 0.3])
    size = _pick(rng, fixed, "size", choices["size"], [0.35, 0.4, 0.25])
    if ("size" not in fixed and atelectasis
            and set(_sides(laterality)) & set(_sides(atelectasis["laterality"]))):
        size = "small"  # a larger effusion would hide the atelectasis at the same base
    rise = {"small": (-0.1, -0.06), "moderate": (0.18, 0.27), "large": (0.38, 0.5)}[size]
    draws = rng.uniform(0.0, 1.0, size=(2, 2))
    for i, side in enumerate(_sides(laterality)):
        lung = scene.lungs[side]
        level = lung.dome_top - (rise[0] + (rise[1] - rise[0]) * draws[i, 0])
        meniscus = (0.12 if size == "small" else 0.18) + 0.08 * draws[i, 1]
        scene.effusion[side] = (level, meniscus)
    return {"laterality": laterality, "size": size}


def _plan_pneumothorax(rng, scene: Scene, fixed: dict) -> dict:
    choices = ATTRIBUTE_CHOICES["Pneumothorax"]
    side = _pick(rng, fixed, "laterality", choices["laterality"])
    size = _pick(rng, fixed, "size", choices["size"], [0.35, 0.4, 0.25])
    lo, hi = {"small": (0.82, 0.87), "moderate": (0.72, 0.78), "large": (0.58, 0.66)}[size]
    lung = scene.lungs[side]
    centre = (lung.uc - rng.uniform(0.2, 0.45) * lung.a, lung.dome_top - rng.uniform(0.0, 0.08))
    scene.pneumothorax = {"side": side, "factor": rng.uniform(lo, hi), "centre": centre,
                          "dark": rng.uniform(0.06, 0.1)}
    return {"laterality": side, "size": size}


def _plan_atelectasis_shape(rng, scene: Scene, attrs: dict) -> None:
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
            scene.atelectasis.append({"side": side, "kind": "plate", "p0": p0, "p1": p1,
                                      "amp": 0.3 + 0.12 * d[1]})
        else:
            uw = lung.uc + (0.05 + 0.3 * d[0]) * lung.a
            scene.atelectasis.append({"side": side, "kind": "wedge", "u": uw,
                                      "w": 0.22 + 0.08 * d[1], "h": 0.18 + 0.08 * d[2],
                                      "amp": 0.26 + 0.08 * d[3]})


def _place(rng, scene: Scene, side: str, zone: str, radius: float,
           strict: bool) -> tuple[float, float] | None:
    """Sample a lesion centre (u, y) inside the visible ``zone`` of a lung, clear of the heart and
    mediastinum and (``strict``) of the effusion, pneumothorax gap and other lesions; None when
    nothing fits. All candidates are tested at once; the first that fits wins."""
    lung = scene.lungs[side]
    sign = SIGN[side]
    z = ZONES.index(zone)
    tries = 48 if strict else 4 * 48
    cu, cy = rng.uniform(0.0, 1.0, size=(2, tries))
    u = lung.uc + (2 * cu - 1) * (0.8 if strict else 0.95) * lung.a
    dome = lung.dome(u)
    base = np.minimum(dome, lung.yc + lung.b)
    y = lung.apex + (base - lung.apex) * (z + 0.15 + 0.7 * cy) / 3
    margin = 0.06 if strict else 0.0
    ok = ((lung.radius(u, y) <= 1 - radius / min(lung.a, lung.b) - margin)
          & (y <= dome - radius - margin / 2))
    right, left = scene.heart.edges(y)
    ok &= u - radius >= (-right if side == "right" else left) + margin * 0.6
    if strict and side in scene.effusion:
        ok &= y <= scene.fluid_top(side, u) - radius - 0.06
    if strict and scene.pneumothorax.get("side") == side:
        ok &= ptx_radius(scene, u, y) <= 1 - radius / lung.a - 0.08
    for l in scene.lesions if strict else ():
        ok &= np.hypot(sign * u - l["x"], y - l["y"]) >= radius + l["r"] + 0.05
    for a in scene.atelectasis if strict else ():
        if a["side"] == side:
            ok &= np.abs(y - _atelectasis_y(a, scene)) >= radius + 0.06
    hits = np.flatnonzero(ok)
    return (float(u[hits[0]]), float(y[hits[0]])) if len(hits) else None


def _atelectasis_y(a: dict, scene: Scene) -> float:
    if a["kind"] == "plate":
        return 0.5 * (a["p0"][1] + a["p1"][1])
    return float(scene.lungs[a["side"]].dome(a["u"])) - a["h"] / 2


def _plan_lesion(rng, scene: Scene, fixed: dict, name: str) -> dict | None:
    """Nodule, Mass or Consolidation: laterality + zone + size, placed where it is visible."""
    choices = ATTRIBUTE_CHOICES[name]
    side = _pick(rng, fixed, "laterality", choices["laterality"])
    zone = _pick(rng, fixed, "zone", choices["zone"])
    size_draw, amp_draw, shape_seed = rng.random(), rng.random(), int(rng.integers(0, 2**31 - 1))
    px = {"Nodule": (5.0, 9.0), "Mass": (14.0, 24.0), "Consolidation": (18.0, 28.0)}[name]
    diameter_px = (px[0] + (px[1] - px[0]) * size_draw) * scene.size / 128
    radius = diameter_px / 2 * scene.unit_px  # anatomy units
    others = [(s, z)
              for s in (choices["laterality"] if "laterality" not in fixed else (side,))
              for z in (ZONES if "zone" not in fixed else (zone,))
              if (s, z) != (side, zone)]
    order = rng.permutation(len(others))
    fit = {"Nodule": 1.0, "Mass": 0.6, "Consolidation": 0.4}[name]  # masses may abut the pleura
    # where it was drawn, else elsewhere it is free to go, else (when attributes were fixed)
    # overlapping other findings; a finding that fits nowhere is not shown and not reported
    attempts = ([(side, zone, True)] + [(*others[i], True) for i in order]
                + [(side, zone, False)] * bool(fixed))
    for s, z, strict in attempts:
        spot = _place(rng, scene, s, z, radius * fit, strict)
        if spot is not None:
            break
    else:
        return None
    u, y = spot
    amp = {"Nodule": (0.45, 0.65), "Mass": (0.5, 0.7), "Consolidation": (0.4, 0.6)}[name]
    scene.lesions.append({"kind": name, "side": s, "x": SIGN[s] * u, "y": y, "r": radius,
                          "amp": amp[0] + (amp[1] - amp[0]) * amp_draw, "seed": shape_seed})
    cx, cy = scene.to_pixels(SIGN[s] * u, y)
    attrs = {"laterality": s, "zone": z, "diameter_px": round(float(diameter_px), 1),
             "center_px": [round(float(cx), 1), round(float(cy), 1)]}
    if name != "Consolidation":
        attrs["diameter_cm"] = round(float(2 * radius * CM_PER_UNIT), 1)
    return attrs


def _plan_edema(rng, scene: Scene, fixed: dict) -> dict:
    severity = _pick(rng, fixed, "severity", ATTRIBUTE_CHOICES["Edema"]["severity"])
    lo, hi = {"mild": (0.2, 0.25), "moderate": (0.27, 0.33), "severe": (0.36, 0.44)}[severity]
    scene.edema = rng.uniform(lo, hi)
    scene.kerley = rng.random(64) < 0.7
    return {"severity": severity}


def _plan_devices(rng, scene: Scene, fixed: dict) -> dict:
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
        pts = [(0.03, -1.3), (0.035, -0.6), (0.04, 0.0), (0.07, left.dome_top + 0.1),
               (sx, dome_y + 0.16 + 0.06 * u[2]), (sx + 0.1, dome_y + 0.12)]
        scene.devices.append({"points": pts, "width": 1.2 * w, "amp": 1.4})
    if "central venous catheter" in chosen:
        side = "right" if u[3] < 0.65 else "left"
        access = "internal jugular" if u[4] < 0.5 else "subclavian"
        s = SIGN[side]
        svc_x = -0.8 * h.mw
        tip_at_junction = u[5] < 0.4
        tip_y = h.top + 0.08 if tip_at_junction else h.top - 0.06 - 0.08 * u[6]
        if access == "internal jugular":
            start = [(s * 0.14, -1.3), (s * 0.13, -0.85), (s * 0.1, -0.62)]
        else:
            start = [(s * 0.64, -0.88 + 0.03 * u[7]), (s * 0.42, scene.clavicle_y + 0.1),
                     (s * 0.2, -0.6)]
        pts = start + [(svc_x + 0.02 * (s > 0), -0.45), (svc_x, tip_y)]
        scene.devices.append({"points": pts, "width": 1.2 * w, "amp": 1.3})
        attrs["central_line"] = {
            "laterality": side, "access": access,
            "tip": "cavoatrial junction" if tip_at_junction else "superior vena cava"}
    if "pacemaker" in chosen:
        side = "left" if u[8] < 0.8 else "right"
        s = SIGN[side]
        bx, by = s * (0.5 + 0.08 * u[9]), scene.clavicle_y + 0.2 + 0.06 * u[10]
        leads = 2 if u[11] < 0.6 else 1
        scene.devices.append({"box": (bx, by, 0.075, 0.052), "amp": 2.0})
        via = [(bx - s * 0.06, by + 0.02), (s * 0.2, -0.6), (-0.7 * h.mw, -0.45),
               (-0.8 * h.mw, h.top + 0.02)]
        rv = via + [(-0.03, h.lv_y - 0.12), (0.55 * h.lv, h.lv_y + 0.02)]
        scene.devices.append({"points": rv, "width": 1.2 * w, "amp": 1.4})
        if leads == 2:
            ra = via + [(-0.6 * h.ra, h.ra_y - 0.14), (-0.65 * h.ra, h.ra_y - 0.06)]
            scene.devices.append({"points": ra, "width": 1.2 * w, "amp": 1.4})
        attrs["pacemaker"] = {"laterality": side, "leads": leads}
    return attrs

"""Drawing a planned scene: attenuation map, radio-opaque devices, exposure to a uint8 image.

Structures are drawn inside their own bounding boxes (crops) to keep a 128-px study at a few
milliseconds.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from xlip.data.synthetic.anatomy import (
    N_TREES, SIGN, Lung, Scene, ptx_radius, sample_anatomy, sample_exposure,
)
from xlip.data.synthetic.config import SYNTH_FINDINGS, SynthConfig
from xlip.data.synthetic.findings import Streams, plan, presence
from xlip.data.synthetic.raster import (
    catmull_rom, gaussian_blur, segment_distance, smooth_noise, soft, splat, stretch, widen,
)


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
    scene = sample_anatomy(rng, cfg.size)  # fixed number of draws from rng in this order ...
    scene.exposure = sample_exposure(rng, cfg)
    present = presence(rng, cfg)
    streams = Streams(rng.integers(0, 2**62, size=len(SYNTH_FINDINGS)))  # ... a seed per finding
    findings = plan(streams, scene, present)
    density = _render_density(scene)
    metal = _devices(scene) if scene.devices else None
    return _expose(density, metal, scene.exposure, rng), findings


def _box(scene: Scene, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """Pixel (rows, cols) slices covering the anatomy-coordinate box [x0, x1] x [y0, y1]."""
    c, s = math.cos(scene.angle) * scene.scale, math.sin(scene.angle) * scene.scale
    half = scene.size / 2.0
    xs = [(c * x - s * y + scene.shift[0] + 1.0) * half - 0.5 for x in (x0, x1) for y in (y0, y1)]
    ys = [(s * x + c * y + scene.shift[1] + 1.0) * half - 0.5 for x in (x0, x1) for y in (y0, y1)]
    n = scene.size
    c0, c1 = max(0, int(min(xs)) - 2), min(n, int(max(xs)) + 3)
    r0, r1 = max(0, int(min(ys)) - 2), min(n, int(max(ys)) + 3)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _render_density(scene: Scene) -> np.ndarray:
    """Attenuation map (H, W) without devices: 0 air outside the body, ~1 soft tissue, more for
    bone."""
    size = scene.size
    X, Y = scene.anatomy_grid()  # (H, W) each
    pu = scene.unit_px
    absx = np.abs(X)

    # body: soft tissue with a chord-length thickness profile, wider at the shoulders
    w = scene.body_w * (1 + 0.12 * np.clip(-Y - 0.5, 0, 1) - 0.08 * np.clip(Y - 0.4, 0, 1))
    inside = soft((w - absx) / pu)
    t = X / w
    D = scene.body_t * (0.3 + 0.7 * np.sqrt(np.clip(1 - t * t, 0, 1))) * inside

    h = scene.heart
    lungs = scene.lungs.values()
    top = min(l.apex for l in lungs) - 0.15
    bottom = max(float(l.dome(l.lateral)) for l in lungs) + 0.12
    sl = _box(scene, -max(h.lv, h.ra) - 0.05, max(h.lv, h.ra) + 0.05, top, bottom)
    right, left = h.edges(Y[sl])
    solid = np.zeros_like(D)  # cardiomediastinal silhouette
    solid[sl] = soft((X[sl] - right) / pu) * soft((left - X[sl]) / pu)
    texture = stretch(scene.texture, size)  # (H, W) smooth noise in [0, 1]
    ptx = scene.pneumothorax
    visible_full = np.zeros_like(D)
    vessels = _vessels(scene)
    for side, lung in scene.lungs.items():
        sign = SIGN[side]
        lo_u, hi_u = lung.uc - lung.a - lung.tilt - 0.02, lung.lateral + 0.02
        bottom = max(lung.yc + lung.b, float(lung.dome(lung.lateral))) + 0.02
        sl = _box(scene, min(sign * lo_u, sign * hi_u), max(sign * lo_u, sign * hi_u),
                  lung.apex - 0.02, bottom)
        Xs, Ys = X[sl], Y[sl]
        u = sign * Xs
        r = lung.radius(u, Ys)
        outline = soft((1 - r) * (min(lung.a, lung.b) / pu))
        shape = outline * soft((lung.dome(u) - Ys) / pu)  # lung field above the hemidiaphragm
        visible = shape * (1 - solid[sl])
        if side in scene.effusion:
            fluid = np.clip((Ys - scene.fluid_top(side, u)) * 16 + 0.3, 0, 1)  # thins upwards
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
            rc = ptx_radius(scene, u, Ys)
            # the gap stays apical and lateral
            below = np.clip((ptx["centre"][1] + 0.05 - Ys) / 0.12, 0, 1)
            scaled = lung.a * ptx["factor"] / pu  # radius units -> pixels
            gap = soft((rc - 1) * scaled) * below
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
        D[sl] -= 0.3 * soft((1 - np.sqrt(dx * dx + dy * dy)) * (ry / pu))
    return D


@lru_cache(maxsize=4)
def _vessel_bank(size: int) -> tuple[tuple[np.ndarray, int, int], ...]:
    """A fixed bank of rasterised vessel trees for a left lung at scale 1.

    Each tree has three generations of branches from the hilum (8 trunks, each branch forking
    in two; wide proximal vessels, thin distal ones) and is stored as (patch, hilum row, hilum
    column). Drawing trees once and pasting them per study (mirrored for the right lung) keeps
    rendering fast; the lung mask clips them to the lung.
    """
    rng = np.random.default_rng(20240607)  # fixed: the bank is part of the generator, not a study
    step = 1.0 / size  # half a pixel at scale 1
    px = 2.0 / size
    bank = []
    for _ in range(N_TREES):
        ang = np.sort(rng.uniform(-1.5, 1.4, 8))
        start = np.column_stack([0.02 * np.cos(ang), 0.02 * np.sin(ang)])
        length = rng.uniform(0.32, 0.6, 8)
        strength = np.ones(8)
        parts = []
        for level in range(3):
            n_pts = int(length.max() / step) + 1
            theta = (ang[:, None]
                     + rng.normal(0.0, 0.06, (len(ang), n_pts)).cumsum(axis=1))  # (B, N)
            pts_u = start[:, :1] + step * np.cos(theta).cumsum(axis=1)  # (B, N)
            pts_y = start[:, 1:] + step * np.sin(theta).cumsum(axis=1)
            t = np.arange(1, n_pts + 1) * step / length[:, None]  # (B, N) fraction along branch
            keep = t <= 1.0
            parts.append((pts_u[keep], pts_y[keep],
                          0.5 * (strength[:, None] * (1.0 - 0.65 * t))[keep]))
            # two children per branch, forking off at 30-75 % of its length
            parent = np.repeat(np.arange(len(ang)), 2)
            tc = rng.uniform(0.3, 0.75, len(parent))
            idx = np.minimum((tc * length[parent] / step).astype(int), n_pts - 1)
            start = np.column_stack([pts_u[parent, idx], pts_y[parent, idx]])
            ang = theta[parent, idx] + (rng.choice([-1.0, 1.0], len(parent))
                                        * rng.uniform(0.3, 0.7, len(parent)))
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
            layers.append(splat(cu, cy, (h, w), np.concatenate([p[2] for p in group])))
        patch = np.minimum(widen(layers[0]) + layers[1], 1.2)  # proximal vessels are wider
        bank.append((patch.astype(np.float32), int(round(-y0 / px)), int(round(-u0 / px))))
    return tuple(bank)


def _vessels(scene: Scene) -> np.ndarray:
    """Pulmonary vessel markings of both lungs, (H, W): one tree of the bank pasted per lung."""
    size = scene.size
    out = np.zeros((size, size), np.float32)
    bank = _vessel_bank(size)
    for side, lung in scene.lungs.items():
        patch, hr, hc = bank[lung.vessels]
        if side == "right":
            patch, hc = patch[:, ::-1], patch.shape[1] - 1 - hc
        cx, cy = scene.to_pixels(SIGN[side] * lung.hilum[0], lung.hilum[1])
        r0, c0 = int(round(cy)) - hr, int(round(cx)) - hc
        h, w = patch.shape
        rs, cs = max(0, -r0), max(0, -c0)
        re, ce = min(h, size - r0), min(w, size - c0)
        if re > rs and ce > cs:
            out[r0 + rs : r0 + re, c0 + cs : c0 + ce] += patch[rs:re, cs:ce]
    return (scene.vessel_amp * (1.5 if scene.edema else 1.0)) * out


def _edema(scene: Scene, lung: Lung, u, Y, du, dy, texture) -> np.ndarray:
    """Perihilar (bat-wing) haze, reticular interstitial pattern and basal Kerley B lines."""
    haze = np.exp(du * du * (-1 / 0.34**2) + dy * dy * (-1 / 0.42**2))
    reticular = np.clip((texture - 0.45) * 4, 0, 1)
    periphery = (np.clip((u - (lung.lateral - 0.12)) / 0.04, 0, 1)
                 * np.clip((Y - lung.yc) / 0.15, 0, 1))
    spacing = 0.055
    phase = Y / spacing
    on = scene.kerley[np.floor(phase).astype(int) % len(scene.kerley)]
    kerley = (np.clip(1 - np.abs(phase % 1.0 - 0.5) * (spacing / scene.px128), 0, 1)
              * periphery * on)
    return scene.edema * (haze + 0.5 * reticular) + 0.3 * kerley


def _draw_atelectasis(scene: Scene, a: dict, D, X, Y, visible) -> None:
    """Plate-like: a thin band along a segment; basilar: a wedge on the hemidiaphragm."""
    pu = scene.unit_px
    lung = scene.lungs[a["side"]]
    sign = SIGN[a["side"]]
    if a["kind"] == "plate":
        (u0, y0), (u1, y1) = a["p0"], a["p1"]
        sl = _box(scene, min(sign * u0, sign * u1) - 0.03, max(sign * u0, sign * u1) + 0.03,
                  min(y0, y1) - 0.03, max(y0, y1) + 0.03)
        d = segment_distance(sign * X[sl], Y[sl], a["p0"], a["p1"])
        D[sl] += a["amp"] * np.clip((1.5 * scene.px128 - d) / (1.5 * pu) + 0.5, 0, 1) * visible[sl]
        return
    # basilar: hazy triangular density on the (elevated) hemidiaphragm, capped by a linear band
    uu = a["u"]
    sl = _box(scene, sign * uu - a["w"] - 0.02, sign * uu + a["w"] + 0.02,
              lung.dome_top - a["h"] - 0.05, lung.yc + lung.b + 0.05)
    u, Ys = sign * X[sl], Y[sl]
    tri = np.clip(1 - np.abs(u - uu) / a["w"], 0, 1)
    top = lung.dome(u) - a["h"] * tri
    haze = np.clip((Ys - top) / 0.1, 0, 1) * (tri > 0)
    band = np.clip(1.5 - np.abs(Ys - top - 0.03) / scene.px128, 0, 1) * (tri > 0.2)
    D[sl] += (a["amp"] * haze + 0.35 * band) * visible[sl]


def _draw_lesion(scene: Scene, lesion: dict, D, X, Y, visible) -> None:
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
        edge = R * (1 + 0.25 * np.sin(k * theta + rng.uniform(0, 6.3))
                    + 0.15 * np.sin((k + 2) * theta + rng.uniform(0, 6.3)))
        envelope = np.clip((edge - r) / (0.35 * R), 0, 1)
        noise = smooth_noise(rng, max(6, scene.size // 8), scene.size)
        patches = np.clip((noise[sl] - 0.3) / 0.3, 0, 1)
        density = lesion["amp"] * envelope * (0.35 + 0.65 * patches)
    else:
        if lesion["kind"] == "Mass":
            theta = np.arctan2(dy, dx)
            edge = R * (1 + 0.1 * np.sin(3 * theta + rng.uniform(0, 6.3))
                        + 0.06 * np.sin(5 * theta + rng.uniform(0, 6.3)))
        else:
            edge = R
        q = r / edge
        density = (lesion["amp"] * (0.45 + 0.55 * np.sqrt(np.clip(1 - q * q, 0, 1)))
                   * soft((edge - r) / pu))
    D[sl] += density * visible[sl]


def _draw_airways(scene: Scene, D, X, Y) -> None:
    """Trachea and main bronchi (air: darker than the mediastinum)."""
    tcx, tw, carina = scene.trachea
    pu = scene.unit_px
    sl = _box(scene, tcx - 0.2, tcx + 0.2, -1.3, carina + 0.17)
    Xs, Ys = X[sl], Y[sl]
    trachea = soft((tw - np.abs(Xs - tcx)) / pu) * soft((carina - Ys) / pu)
    for sgn in (-1.0, 1.0):
        bronchus = segment_distance(Xs, Ys, (tcx, carina), (tcx + sgn * 0.14, carina + 0.14))
        trachea = np.maximum(trachea, soft((tw * 0.75 - bronchus) / pu))
    D[sl] -= 0.16 * trachea


def _draw_ribs(scene: Scene, D, X, Y, solid) -> None:
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
    cage = (np.clip((lat - absx) * 10, 0, 1)
            * np.clip(np.minimum((Ys - top) * 10, (bottom - Ys) * 8), 0, 1))
    cage *= 1 - 0.6 * solid[sl]
    uu = u - rb["u0"]
    phase = (Ys + 0.95 - rb["c2"] * uu * uu) / (rb["sp"] * (1 + rb["fan"] * u)) + rb["off"]
    f = phase - np.floor(phase)
    wpx = rb["sp"] / pu * (1 + rb["fan"] * u)
    band = np.clip(np.minimum(f, rb["wf"] - f) * wpx + 0.5, 0, 1)
    pa = (Ys + 0.5 * u) / (rb["sp"] * 1.3) + rb["off_a"]
    fa = pa - np.floor(pa)
    anterior = (np.clip(np.minimum(fa, 0.35 - fa) * (rb["sp"] * 1.3 / pu) + 0.5, 0, 1)
                * np.clip((u - 0.3) * 5, 0, 1))
    D[sl] += (rb["amp"] * band + rb["amp_a"] * anterior) * cage
    cy = scene.clavicle_y
    sl = _box(scene, -0.85, 0.85, cy - 0.2, cy + 0.1)
    u = np.abs(X[sl])
    clav = np.minimum(segment_distance(u, Y[sl], (0.05, cy + 0.05), (0.35, cy)),
                      segment_distance(u, Y[sl], (0.35, cy), (0.75, cy - 0.12)))
    D[sl] += rb["amp_c"] * soft((0.026 - clav) / pu) * (u > 0.05)


def _devices(scene: Scene) -> np.ndarray:
    """Radio-opaque tubes, lines and pacemaker, splatted in pixel space (1-2 px wide)."""
    size = scene.size
    canvas = np.zeros((size, size), np.float32)
    for dev in scene.devices:
        if "box" in dev:
            bx, by, hwid, hhei = dev["box"]
            X, Y = scene.anatomy_grid()
            d = np.minimum(hwid - np.abs(X - bx), hhei - np.abs(Y - by))
            canvas = np.maximum(canvas, dev["amp"] * soft(d / scene.unit_px))
            continue
        curve = catmull_rom(dev["points"], step=0.5 * scene.unit_px)  # (N, 2) anatomy units
        cx, cy = scene.to_pixels(curve[:, 0], curve[:, 1])
        layer = np.minimum(splat(cx, cy, size, np.full(len(cx), 0.8)), 1.0)
        if dev["width"] / scene.unit_px > 1.5:
            layer = widen(layer)
        canvas = np.maximum(canvas, dev["amp"] * layer)
    return canvas


@lru_cache(maxsize=128)
def _gamma_lut(gamma: float) -> np.ndarray:
    return (np.linspace(0.0, 1.0, 4096, dtype=np.float64) ** gamma).astype(np.float32)


def _expose(D: np.ndarray, metal: np.ndarray | None, ex: dict[str, float],
            rng: np.random.Generator) -> np.ndarray:
    """Attenuation -> detector response -> blur -> auto-window -> gamma -> noise -> uint8.

    The window comes from the anatomy alone (``D``), so that metal (``metal``) only brightens
    its own pixels and does not shift the global intensity statistics.
    """
    step = max(1, D.shape[0] // 64)
    sample = np.sort(1.0 - np.exp(D[::step, ::step] * -ex["k"]), axis=None)
    if metal is not None:
        D = D + metal
    img = 1.0 - np.exp(D * -ex["k"])
    img = gaussian_blur(img.astype(np.float32), ex["blur"])
    lo = sample[int(ex["p_lo"] / 100 * (sample.size - 1))]
    hi = sample[int(ex["p_hi"] / 100 * (sample.size - 1))]
    hi += ex["headroom"] * (hi - lo)
    img = np.clip((img - lo) * (4095.0 / max(hi - lo, 1e-3)), 0.0, 4095.0)
    img = _gamma_lut(round(ex["gamma"], 2))[img.astype(np.int32)]
    img = ex["out_lo"] + (ex["out_hi"] - ex["out_lo"]) * img
    size = img.shape[0]
    img += ex["mottle"] * (smooth_noise(rng, 6, size) - 0.5)
    img += (ex["noise"] * 3.4641) * (rng.random(img.shape, dtype=np.float32) - 0.5)  # std = noise
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

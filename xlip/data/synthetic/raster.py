"""Numerical helpers on the pixel grid (all vectorised, elementwise: no BLAS threads)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
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


def stretch(lattice: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly stretch a (g, g) lattice to (size, size)."""
    i0, w = _stretch_weights(lattice.shape[0], size)
    rows = lattice[i0] * (1 - w)[:, None] + lattice[i0 + 1] * w[:, None]  # (size, g)
    return rows[:, i0] * (1 - w) + rows[:, i0 + 1] * w  # (size, size)


def smooth_noise(rng: np.random.Generator, g: int, size: int) -> np.ndarray:
    """Uniform noise on a g x g lattice, bilinearly stretched to (size, size); values in [0, 1]."""
    return stretch(rng.random((g, g), dtype=np.float32), size)


def soft(d: np.ndarray) -> np.ndarray:
    """Anti-aliased inside test: d is a signed distance in pixels, positive inside."""
    return np.clip(d + 0.5, 0.0, 1.0)


def segment_distance(x: np.ndarray, y: np.ndarray, p0: tuple[float, float],
                     p1: tuple[float, float]) -> np.ndarray:
    """Euclidean distance from every (x, y) to the segment p0-p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    ex, ey = x - p0[0], y - p0[1]
    t = np.clip((ex * dx + ey * dy) * (1.0 / (dx * dx + dy * dy + 1e-12)), 0.0, 1.0)
    ex, ey = ex - t * dx, ey - t * dy
    return np.sqrt(ex * ex + ey * ey)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
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


def catmull_rom(points: list[tuple[float, float]], step: float) -> np.ndarray:
    """Smooth curve through the points, sampled about every ``step``; returns (N, 2)."""
    p = np.asarray(points, np.float64)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        n = max(2, int(np.linalg.norm(p2 - p1) / step) + 1)
        t = np.linspace(0.0, 1.0, n, endpoint=i == len(p) - 3)[:, None]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    return np.vstack(out)


def splat(cx: np.ndarray, cy: np.ndarray, shape: int | tuple[int, int],
          weight: np.ndarray) -> np.ndarray:
    """Bilinear additive splat of weighted points (pixel coordinates) onto a canvas of ``shape``
    (an int for square)."""
    h, w = (shape, shape) if isinstance(shape, int) else shape
    ok = (cx >= 0) & (cx < w - 1) & (cy >= 0) & (cy < h - 1)
    cx, cy, weight = cx[ok], cy[ok], weight[ok]
    x0, y0 = cx.astype(np.intp), cy.astype(np.intp)
    fx, fy = cx - x0, cy - y0
    i = y0 * w + x0
    idx = np.concatenate([i, i + 1, i + w, i + w + 1])
    wts = (np.concatenate([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
           * np.tile(weight, 4))
    return np.bincount(idx, weights=wts, minlength=h * w).reshape(h, w).astype(np.float32)


def widen(layer: np.ndarray) -> np.ndarray:
    """Make lines one pixel wider (max with the left neighbour)."""
    out = layer.copy()
    np.maximum(layer[:, 1:], layer[:, :-1], out=out[:, 1:])
    return out

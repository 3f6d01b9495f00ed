"""Image loading (PNG / JPG / DICOM) and transforms, in numpy/PIL/torch (no torchvision)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class ImageError(ValueError):
    """An image that cannot be decoded."""


def load_image(path: str | Path) -> np.ndarray:
    """Decode to float32 (H, W) in [0, 1]. DICOM: rescale, VOI LUT/window, MONOCHROME1 inverted."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".dcm":
            return _load_dicom(path)
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                return (arr - lo) / max(hi - lo, 1.0)
            arr = np.asarray(im.convert("L"), dtype=np.float32)
            return arr / 255.0
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"image {path} cannot be decoded ({type(err).__name__}: {err}); "
                         "replace the file or remove its manifest row") from None


def _load_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds).astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / max(hi - lo, 1e-6)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = 1.0 - arr
    return arr


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr, mode="F").resize((size, size), Image.BILINEAR))


def random_crop_resize(arr: np.ndarray, size: int, rng: random.Random,
                       scale: tuple[float, float] = (0.8, 1.0),
                       ratio: tuple[float, float] = (0.9, 1.1)) -> np.ndarray:
    """RandomResizedCrop on a float image."""
    H, W = arr.shape
    area = H * W * rng.uniform(*scale)
    aspect = rng.uniform(*ratio)
    h = min(H, int(round((area / aspect) ** 0.5)))
    w = min(W, int(round((area * aspect) ** 0.5)))
    top, left = rng.randint(0, H - h), rng.randint(0, W - w)
    crop = arr[top:top + h, left:left + w]
    return np.asarray(Image.fromarray(crop, mode="F").resize((size, size), Image.BILINEAR))


def jitter(arr: np.ndarray, rng: random.Random) -> np.ndarray:
    """Brightness/contrast/gamma jitter on a [0, 1] image."""
    arr = np.clip(arr, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    return arr * rng.uniform(0.85, 1.15) + rng.uniform(-0.08, 0.08)


def normalize(arr: np.ndarray) -> np.ndarray:
    """Per-image zero mean, unit variance."""
    return (arr - arr.mean()) / (arr.std() + 1e-6)


def prepare_image(path: str | Path, size: int, rng: random.Random | None = None) -> torch.Tensor:
    """Load → (augment when rng is given) → resize → normalise: (1, size, size) float32."""
    arr = load_image(path)
    if rng is not None:
        arr = jitter(random_crop_resize(arr, size, rng), rng)
    else:
        arr = resize(arr, size)
    return torch.from_numpy(np.ascontiguousarray(normalize(arr), dtype=np.float32))[None]

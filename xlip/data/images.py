"""Image loading (PNG / JPG / DICOM) and transforms, in numpy/PIL/torch (no torchvision)."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xlip.data.storage import read_shard_member, split_shard_path
from xlip.errors import InputError, XlipError


class ImageError(XlipError, ValueError):
    """An image that cannot be decoded.

    ``str(err)`` names the file and the fix; ``err.reason`` is the short cause without the path
    (``"unreadable DICOM (no pixel data ...)"``), for rejects files and validation reports.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


# Leading bytes of the formats chest X-ray sets come in (DICOM: "DICM" after a 128-byte preamble).
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF",
          b"MM\x00*": "TIFF", b"BM": "BMP", b"GIF8": "GIF", b"\x00\x00\x00\x0cjP  ": "JPEG 2000"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


def sniff_format(path: str | Path) -> str:
    """The format by content: "DICOM", "PNG", "JPEG", ... or "" (unknown, or an empty file).

    DICOM files often carry no suffix, and a file's suffix can lie."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM":
        return "DICOM"
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), "")


def _failure(path: Path, reason: str) -> ImageError:
    return ImageError(f"image {path}: {reason}; replace the file or remove its manifest row",
                      reason)


def load_image(path: str | Path) -> np.ndarray:
    """Decode to float32 (H, W) in [0, 1].

    PNG / JPEG / ...: 8-bit divided by 255, 16-bit and 32-bit scaled by the image's own range,
    colour to luminance. DICOM: see :func:`_load_dicom`. ``.../shard-000000.tar#000001.png``:
    that member of a tar shard (see :mod:`xlip.data.storage`).

    Raises:
        ImageError: missing, empty, not an image, corrupt, or a DICOM xlip cannot use; the
            message names the file, ``reason`` the cause.
    """
    path = Path(path)
    if split_shard_path(path):
        return _load_member(path)
    if not path.is_file():
        raise _failure(path, "missing image file")
    fmt, dicom = "", path.suffix.lower() in (".dcm", ".dicom")
    try:
        if path.stat().st_size == 0:
            raise _failure(path, "empty file (0 bytes)")
        fmt = sniff_format(path)
        dicom = dicom or fmt == "DICOM"
        return _load_dicom(path) if dicom else _load_pil(path)
    except ImageError:
        raise
    except UnidentifiedImageError:
        if fmt:
            raise _failure(path, f"unreadable image (corrupt {fmt}: the header is there, the "
                                 "rest cannot be parsed)") from None
        with open(path, "rb") as fh:
            head = fh.read(12)
        raise _failure(path, f"not an image (no known image format; the file starts {head!r})"
                       ) from None
    except Exception as err:  # decoders raise many kinds for corrupt data
        kind = "DICOM" if dicom else "image"
        raise _failure(path, f"unreadable {kind} ({type(err).__name__}: {err})") from None


def image_problem(path: str) -> str:
    """'' if the image decodes (DICOM included), else a short reason: "missing image file",
    "empty file (0 bytes)", "not an image (...)", "unreadable image (...)",
    "unreadable DICOM (...)", "multi-frame DICOM (...)"."""
    try:
        load_image(path)
    except ImageError as err:
        return err.reason
    return ""


def _load_member(path: Path) -> np.ndarray:
    try:
        return _load_pil(io.BytesIO(read_shard_member(path)))
    except FileNotFoundError as err:
        raise _failure(path, f"missing image file ({err})") from None
    except Exception as err:  # a damaged shard, or decoders' many kinds of error
        raise _failure(path, f"unreadable image ({type(err).__name__}: {err})") from None


def _load_pil(path: Path | io.BytesIO) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return _unit_range(np.asarray(im, dtype=np.float32))
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _unit_range(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    return ((arr - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def _load_dicom(path: Path) -> np.ndarray:
    """One DICOM frame as float32 (H, W) in [0, 1], dark = low attenuation as on a monitor.

    Stored values (pydicom masks them to BitsStored and sign-extends signed ones) → modality LUT
    (RescaleSlope / RescaleIntercept or a Modality LUT) → VOI LUT or window (the first of several)
    → scaled by the image's own range → MONOCHROME1 inverted, last: windows are given in the
    stored values' direction. Colour (RGB, YBR, palette) → luminance, without windowing.

    Raises:
        ImageError: no pixel data (truncated file, or not an image object), several frames.
    """
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise _failure(path, "unreadable DICOM (no pixel data: a truncated file, or not an "
                             "image object)")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise _failure(path, f"multi-frame DICOM ({frames} frames; xlip reads one radiograph "
                             "per file: save the frame to use as its own file)")
    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # (H, W, 3) colour, as RGB (pydicom converts YBR)
        return _unit_range(arr.astype(np.float32) @ _LUMA)  # (H, W)
    arr = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds and arr.dtype.kind == "f":  # a VOI LUT is indexed by integers
        arr = np.rint(arr).astype(np.int64)
    arr = _unit_range(apply_voi_lut(arr, ds).astype(np.float32))
    return 1.0 - arr if photometric == "MONOCHROME1" else arr


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom") or sniff_format(path) == "DICOM":
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    with Image.open(path) as im:
        return im.size


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


def normalize(arr: np.ndarray, stats: tuple[float, float] | None = None) -> np.ndarray:
    """Zero mean, unit variance: per image (``stats`` None), or with a dataset's fixed
    (mean, std), so that an image's masked pixels do not shift its visible ones."""
    mean, std = stats if stats is not None else (arr.mean(), arr.std())
    return (arr - mean) / (std + 1e-6)


def prepare_image(path: str | Path, size: int, rng: random.Random | None = None,
                  stats: tuple[float, float] | None = None) -> torch.Tensor:
    """Load → (augment when rng is given) → resize → normalise: (1, size, size) float32.
    ``stats``: the dataset's (mean, std) of [0, 1] pixels; None normalises per image."""
    arr = load_image(path)
    if rng is not None:
        arr = jitter(random_crop_resize(arr, size, rng), rng)
    else:
        arr = resize(arr, size)
    return torch.from_numpy(np.ascontiguousarray(normalize(arr, stats), dtype=np.float32))[None]


def dataset_stats(paths: Sequence[str | Path], size: int, limit: int = 512,
                  seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the resized [0, 1] pixels of up to ``limit`` images drawn with ``seed``."""
    paths = list(paths)
    if not paths:
        raise InputError("no images to measure the dataset's pixel statistics on")
    pick = random.Random(seed).sample(paths, min(limit, len(paths)))
    total = total_sq = 0.0
    for p in pick:
        arr = resize(load_image(p), size).astype(np.float64)
        total += arr.mean()
        total_sq += (arr ** 2).mean()
    mean = total / len(pick)
    return float(mean), float(max(total_sq / len(pick) - mean ** 2, 1e-12) ** 0.5)

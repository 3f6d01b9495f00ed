"""Image decoding: real DICOMs in several transfer syntaxes, DICOM pixel pipeline details
(stored bits, sign, rescale, windows, MONOCHROME1, colour, frames) and broken files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from tests.conftest import SHARED_DATA, needs_shared_data, write_dicom
from xlip.data.images import ImageError, image_problem, image_size, load_image

SIIM = SHARED_DATA / "formats" / "dicom" / "siim_sample.dcm"
FAKE_MONO1 = SHARED_DATA / "formats" / "dicom" / "fake_monochrome1.dcm"


def pydicom_data(name: str) -> str:
    """A file of the pydicom-data package (requirements-test.txt), found without network."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"needs {name} from the pydicom-data package (pip install -r "
                    "requirements-test.txt)")
    return path


def unit(arr) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    return (arr - arr.min()) / (arr.max() - arr.min())


# --- real files ------------------------------------------------------------------------------

@needs_shared_data("formats/dicom/siim_sample.dcm", "formats/dicom/fake_monochrome1.dcm")
def test_siim_sample_and_its_monochrome1_twin():
    siim, fake = load_image(SIIM), load_image(FAKE_MONO1)
    assert siim.shape == (1024, 1024) and siim.dtype == np.float32
    assert siim.min() == 0.0 and siim.max() == 1.0
    # The twin was made by changing only PhotometricInterpretation: same stored pixels, so a
    # correct reader shows it as the negative of siim_sample, and inverting it gives siim back.
    a, b = pydicom.dcmread(SIIM), pydicom.dcmread(FAKE_MONO1)
    assert a.PixelData == b.PixelData and b.PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_allclose(1.0 - fake, siim, atol=1e-6)
    assert image_size(SIIM) == (1024, 1024)


@pytest.mark.parametrize("family", ["RG1", "RG3"])
def test_transfer_syntaxes_of_one_radiograph_decode_alike(family):
    """pydicom-data's CR images (MONOCHROME1, 15 / 10 bits stored of 16) as uncompressed and
    JPEG 2000, each once from the original (R: reversible) and once after lossy coding (I)."""
    img = {v: load_image(pydicom_data(f"{family}_{v}.dcm")) for v in ("UNCR", "J2KR", "UNCI",
                                                                       "J2KI")}
    np.testing.assert_array_equal(img["J2KR"], img["UNCR"])  # lossless
    np.testing.assert_array_equal(img["J2KI"], img["UNCI"])  # the same lossy decode
    diff = np.abs(img["UNCI"] - img["UNCR"])
    assert diff.max() < 0.03 and diff.mean() < 0.005  # lossy ≈ original
    assert all(a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1 for a in img.values())


def test_cr_monochrome1_against_a_reference_pipeline():
    """RG1: stored values masked to 15 bits, window 15000 / 30000, then inverted (MONOCHROME1)."""
    path = pydicom_data("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert (ds.BitsStored, ds.PhotometricInterpretation) == (15, "MONOCHROME1")
    stored = np.frombuffer(ds.PixelData, "<u2").reshape(ds.Rows, ds.Columns) & 0x7FFF
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    windowed = np.clip((stored - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # DICOM LINEAR window
    np.testing.assert_allclose(load_image(path), 1.0 - unit(windowed), atol=1e-5)
    assert image_size(path) == (ds.Columns, ds.Rows)


def test_jpeg_lossless_needs_and_has_its_decoder():
    """JPEG Lossless (process 14), common for CR / DX, decodes only with pylibjpeg-libjpeg
    (requirements.txt); Pillow decodes baseline JPEG and JPEG 2000 but not this."""
    path = pydicom_data("JPEG-LL.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.name.startswith("JPEG Lossless")
    arr = load_image(path)
    assert arr.shape == (1024, 256) and arr.min() == 0.0 and arr.max() == 1.0
    assert image_problem(path) == ""


# --- the DICOM pixel pipeline on made-up files -------------------------------------------------

def test_unused_high_bits_are_masked_and_signed_values_sign_extended(tmp_path):
    raw = np.array([[0x0FFF | 0xF000, 0x0001 | 0x3000, 0x0800]], dtype=np.uint16)  # 12 of 16
    got = load_image(write_dicom(tmp_path / "u12.dcm", raw, bits_stored=12))
    np.testing.assert_allclose(got, unit([[4095, 1, 2048]]), atol=1e-6)
    # 12-bit two's complement -1, -2048, 2047, without sign extension in the 16-bit words;
    # slope 2 and intercept 100 are linear and disappear in the scaling, the order must not
    raw = np.array([[0x0FFF, 0x0800, 0x07FF]], dtype=np.uint16).view(np.int16)
    got = load_image(write_dicom(tmp_path / "s12.dcm", raw, bits_stored=12,
                                 RescaleSlope=2, RescaleIntercept=100))
    np.testing.assert_allclose(got, unit([[-1, -2048, 2047]]), atol=1e-6)


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    stored = np.array([[0, 100, 200, 300]], dtype=np.uint16)
    # window [30, 70]: 0 → black, the rest → white; MONOCHROME1 then inverts that.
    # (Inverting the stored values before windowing would give [[1, 1, 1, 0]].)
    for photometric, expected in (("MONOCHROME2", [0, 1, 1, 1]), ("MONOCHROME1", [1, 0, 0, 0])):
        got = load_image(write_dicom(tmp_path / f"{photometric}.dcm", stored,
                                     photometric=photometric, WindowCenter=50, WindowWidth=41))
        np.testing.assert_array_equal(got, [expected])


def test_the_first_of_several_windows_is_used(tmp_path):
    stored = np.arange(0, 400, 10, dtype=np.uint16).reshape(4, 10)
    one = load_image(write_dicom(tmp_path / "one.dcm", stored, WindowCenter=150,
                                 WindowWidth=101))
    two = load_image(write_dicom(tmp_path / "two.dcm", stored, WindowCenter=[150, 300],
                                 WindowWidth=[101, 400]))
    np.testing.assert_array_equal(two, one)
    assert one.min() == 0 and one.max() == 1 and 0 < np.median(one) < 1


def test_colour_dicom_becomes_luminance(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    got = load_image(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    assert got.shape == (1, 4)
    np.testing.assert_allclose(got, unit([[0.299, 0.587, 0.114, 1.0]]), atol=1e-5)
    arr = load_image(pydicom_data("SC_rgb.dcm"))  # a real RGB file
    assert arr.shape == (100, 100) and arr.max() == 1.0


def test_multi_frame_dicom_is_refused(tmp_path):
    path = write_dicom(tmp_path / "two.dcm", np.zeros((2, 4, 4), dtype=np.uint16))
    with pytest.raises(ImageError, match=r"two\.dcm.*multi-frame DICOM \(2 frames"):
        load_image(path)
    assert image_problem(str(path)).startswith("multi-frame DICOM (2 frames")


def test_dicom_found_by_content_without_suffix(tmp_path):
    path = write_dicom(tmp_path / "IM0001", np.arange(12, dtype=np.uint16).reshape(3, 4))
    np.testing.assert_allclose(load_image(path), unit(np.arange(12).reshape(3, 4)), atol=1e-6)
    assert image_size(path) == (4, 3) and image_problem(str(path)) == ""


def test_sixteen_bit_png_keeps_its_depth(tmp_path):
    values = np.array([[0, 256, 257, 40000, 65535]], dtype=np.uint16)
    path = tmp_path / "16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    got = load_image(path)
    assert got.dtype == np.float32 and got[0, 1] < got[0, 2]  # 256 and 257 stay apart
    np.testing.assert_allclose(got, unit(values), atol=1e-6)
    assert image_size(path) == (5, 1) and image_problem(str(path)) == ""


# --- broken files: the same short reason from image_problem and load_image -------------------

def _png_bytes(tmp_path) -> bytes:
    path = tmp_path / "ok.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    return path.read_bytes()


def _broken(kind: str, tmp_path):
    if kind == "zero-byte png":
        return tmp_path / "empty.png", b"", "empty file (0 bytes)"
    if kind == "zero-byte dcm":
        return tmp_path / "empty.dcm", b"", "empty file (0 bytes)"
    if kind == "text named .png":
        return tmp_path / "notes.png", b"patient notes, not pixels\n", "not an image (no known"
    if kind == "png signature only":
        return tmp_path / "sig.png", b"\x89PNG\r\n\x1a\nbroken", "unreadable image (corrupt PNG"
    if kind == "png with garbage body":  # signature, IHDR and chunk lengths intact
        good = bytearray(_png_bytes(tmp_path))
        start = good.index(b"IDAT") + 14
        good[start:start + 190] = np.random.default_rng(1).integers(0, 256, 190,
                                                                    dtype=np.uint8).tobytes()
        return tmp_path / "garbage.png", bytes(good), "unreadable image ("
    if kind == "truncated png":
        good = _png_bytes(tmp_path)
        return tmp_path / "half.png", good[: len(good) // 2], "unreadable image ("
    if kind == "truncated dicom":
        whole = write_dicom(tmp_path / "whole.dcm",
                            np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).read_bytes()
        return tmp_path / "half.dcm", whole[: len(whole) // 2], "unreadable DICOM ("
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["zero-byte png", "zero-byte dcm", "text named .png",
                                  "png signature only", "png with garbage body",
                                  "truncated png", "truncated dicom"])
def test_broken_files_give_a_reason_naming_the_problem(kind, tmp_path):
    path, data, reason = _broken(kind, tmp_path)
    path.write_bytes(data)
    problem = image_problem(str(path))
    assert problem.startswith(reason), problem
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert str(path) in str(err.value) and problem in str(err.value)
    assert "remove its manifest row" in str(err.value) and err.value.reason == problem


@needs_shared_data("formats/dicom/siim_sample.dcm")
def test_truncated_real_dicom(tmp_path):
    data = SIIM.read_bytes()
    path = tmp_path / "siim_half.dcm"
    path.write_bytes(data[: len(data) // 2])
    assert image_problem(str(path)).startswith("unreadable DICOM (no pixel data")
    with pytest.raises(ImageError, match=r"siim_half\.dcm: unreadable DICOM"):
        load_image(path)


def test_missing_file(tmp_path):
    assert image_problem(str(tmp_path / "nope.png")) == "missing image file"
    with pytest.raises(ImageError, match=r"nope\.dcm: missing image file"):
        load_image(tmp_path / "nope.dcm")


def test_dataset_normalisation_does_not_depend_on_other_pixels(tmp_path):
    """Per-image normalisation lets pixels that MIM masks shift the visible ones; dataset
    statistics do not."""
    from PIL import Image

    from xlip.data.images import dataset_stats, prepare_image

    a = np.full((16, 16), 100, dtype=np.uint8)
    b = a.copy()
    b[:8] = 250  # the top half differs (as if those patches were masked)
    for name, arr in (("a.png", a), ("b.png", b)):
        Image.fromarray(arr).save(tmp_path / name)
    stats = dataset_stats([tmp_path / "a.png", tmp_path / "b.png"], 16)
    assert stats[0] == pytest.approx((100 + (250 + 100) / 2) / 2 / 255, abs=1e-3)
    ia, ib = (prepare_image(tmp_path / n, 16, stats=stats) for n in ("a.png", "b.png"))
    assert torch.allclose(ia[:, 8:], ib[:, 8:])  # the bottom half is the same image
    pa, pb = (prepare_image(tmp_path / n, 16) for n in ("a.png", "b.png"))
    assert not torch.allclose(pa[:, 8:], pb[:, 8:])  # per image it is not

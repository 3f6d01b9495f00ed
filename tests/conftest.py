import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from xlip.config import Config, from_dict
from xlip.text.labels import CANONICAL_FINDINGS

VOCAB = 64
# config sections of the CLIP baseline: contrastive only, no MIM, no MLM
CLIP = {"mim": {"policy": "none"}, "mlm": {"policy": "none"},
        "loss": {"w_mim": 0.0, "w_mlm": 0.0}}
ROOT = Path(__file__).resolve().parents[1]
# Real data for tests (never copied into the repo): $XLIP_SHARED_DATA, else ../shared/data.
SHARED_DATA = Path(os.environ.get("XLIP_SHARED_DATA", ROOT.parent / "shared" / "data"))


def free_port() -> str:
    """A TCP port nothing listens on now (a fixed one may be taken by another run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun_pretrain(config, *args: str, nproc: int = 2) -> None:
    """``xlip pretrain --config CONFIG ARGS`` in ``nproc`` gloo processes (CPU) under torchrun;
    fails the test with the processes' stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", free_port(), "-m", "xlip.cli", "pretrain", "--config", str(config),
           "--quiet", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def needs_shared_data(*relpaths: str) -> pytest.MarkDecorator:
    """Skip (saying what is missing) unless these files exist under SHARED_DATA."""
    missing = [SHARED_DATA / p for p in relpaths if not (SHARED_DATA / p).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(map(str, missing))} "
                              "(../shared/data, or set XLIP_SHARED_DATA)")


def tiny_config(**sections) -> Config:
    """A very small model for fast tests; sections override dict entries."""
    data = {
        "vision": {"preset": "custom", "width": 32, "depth": 2, "heads": 2, "image_size": 32,
                   "patch_size": 8},
        "text": {"preset": "custom", "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64,
                 "max_length": 16},
        "model": {"embed_dim": 16, "mae_decoder_width": 32, "mae_decoder_depth": 1,
                  "mae_decoder_heads": 2, "mm_decoder_depth": 1},
        "train": {"precision": "fp32", "steps": 10, "warmup_steps": 2},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return from_dict(data)


def random_batch(cfg: Config, B: int = 4, L: int = 10, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, L), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, -3:] = 0
    labels = torch.full((B, L), -100)
    labels[:, 2:4] = ids[:, 2:4]
    mlm_ids = ids.clone()
    mlm_ids[:, 2:4] = 4
    guide = torch.zeros(B, L, dtype=torch.bool)
    guide[:, 1:5] = True
    s = cfg.vision.image_size
    return {
        "images": torch.randn(B, 1, s, s, generator=g),
        "has_image": torch.ones(B, dtype=torch.bool),
        "input_ids": ids, "attention_mask": mask,
        "text_key": torch.arange(B), "guide_mask": guide,
        "guide_fallback": torch.zeros(B, dtype=torch.bool),
        "labels": torch.eye(B, len(CANONICAL_FINDINGS))[torch.arange(B) % 3],
        "source": torch.zeros(B, dtype=torch.long),
        "mlm_rows": torch.arange(B), "mlm_input_ids": mlm_ids,
        "mlm_attention_mask": mask, "mlm_labels": labels,
    }


@pytest.fixture
def cfg() -> Config:
    return tiny_config()


def build_corpus(root, n_train: int, n_test: int, seed: int, size: int, vocab_size: int,
                 workers: int = 1, min_frequency: int = 1):
    """A synthetic corpus and a WordPiece tokenizer trained on its training reports."""
    from xlip.data.manifest import load_manifest
    from xlip.data.synthetic import SynthConfig, synthesize
    from xlip.text.tokenizer import train_wordpiece

    manifest = synthesize(root, n_train=n_train, n_test=n_test, seed=seed,
                          cfg=SynthConfig(size=size), workers=workers)
    texts = [r.text for r in load_manifest(manifest, verify_images=False)
             if r.text and r.split == "train"]
    train_wordpiece(texts, root / "tok", vocab_size=vocab_size, min_frequency=min_frequency)
    return manifest, root / "tok"


@pytest.fixture(scope="session")
def eval_corpus(tmp_path_factory):
    """A 240 + 80 study synthetic corpus (32 px) and its tokenizer, for the evaluation tests."""
    return build_corpus(tmp_path_factory.mktemp("eval_corpus"), 240, 80, seed=3, size=32,
                        vocab_size=400)


@pytest.fixture(scope="session")
def eval_run(eval_corpus, tmp_path_factory):
    """Two pre-training steps of the tiny model on ``eval_corpus`` (bootstrap 20): a model
    folder for the evaluation commands. Tests must not write into it."""
    from xlip.train.loop import pretrain

    manifest, tok = eval_corpus
    cfg = tiny_config(
        data={"sources": [{"manifest": str(manifest), "kind": "paired"}], "batch_size": 8,
              "num_workers": 0, "eval_manifest": str(manifest)},
        text={"tokenizer": str(tok), "max_length": 64}, eval={"bootstrap": 20},
        train={"out_dir": str(tmp_path_factory.mktemp("eval_run")), "steps": 2,
               "warmup_steps": 1, "ckpt_every": 2})
    return pretrain(cfg, progress=False)


def write_dicom(path, arr: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, **tags):
    """A minimal single-frame (or multi-frame for 3-D grayscale) uncompressed DICOM."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    colour = photometric == "RGB"
    frames = arr.shape[0] if arr.ndim == 3 and not colour else 1
    ds.Rows, ds.Columns = arr.shape[-3:-1] if colour else arr.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(arr.dtype.kind == "i")
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path

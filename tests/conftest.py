import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from xlip.config import Config, from_dict

VOCAB = 64


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

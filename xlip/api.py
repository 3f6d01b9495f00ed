"""Python API: load a pre-trained XLIP folder, encode images and texts, classify zero-shot.

A model folder holds ``config.yaml``, ``model.safetensors`` and ``tokenizer/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from transformers import BertConfig

from xlip.config import Config, load_config, save_config
from xlip.errors import MissingFileError
from xlip.eval.retrieval import encode_texts
from xlip.eval.zeroshot import (class_embeddings, encode_images, encode_tensor,
                                positive_probability)
from xlip.model.weights import load_weights, save_text_files, save_weights
from xlip.model.xlip import XLIPModel
from xlip.text.prompts import DEFAULT_PROMPT_SET, get_prompt_set
from xlip.text.tokenizer import load_tokenizer


class XLIP:
    """A pre-trained XLIP model with its tokenizer and config."""

    def __init__(self, model: XLIPModel, tokenizer, cfg: Config) -> None:
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "XLIP":
        path = Path(path)
        if not path.is_dir():
            raise MissingFileError(f"{path}: no such model folder (give a pre-training run's "
                                   "folder or one of its checkpoints/step_* folders)")
        # a checkpoint folder holds weights and config; tokenizer and text config are its run's
        run = path.parent.parent if (path / "state.pt").is_file() else path
        files = {"config.yaml": path, "model.safetensors": path, "text_config.json": run,
                 "tokenizer": run}
        for name, where in files.items():
            if not (where / name).exists():
                raise MissingFileError(f"{path} is not an xlip model folder: {name} missing"
                                       + (f" (looked for it in the run folder {where})"
                                          if where != path else ""))
        cfg = load_config(path / "config.yaml", saved=True)
        tokenizer = load_tokenizer(run / "tokenizer")
        text_config = BertConfig.from_json_file(str(run / "text_config.json"))
        model = XLIPModel(cfg, len(tokenizer), text_config)
        load_weights(model, path / "model.safetensors")
        return cls(model.to(device), tokenizer, cfg)

    def untrained(self, seed: int = 0) -> "XLIP":
        """The same architecture, config and tokenizer with freshly initialised weights (the
        no-pre-training baseline of probes and fine-tuning)."""
        torch.manual_seed(seed)
        model = XLIPModel(self.cfg, len(self.tokenizer), self.model.text.bert.config)
        return XLIP(model.to(self.device), self.tokenizer, self.cfg)

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, path / "config.yaml")
        save_weights(self.model, path / "model.safetensors")
        save_text_files(self.model, self.tokenizer, path)
        return path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_image(self, images: Tensor | Sequence[str | Path]) -> Tensor:
        """Image paths, or a normalised (B, 1, H, W) tensor → (B, E) unit-norm embeddings."""
        precision = self.cfg.train.precision  # tensors and paths alike, as in training
        if isinstance(images, Tensor):
            return encode_tensor(self.model, images.to(self.device), precision)
        return encode_images(self.model, [str(p) for p in images], self.cfg.vision.image_size,
                             self.cfg.eval.batch_size, self.cfg.pixel_stats(), precision)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Texts → (B, E) unit-norm embeddings (batches of 256, as retrieval encodes them)."""
        return encode_texts(self.model, self.tokenizer, texts, self.cfg.text.max_length)

    @torch.no_grad()
    def zero_shot(self, images: Tensor | Sequence[str | Path], findings: Sequence[str],
                  prompts: str = DEFAULT_PROMPT_SET) -> dict[str, np.ndarray]:
        """Probability that each finding is present: {finding: (B,) array}, from the positive
        and negative prompts of the named set (``xlip``, ``chexzero`` or ``report``)."""
        emb = self.encode_image(images)
        cls, _ = class_embeddings(self.model, self.tokenizer, findings, self.cfg.text.max_length,
                                  get_prompt_set(prompts).name)
        prob = positive_probability(emb, cls, float(self.model.scale())).cpu().numpy()
        return {f: prob[:, j] for j, f in enumerate(findings)}

"""Weight files of a model folder: ``model.safetensors`` (written atomically), and the tokenizer
and BERT config that let a folder load without the original text dir.

Below both training (checkpoints) and the Python API (``XLIP.from_pretrained``), so that loading
a model never needs the trainer.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from xlip.files import atomic_path


def save_weights(model: nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def load_weights(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the configured model: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} — was it "
                         "saved with a different config.yaml?")


def save_text_files(model: nn.Module, tokenizer, path: Path) -> None:
    """The tokenizer and the BERT config, so a folder loads without the original text dir."""
    tokenizer.save_pretrained(str(path / "tokenizer"))
    model.text.bert.config.to_json_file(str(path / "text_config.json"))

"""Weight files of a model folder: ``model.safetensors`` (written atomically), and the tokenizer
and BERT config that let a folder load without the original text dir.

Below both training (checkpoints) and the Python API (``XLIP.from_pretrained``), so that loading
a model never needs the trainer.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from xlip.errors import InputError, MissingFileError
from xlip.files import atomic_path


def save_weights(model: nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def load_weights(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file {path} does not exist")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as err:  # a parameter of another shape
        first = str(err).strip().splitlines()[-1].strip()[:200]
        raise InputError(f"{path} does not match the configured model ({first}) — was it saved "
                         "with a different config.yaml?") from None
    except Exception as err:  # safetensors' own error types for damaged files
        raise InputError(f"{path}: not a readable safetensors file ({type(err).__name__}: "
                         f"{str(err)[:200]}); the file is damaged or incomplete: copy it again "
                         "or use another checkpoint") from None
    if missing or unexpected:
        raise InputError(f"{path} does not match the configured model: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} — was it "
                         "saved with a different config.yaml?")


def save_text_files(model: nn.Module, tokenizer, path: Path) -> None:
    """The tokenizer and the BERT config, so a folder loads without the original text dir."""
    tokenizer.save_pretrained(str(path / "tokenizer"))
    model.text.bert.config.to_json_file(str(path / "text_config.json"))

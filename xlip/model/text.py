"""Text encoder: a Hugging Face ``BertModel`` built from a preset or loaded from a local dir."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from xlip.config import TextConfig
from xlip.errors import InputError, MissingFileError

# BERT in transformers 5 takes a ready (B, 1, 1, L) additive mask as it is; 4.x refuses one
_TAKES_4D_MASK = int(transformers.__version__.split(".")[0]) >= 5


def build_bert(cfg: TextConfig, vocab_size: int, config: BertConfig | None = None) -> BertModel:
    """A BertModel from ``config`` (random init; weights loaded later), else from the local
    pretrained directory, else from the preset."""
    if config is not None:
        config._attn_implementation = cfg.attn_impl
        return BertModel(config, add_pooling_layer=False)
    if cfg.pretrained:
        p = Path(cfg.pretrained)
        if not (p / "config.json").is_file():
            raise MissingFileError(f"text.pretrained: {p} is not a local Hugging Face model "
                                    "directory (no config.json); nothing is downloaded")
        model = BertModel.from_pretrained(str(p), local_files_only=True,
                                          add_pooling_layer=False,
                                          attn_implementation=cfg.attn_impl,
                                          hidden_dropout_prob=cfg.dropout,
                                          attention_probs_dropout_prob=cfg.dropout)
        if model.config.vocab_size < vocab_size:
            raise InputError(f"{p}: model vocabulary ({model.config.vocab_size}) is smaller "
                             f"than the tokenizer's ({vocab_size}); use the model's tokenizer")
        return model
    hidden, layers, heads, inter = cfg.resolved()
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=inter,
                        max_position_embeddings=max(cfg.max_length, 128),
                        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    config._attn_implementation = cfg.attn_impl
    return BertModel(config, add_pooling_layer=False)


class TextEncoder(nn.Module):
    """Wraps BertModel: token states (B, L, H) and a pooled state (B, H)."""

    def __init__(self, cfg: TextConfig, vocab_size: int,
                 config: BertConfig | None = None) -> None:
        super().__init__()
        self.bert = build_bert(cfg, vocab_size, config)
        self.hidden = self.bert.config.hidden_size
        self.pool = cfg.pool
        if cfg.grad_checkpointing:  # per BertLayer, in training mode only (transformers' rule)
            self.bert.config.use_cache = False  # (a decoder's cache; BERT has none to keep)
            self.bert.gradient_checkpointing_enable(  # transformers 4.x and 5.x alike
                gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """Token states (B, L, H); ``pooled`` (B, H) is the [CLS] state or the mean over the
        non-padding tokens (``text.pool``)."""
        # (B, 1, 1, L) additive, 0 on tokens and the lowest float on padding, as transformers
        # builds it: given a 2-D mask, transformers first asks whether any token is padding
        # (``mask.all()``), which makes the host wait for the GPU in every step. Transformers
        # 4.x refuses a 4-D mask here: it gets the 2-D one (and the wait)
        if not _TAKES_4D_MASK:
            states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self._pooled(states, attention_mask)
        dtype = self.bert.get_input_embeddings().weight.dtype  # that of the embedding output
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        bias = bias.masked_fill(attention_mask == 0, torch.finfo(bias.dtype).min)
        states = self.bert(input_ids=input_ids,
                           attention_mask=bias[:, None, None, :]).last_hidden_state
        return self._pooled(states, attention_mask)

    def _pooled(self, states: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        if self.pool == "cls":
            pooled = states[:, 0]
        else:
            m = attention_mask[:, :, None].to(states.dtype)  # (B, L, 1)
            pooled = (states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return {"pooled": pooled, "tokens": states}

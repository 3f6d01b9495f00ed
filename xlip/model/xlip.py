"""The XLIP model: composes ViT, BERT, projections, the MAE decoder and the multimodal decoder.

``forward(batch)`` returns a dict of named outputs that the losses in :mod:`xlip.losses` read:

- CL: ``image_embed`` (Bi, E), ``text_embed`` (Bi, E), ``logit_scale``, ``cl_text_key``, ``cl_rows``,
  ``cl_labels`` (Bi, F) with ``loss.cl_targets=labels``
- AttMIM: ``mim_pred`` (Bm, N, C·p·p), ``mim_mask`` (Bm, N), ``mim_images``, ``mim_scores``, ``mim_rows``,
  ``mim_guide_fallback`` (Bm,) rows guided by all their content tokens (no finding present);
  Bm = Bi, or the ``mim.row_fraction`` share of the image rows drawn for this step
- EntMLM: ``mlm_logits`` (M, V), ``mlm_labels`` (M,), ``mlm_rows`` (M,), ``mlm_batch``; the M
  scored positions come from the batch's ``mlm_positions`` (the collator's), or are found in
  the forward when it has none

``*_rows`` index the batch rows each output belongs to (for per-source logging).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlip.config import Config
from xlip.masking import attention_masking, mlm_positions, random_masking
from xlip.model.decoders import MAEDecoder, MultimodalDecoder
from xlip.model.text import TextEncoder
from xlip.model.vision import VisionTransformer, load_timm_weights, take_tokens


def add_mlm_positions(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` with its ``mlm_positions`` (:func:`xlip.masking.mlm_positions`): for batches
    not made by the collator, which adds them itself (benchmarks, tests)."""
    if "mlm_labels" in batch:
        batch["mlm_positions"] = mlm_positions(batch["mlm_labels"])
    return batch


class XLIPModel(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, text_config=None) -> None:
        """text_config: a transformers BertConfig to build the text encoder from (used when
        loading a saved model, whose weights replace the initialisation)."""
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.vision = VisionTransformer(cfg.vision)
        if cfg.vision.pretrained and text_config is None:
            load_timm_weights(self.vision, cfg.vision.pretrained)
        self.text = TextEncoder(cfg.text, vocab_size, text_config)
        vdim, tdim, m = self.vision.width, self.text.hidden, cfg.model
        self.image_proj = nn.Linear(vdim, m.embed_dim, bias=False)
        self.text_proj = nn.Linear(tdim, m.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / m.init_temperature)))
        has_mae, has_mm = cfg.decoders()
        self.mae_decoder = None
        if has_mae:
            self.mae_decoder = MAEDecoder(vdim, tdim, m.mae_decoder_width, m.mae_decoder_depth,
                                          m.mae_decoder_heads, self.vision.num_patches,
                                          cfg.mae_output_dim())
        # the multimodal decoder serves EntMLM and scores patches for AttMIM
        self.mm_decoder = None
        if has_mm:
            heads = self.text.bert.config.num_attention_heads
            self.mm_decoder = MultimodalDecoder(tdim, vdim, m.mm_decoder_depth, heads,
                                                self.text.bert.config.vocab_size)
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)

    # -- encoders -----------------------------------------------------------------------------

    def scale(self) -> Tensor:
        """The contrastive logit scale exp(t). Kept in [1, max_logit_scale] by
        :meth:`clamp_logit_scale` after each optimizer step (a clamp here would stop its
        gradient above the bound, so the temperature could never come back down)."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0.0, math.log(self.cfg.model.max_logit_scale))

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalised images → (B, E) unit-norm embeddings."""
        return F.normalize(self.image_proj(self.vision(images)["pooled"]).float(), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids → (B, E) unit-norm embeddings."""
        pooled = self.text(input_ids, attention_mask)["pooled"]
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    # -- training forward ---------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator | None = None,
                aux: bool = True) -> dict[str, Tensor]:
        """``aux``: run MIM and MLM as the config says; False: CL only, their passes skipped
        (the steps after ``loss.aux_until``)."""
        cfg, out = self.cfg, {}
        has_image = batch["has_image"]  # (B,) bool
        images = batch["images"]  # (Bi, C, H, W), aligned with img_rows
        # (Bi,): Bi is the images' shape, so finding the rows needs no host-device sync
        img_rows = torch.nonzero_static(has_image, size=images.shape[0]).squeeze(1)
        txt, mtxt = self._encode_texts(batch, img_rows, aux)
        enc = (self._encode_images(batch, txt, img_rows, out, generator, aux) if len(img_rows)
               else None)

        if enc is not None:
            out["image_embed"] = F.normalize(self.image_proj(enc["pooled"]).float(), dim=-1)
            out["text_embed"] = F.normalize(self.text_proj(txt["pooled"]).float(), dim=-1)
            out["logit_scale"] = self.scale()
            out["cl_text_key"] = batch["text_key"][img_rows]
            out["cl_rows"] = img_rows
            if cfg.loss.cl_targets == "labels":
                out["cl_labels"] = batch["labels"][img_rows]

        if mtxt is not None:
            rows = batch["mlm_rows"]  # (Bm,) rows of the batch that take part in MLM
            ctx, gate = self._image_context(enc, has_image, rows, mtxt)
            states = self.mm_decoder(mtxt, batch["mlm_attention_mask"].bool(), ctx, gate)
            labels = batch["mlm_labels"]  # (Bm, L)
            pos = batch.get("mlm_positions")  # (M,); found here, the host waits for the GPU
            pos = mlm_positions(labels) if pos is None else pos
            L = labels.shape[1]
            out["mlm_logits"] = self.mm_decoder.logits(states.flatten(0, 1)[pos])  # (M, V)
            out["mlm_labels"] = labels.flatten()[pos]
            out["mlm_rows"] = rows[pos // L]
            out["mlm_batch"] = has_image.shape[0]
        return out

    def _encode_texts(self, batch: dict[str, Tensor], img_rows: Tensor, aux: bool = True
                      ) -> tuple[dict[str, Tensor] | None, Tensor | None]:
        """BERT over the clean texts of the rows with an image (CL, AttMIM; text-only rows need
        none) and the masked texts of the MLM rows (Bm, Lm). The clean texts run in the
        collator's length groups (``clean_rows``, ``clean_groups``:
        :func:`~xlip.data.collate.length_groups`), each cut to its own length and its token
        states padded back to L with zeros (no consumer attends to padding), else as one group
        at L. The masked texts join the call of the group of their length (one batch of rows
        costs less than two calls), else get a call of their own (the collator cuts them to
        their own longest, often far below the prompts' L). Returns (``pooled`` (Bi, H) /
        ``tokens`` (Bi, L, H), masked token states (Bm, Lm, H)), None where there are no such
        rows (no masked texts when not ``aux``)."""
        mlm = aux and self.cfg.mlm.policy != "none" and batch["mlm_rows"].numel() > 0
        masked = (batch["mlm_input_ids"], batch["mlm_attention_mask"]) if mlm else None
        n, txt, mtok = len(img_rows), None, None
        ids, mask = batch["input_ids"][img_rows], batch["attention_mask"][img_rows]
        L = ids.shape[1]
        rows = batch.get("clean_rows")  # None: one group, the rows in batch order
        groups = batch["clean_groups"] if rows is not None else ((n, L),) if n else ()
        start = 0
        for size, length in groups:
            pos = rows[start:start + size] if rows is not None else None  # no host-device sync
            start += size
            g_ids, g_mask = (ids, mask) if pos is None else (ids[pos], mask[pos])
            g_ids, g_mask = g_ids[:, :length], g_mask[:, :length]
            if masked is not None and mtok is None and masked[0].shape[1] == length:
                out = self.text(torch.cat([g_ids, masked[0]]), torch.cat([g_mask, masked[1]]))
                mtok = out["tokens"][size:]
                out = {"pooled": out["pooled"][:size], "tokens": out["tokens"][:size]}
            else:
                out = self.text(g_ids, g_mask)
            if pos is None:
                txt = out
                continue
            if txt is None:
                txt = {"tokens": out["tokens"].new_zeros(n, L, out["tokens"].shape[-1]),
                       "pooled": out["pooled"].new_zeros(n, out["pooled"].shape[-1])}
            txt = {"tokens": txt["tokens"].index_copy(
                       0, pos, F.pad(out["tokens"], (0, 0, 0, L - length))),
                   "pooled": txt["pooled"].index_copy(0, pos, out["pooled"])}
        if masked is not None and mtok is None:
            mtok = self.text(*masked)["tokens"]
        return txt, mtok

    def _encode_images(self, batch: dict[str, Tensor], txt: dict[str, Tensor], img_rows: Tensor,
                       out: dict[str, Tensor], generator: torch.Generator | None,
                       aux: bool = True) -> dict[str, Tensor]:
        """Encode the batch's images, mask them and reconstruct (MIM outputs go to ``out``).

        Returns the encoding that CL and MLM's image context use: ``pooled`` (Bi, D) and
        ``tokens`` (Bi, N or K, D). ``train.mode=default``: the full image, with gradients
        (AttMIM scores it; the visible patches are encoded a second time for MIM).
        With ``mim.mask_at=tokens`` MIM takes the full pass's tokens at the kept patches
        instead of a second, visible-patch pass (:meth:`mim_visible`).
        ``train.mode=fast`` (FLIP-style): the visible patches only; the full image is encoded
        without gradients, and only to score patches for AttMIM (skipped with random masking).
        Not ``aux``: the full image only, with gradients, for CL (no MIM).
        """
        cfg, images = self.cfg, batch["images"]
        if not aux:
            return self.vision(images)
        fast = cfg.train.mode == "fast"
        full = None
        if not fast or cfg.mim.policy == "attention":
            with torch.set_grad_enabled(torch.is_grad_enabled() and not fast):
                full = self.vision(images)  # pooled (Bi, D), tokens (Bi, N, D)
        elif self.training:
            self.vision.track_stem_stats(images)  # BatchNorm statistics of whole images
        if self.mae_decoder is None:
            return full
        sub = self._mim_subset(len(img_rows), generator, images.device)  # image rows → MIM
        rows = img_rows[sub]  # (Bm,) the batch rows MIM takes
        mim_images, text_tokens = images[sub], txt["tokens"][sub]
        # the collator's per-sample draws: a row's mask is the same on any rank
        noise = batch["mim_noise"][sub] if "mim_noise" in batch else None  # (Bm, 2, N)
        guide = batch["guide_mask"][rows]  # (Bm, L) bool
        if cfg.mim.policy == "attention":
            text_mask = batch["attention_mask"][rows].bool()
            scores = self.mm_decoder.patch_scores(text_tokens.detach(), text_mask, guide,
                                                  full["tokens"][sub].detach())  # (Bm, N)
            keep, mask, restore = attention_masking(scores, cfg.mim.ratio, cfg.mim.high_share,
                                                    generator, noise)
            out["mim_scores"] = scores
            out["mim_guide_fallback"] = batch["guide_fallback"][rows]
        else:
            keep, mask, restore = random_masking(len(rows), self.vision.num_patches,
                                                 cfg.mim.ratio, generator, images.device,
                                                 None if noise is None else noise[:, 1])
        visible = self.mim_visible(mim_images, keep, full, sub)  # tokens (Bm, K, D)
        out["mim_pred"] = self.mae_decoder(visible["tokens"], restore, text_tokens, guide)
        out["mim_mask"], out["mim_images"], out["mim_rows"] = mask, mim_images, rows
        if cfg.mim.target == "features":  # the teacher: the full pass, no gradient through it
            out["mim_target"] = full["tokens"][sub].detach()
        return visible if fast else full

    def mim_visible(self, images: Tensor, keep: Tensor, full: dict[str, Tensor] | None,
                    rows: Tensor | slice = slice(None)) -> dict[str, Tensor]:
        """The encoding of the kept patches that the MAE decoder rebuilds the image from:
        ``tokens`` (B, K, D). ``mim.mask_at=image``: a pass over the visible patches of
        ``images`` (B, C, H, W), its whole output (fast mode's CL uses its ``pooled``);
        ``tokens``: the full pass's tokens at the kept patches of its ``rows`` (with their
        gradients), no second pass."""
        if self.cfg.mim.mask_at == "tokens":
            return {"tokens": take_tokens(full["tokens"][rows], keep)}
        return self.vision(images, keep)

    def _mim_subset(self, n: int, generator: torch.Generator | None,
                    device: torch.device) -> Tensor | slice:
        """Indices (sorted) of the ``mim.row_fraction`` share of ``n`` image rows that MIM
        takes, at least one; ``slice(None)`` for all rows (no random draw, so fraction 1 is
        unchanged)."""
        frac = self.cfg.mim.row_fraction
        if frac >= 1.0 or not self.training:
            return slice(None)
        k = max(1, round(frac * n))
        return torch.randperm(n, generator=generator, device=device)[:k].sort().values

    def _image_context(self, full: dict[str, Tensor] | None, has_image: Tensor, rows: Tensor,
                       like: Tensor) -> tuple[Tensor, Tensor | None]:
        """Patch tokens (all, or the visible ones in fast mode) for each MLM row; zeros and a
        closed gate for rows without image."""
        if full is None:
            n = self.vision.num_patches
            return like.new_zeros(len(rows), n, self.vision.width), like.new_zeros(len(rows))
        pos = torch.cumsum(has_image.long(), 0) - 1  # row → index among image rows
        # every row has an image: known from the shapes, so no host-device sync
        if full["tokens"].shape[0] == has_image.shape[0]:
            return full["tokens"][pos[rows]], None
        rows_have = has_image[rows]  # (Bm,) a gate of 1.0 leaves an image row's values exact
        idx = pos[rows].clamp(min=0)
        ctx = full["tokens"][idx] * rows_have[:, None, None].to(full["tokens"].dtype)
        return ctx, rows_have.float()

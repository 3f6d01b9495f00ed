"""Analytic FLOP count of one XLIP training step, from the config and the batch's shape.

Only matrix products count (as in the literature and in ``torch.utils.flop_counter``): every
linear layer, convolution, attention product (Q·Kᵀ and A·V), the contrastive logits and the
MLM head, at 2 FLOPs per multiply-add. Softmax, LayerNorm, GELU, BatchNorm, the losses'
elementwise work, gathers and the optimizer are not counted (they are memory-bound: a part of
the step's time that FLOPs do not predict).

Backward: a product whose weight and input both need gradients costs 2× its forward (one
product for each); one whose input needs none (the first layer over the images) 1×; a pass
under ``no_grad`` (fast mode's full-image pass, AttMIM's patch scores) costs its forward only.
With ``vision.grad_checkpointing`` / ``text.grad_checkpointing`` the encoder blocks' forward
runs once more in the backward pass (counted as backward).

:func:`step_flops` returns a :class:`Ledger` of named terms; ``tests/test_bench.py`` checks it
against a hand count and against ``FlopCounterMode`` on the real model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xlip.config import Config
from xlip.masking import num_masked
from xlip.model.vision import stem_convs
from xlip.text.labels import CANONICAL_FINDINGS


@dataclass(frozen=True)
class StepShape:
    """What a step's cost depends on besides the config.

    Args:
        images: Bi, rows with an image (CL, MIM; their clean texts go through BERT).
        length: L, the padded token length of the clean texts.
        clean_groups: the clean texts' BERT calls, (rows, length) each, when the collator
            grouped them by length (:func:`~xlip.data.collate.length_groups`); (): one of
            (images, length).
        mlm_rows: Bm, rows with a masked text (EntMLM).
        mlm_length: Lm, the padded token length of the masked texts (the collator cuts them
            to their own longest); 0: L.
        mlm_tokens: M, labelled (masked) token positions in the MLM rows.
        vocab: the text encoder's vocabulary size (the MLM head's output).
    """

    images: int
    length: int
    mlm_rows: int
    mlm_tokens: int
    vocab: int
    mlm_length: int = 0
    clean_groups: tuple[tuple[int, int], ...] = ()  # (rows, length): clean texts by length


def batch_shape(batch: dict, vocab: int) -> StepShape:
    """The :class:`StepShape` of a collated training batch (:class:`~xlip.data.collate.Collator`'s
    keys)."""
    return StepShape(images=int(batch["has_image"].sum()), length=batch["input_ids"].shape[1],
                     mlm_rows=len(batch["mlm_rows"]),
                     mlm_tokens=int((batch["mlm_labels"] != -100).sum()), vocab=vocab,
                     mlm_length=batch["mlm_input_ids"].shape[1],
                     clean_groups=tuple(batch.get("clean_groups", ())))


@dataclass
class Term:
    name: str  # part/what, e.g. "vision.full/blocks"
    forward: int
    backward: int


@dataclass
class Ledger:
    """Named FLOP terms of one step; ``forward`` + ``backward`` = ``total``."""

    terms: list[Term] = field(default_factory=list)

    def add(self, name: str, fwd: int, grad: bool, grad_input: bool = True,
            recompute: bool = False) -> None:
        """A product of ``fwd`` forward FLOPs. ``grad``: its pass keeps gradients (weights
        get one); ``grad_input``: its input needs a gradient too; ``recompute``: its forward
        runs again in the backward pass (checkpointing)."""
        bwd = fwd * (int(grad) + int(grad and grad_input)) + (fwd if grad and recompute else 0)
        self.terms.append(Term(name, int(fwd), int(bwd)))

    @property
    def forward(self) -> int:
        return sum(t.forward for t in self.terms)

    @property
    def backward(self) -> int:
        return sum(t.backward for t in self.terms)

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def by_part(self) -> dict[str, int]:
        """Total FLOPs per part (the name before ``/``), largest first."""
        parts: dict[str, int] = {}
        for t in self.terms:
            key = t.name.split("/")[0]
            parts[key] = parts.get(key, 0) + t.forward + t.backward
        return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def linear(n: int, d_in: int, d_out: int) -> int:
    """n rows through a d_in → d_out linear layer."""
    return 2 * n * d_in * d_out


def attention(n_q: int, n_k: int, dim: int) -> int:
    """Q·Kᵀ plus A·V for one sequence (all heads: head dim × heads = dim)."""
    return 2 * (2 * n_q * n_k * dim)


def transformer_block(ledger: Ledger, name: str, rows: int, tokens: int, dim: int,
                      hidden: int, grad: bool, recompute: bool = False,
                      recompute_out: bool = True) -> None:
    """A pre-norm self-attention block (ViT ``Block``; a BERT layer has the same products):
    qkv, Q·Kᵀ, A·V, output projection, MLP of ``hidden``. ``recompute_out``: with
    ``recompute``, whether the MLP's output product runs again too: torch's non-reentrant
    checkpoint stops recomputing once every saved tensor is back, and a ViT block's last
    product feeds only the residual sum, which saves nothing (a BERT layer's feeds LayerNorm)."""
    n = rows * tokens
    ledger.add(f"{name}/qkv", linear(n, dim, 3 * dim), grad, recompute=recompute)
    ledger.add(f"{name}/attn", rows * attention(tokens, tokens, dim), grad, recompute=recompute)
    ledger.add(f"{name}/proj", linear(n, dim, dim), grad, recompute=recompute)
    ledger.add(f"{name}/mlp_in", linear(n, dim, hidden), grad, recompute=recompute)
    ledger.add(f"{name}/mlp_out", linear(n, hidden, dim), grad,
               recompute=recompute and recompute_out)


def fusion_block(ledger: Ledger, name: str, rows: int, tokens: int, dim: int, ctx_tokens: int,
                 ctx_dim: int, grad: bool, ctx_grad: bool) -> None:
    """``FusionBlock``: self-attention, cross-attention to a context, MLP (ratio 4).
    ``ctx_grad``: the context needs a gradient (the k/v projections' input)."""
    transformer_block(ledger, f"{name}/self", rows, tokens, dim, 4 * dim, grad)
    ledger.add(f"{name}/cross_q", linear(rows * tokens, dim, dim), grad)
    ledger.add(f"{name}/cross_kv", 2 * linear(rows * ctx_tokens, ctx_dim, dim), grad,
               grad_input=ctx_grad)
    ledger.add(f"{name}/cross_attn", rows * attention(tokens, ctx_tokens, dim), grad)
    ledger.add(f"{name}/cross_proj", linear(rows * tokens, dim, dim), grad)


def patch_embed(ledger: Ledger, name: str, cfg: Config, rows: int, patches: int, width: int,
                grad: bool) -> None:
    """The stem over ``patches`` patches per image (all N for the hybrid stem, which convolves
    the whole, blanked, image). Its input, the images, needs no gradient."""
    v = cfg.vision
    p, c = v.patch_size, v.in_chans
    if v.stem == "linear":
        ledger.add(f"{name}/stem", linear(rows * patches, c * p * p, width), grad,
                   grad_input=False)
        return
    size = p if v.stem == "conv" else v.image_size
    per = 1 if v.stem == "hybrid" else patches  # the hybrid stem runs once per image
    for i, (cin, cout, k, stride) in enumerate(stem_convs(v.stem, p, c, width)):
        size //= stride
        fwd = 2 * rows * per * size * size * cout * cin * k * k
        ledger.add(f"{name}/stem", fwd, grad, grad_input=i > 0)


def vit(ledger: Ledger, name: str, cfg: Config, rows: int, tokens: int, grad: bool) -> None:
    """The ViT over ``tokens`` patches per image (+ CLS). Its stem embeds those patches, or
    convolves the whole image (hybrid stem; blanked outside the visible patches)."""
    width, depth, _ = cfg.vision.resolved()
    hidden = int(width * cfg.vision.mlp_ratio)
    n_stem = cfg.vision.grid ** 2 if cfg.vision.stem == "hybrid" else tokens
    patch_embed(ledger, name, cfg, rows, n_stem, width, grad)
    for _ in range(depth):
        transformer_block(ledger, f"{name}/blocks", rows, 1 + tokens, width, hidden, grad,
                          recompute=cfg.vision.grad_checkpointing, recompute_out=False)


def bert(ledger: Ledger, name: str, cfg: Config, rows: int, length: int) -> None:
    """BERT's layers (embedding lookups cost no products; every layer's input needs a
    gradient, the embedding tables being trained)."""
    hidden, layers, _, inter = cfg.text.resolved()
    for _ in range(layers):
        transformer_block(ledger, f"{name}/layers", rows, length, hidden, inter, True,
                          recompute=cfg.text.grad_checkpointing)


def step_flops(cfg: Config, shape: StepShape, aux: bool = True) -> Ledger:
    """FLOPs of one training step of :class:`~xlip.model.xlip.XLIPModel` + :class:`XLIPLoss`
    (training mode, every image row masked: ``mim.row_fraction`` 1). ``aux`` False: a step
    after ``loss.aux_until``, CL only."""
    if cfg.mim.row_fraction < 1.0:
        raise ValueError("step_flops counts mim.row_fraction=1 only")
    v, m, led = cfg.vision, cfg.model, Ledger()
    width, _, _ = v.resolved()
    hidden = cfg.text.resolved()[0]
    N = v.grid ** 2
    K = N - num_masked(N, cfg.mim.ratio)
    Bi, L, E = shape.images, shape.length, m.embed_dim
    fast = aux and cfg.train.mode == "fast"
    mim, mlm = aux and cfg.mim.policy != "none", aux and cfg.mlm.policy != "none"
    Bm = shape.mlm_rows if mlm else 0
    Lm = shape.mlm_length or L

    for rows, length in shape.clean_groups or ((Bi, L),):  # clean texts of the image rows
        bert(led, "text", cfg, rows, length)
    bert(led, "text", cfg, Bm, Lm)  # masked texts (in the same call when Lm is L: same FLOPs)
    # the full image: with gradients (default), without (fast: AttMIM's scores only), or only
    # the hybrid stem's BatchNorm statistics (fast, random masking)
    if not fast or cfg.mim.policy == "attention":  # (and every CL-only step)
        vit(led, "vision.full", cfg, Bi, N, grad=not fast)
    elif v.stem == "hybrid":
        patch_embed(led, "vision.stem_stats", cfg, Bi, N, width, grad=False)
    if mim:
        if cfg.mim.policy == "attention":  # mm decoder block 0 under no_grad, per MIM row
            led.add("scores/self_qkv", linear(Bi * L, hidden, 3 * hidden), False)
            led.add("scores/self_attn", Bi * attention(L, L, hidden), False)
            led.add("scores/self_proj", linear(Bi * L, hidden, hidden), False)
            led.add("scores/q", linear(Bi * L, hidden, hidden), False)
            led.add("scores/image_proj", linear(Bi * N, width, hidden), False)
            led.add("scores/k", linear(Bi * N, hidden, hidden), False)
            led.add("scores/qk", 2 * Bi * L * N * hidden, False)
        if cfg.mim.mask_at == "image":  # tokens: the full pass's tokens, no second pass
            vit(led, "vision.visible", cfg, Bi, K, grad=True)
        W = m.mae_decoder_width
        led.add("mae_decoder/embed", linear(Bi * K, width, W), True)
        for _ in range(m.mae_decoder_depth):
            fusion_block(led, "mae_decoder/blocks", Bi, N, W, L, hidden, True, ctx_grad=True)
        led.add("mae_decoder/pred", linear(Bi * N, W, cfg.mae_output_dim()), True)
    # CL: projections and the two logit matrices (image·textᵀ, text·imageᵀ)
    led.add("cl/proj", linear(Bi, width, E) + linear(Bi, hidden, E), True)
    led.add("cl/logits", 2 * linear(Bi, E, Bi), True)
    if cfg.loss.cl_targets == "labels":  # label cosines: no gradient
        led.add("cl/targets", linear(Bi, len(CANONICAL_FINDINGS), Bi), False)
    if Bm:  # multimodal decoder over the image context (visible tokens in fast mode)
        ctx = K if fast else N
        led.add("mm_decoder/image_proj", linear(Bm * ctx, width, hidden), True)
        for _ in range(m.mm_decoder_depth):
            fusion_block(led, "mm_decoder/blocks", Bm, Lm, hidden, ctx, hidden, True,
                         ctx_grad=True)
        led.add("mm_decoder/head", linear(shape.mlm_tokens, hidden, hidden)
                + linear(shape.mlm_tokens, hidden, shape.vocab), True)
    return led

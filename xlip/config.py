"""Typed configuration: one dataclass per part, named presets, YAML load/save, validation.

A config file is a nested YAML mapping whose top-level keys are the fields of :class:`Config`.
Command-line overrides use dotted keys (``train.lr=3e-4``). Unknown keys, empty values and
contradictory settings raise :class:`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from xlip.errors import XlipError


class ConfigError(XlipError, ValueError):
    """A config file or override that cannot be used as written."""


# name: (width, depth, heads)
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "micro": (192, 6, 3),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}
# name: (hidden, layers, heads, intermediate)
BERT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "micro": (128, 2, 2, 512),
    "tiny": (256, 4, 4, 1024),
    "small": (512, 4, 8, 2048),
    "base": (768, 12, 12, 3072),
}
MIM_POLICIES = ("attention", "random", "none")
MIM_TARGETS = ("pixels", "features")
MIM_MASK_AT = ("image", "tokens")
MLM_POLICIES = ("entity", "random", "none")
#: options that only mean something while their task is on (``policy`` other than none)
TASK_OPTIONS = {"mim": ("target", "mask_at", "row_fraction"),
                "mlm": ("prompts", "text_policy", "row_fraction")}
KINDS = ("paired", "image_only", "text_only")


@dataclass
class VisionConfig:
    """Plain-PyTorch ViT. ``preset`` sets width/depth/heads unless they are given explicitly."""

    preset: str = "tiny"
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    width: int = 0  # 0: from preset
    depth: int = 0
    heads: int = 0
    mlp_ratio: float = 4.0
    stem: str = "linear"  # linear | conv (inside each patch) | hybrid (whole-image CNN + BN)
    pool: str = "cls"  # global image feature: cls | avg (mean of the patch tokens)
    attn_impl: str = "explicit"  # explicit | sdpa
    pretrained: str = ""  # timm-named ViT state dict (.safetensors / .pth / .bin)
    # recompute each block's activations in the backward pass (less memory, ~1/3 more FLOPs)
    grad_checkpointing: bool = False

    def resolved(self) -> tuple[int, int, int]:
        w, d, h = VIT_PRESETS[self.preset] if self.preset != "custom" else (0, 0, 0)
        return self.width or w, self.depth or d, self.heads or h

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def __post_init__(self) -> None:
        _check_vision(self)


@dataclass
class TextConfig:
    """Hugging Face BERT text encoder, from a preset or a local pretrained directory."""

    preset: str = "tiny"
    pretrained: str = ""  # local HF directory holding a BertModel (+ tokenizer)
    tokenizer: str = ""  # local tokenizer directory; default: `pretrained`
    max_length: int = 96
    hidden: int = 0  # 0: from preset
    layers: int = 0
    heads: int = 0
    intermediate: int = 0
    attn_impl: str = "eager"  # eager | sdpa (transformers attention implementation)
    pool: str = "cls"  # global text feature: cls | mean (over non-padding tokens)
    dropout: float = 0.1  # BERT hidden and attention-probability dropout (preset or pretrained)
    # recompute each BERT layer's activations in the backward pass (less memory, more FLOPs)
    grad_checkpointing: bool = False

    def resolved(self) -> tuple[int, int, int, int]:
        p = BERT_PRESETS[self.preset] if self.preset != "custom" else (0, 0, 0, 0)
        return (self.hidden or p[0], self.layers or p[1], self.heads or p[2],
                self.intermediate or p[3])

    def __post_init__(self) -> None:
        _check_text(self)


@dataclass
class ModelConfig:
    embed_dim: int = 256  # shared contrastive space
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    mae_decoder_width: int = 256
    mae_decoder_depth: int = 4
    mae_decoder_heads: int = 8
    mm_decoder_depth: int = 2  # multimodal text decoder for EntMLM (width = text hidden)

    def __post_init__(self) -> None:
        _check_model(self)


@dataclass
class MIMConfig:
    policy: str = "attention"  # attention | random | none
    ratio: float = 0.5
    high_share: float = 0.75  # share of masked patches drawn from the top half by score
    norm_pix: bool = True  # pixel target only (the feature target is layer-normed)
    # what the MAE decoder predicts at masked patches: pixels (MAE; normalised per patch with
    # norm_pix) | features (the full-image pass's patch tokens, layer-normed and detached: a
    # masked feature target as in MaskCLIP/data2vec, with the online encoder as teacher)
    target: str = "pixels"
    # where the mask applies: image (MAE: the encoder sees only the visible patches, a second
    # encoder pass) | tokens (the paper's "masks a portion of the image features": the full
    # pass's patch tokens at the masked positions are dropped before the MAE decoder, so no
    # second pass; the visible tokens have attended to the masked patches in the encoder, so
    # the task is to carry each region's content into its neighbours' tokens and the text)
    mask_at: str = "image"
    # share of each batch's image rows that are masked and reconstructed (drawn at random each
    # step); below 1 the visible-patch pass, the MAE decoder and AttMIM scoring run on fewer
    # rows, so a step costs less. CL always sees every row.
    row_fraction: float = 1.0

    def __post_init__(self) -> None:
        _check_mim(self)


@dataclass
class MLMConfig:
    policy: str = "entity"  # entity | random | none
    max_ratio: float = 0.5  # cap on masked words
    min_ratio: float = 0.15  # floor, topped up with random words
    prompts: bool = False  # disease-kind prompts take part in MLM
    text_only: bool = False  # reports without images train MLM (image cross-attention skipped)
    # report sections EntMLM masks; empty: data.text_policy (what CL reads). The findings
    # section names absent findings too ("No pneumothorax."): masked, only the image tells
    # which they are
    text_policy: str = ""
    # share of the rows eligible for MLM that take part in a step (each row drawn on its own);
    # below 1 the masked BERT pass and the multimodal decoder run on fewer rows
    row_fraction: float = 1.0

    def __post_init__(self) -> None:
        _check_mlm(self)


@dataclass
class LossConfig:
    w_cl: float = 1.0
    w_mim: float = 1.0
    w_mlm: float = 1.0
    # contrastive positives: text (identical reports, prompts of equal findings) | labels
    # (also soft positives weighted by label-set agreement, MedCLIP)
    cl_targets: str = "text"
    # the share of train.steps, from the start, that run MIM and MLM; the later steps are CL
    # only, their MIM and MLM passes skipped (not weighted to zero). 1: every step
    aux_until: float = 1.0

    def aux_steps(self, steps: int) -> int:
        """How many of ``steps`` training steps, from the first, run MIM and MLM."""
        return steps if self.aux_until >= 1.0 else round(self.aux_until * steps)

    def __post_init__(self) -> None:
        _check_loss(self)


@dataclass
class SourceConfig:
    """One manifest (or one kind of its rows) drawn into each batch with a weight."""

    manifest: str = ""
    # instead of manifest: a folder that `xlip data shard` wrote, streamed (xlip.data.stream)
    shards: str = ""
    kind: str = "paired"  # paired | image_only | text_only
    weight: float = 1.0
    split: str = "train"
    name: str = ""  # for logging; default: kind

    def __post_init__(self) -> None:
        _check_source(self)


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    eval_manifest: str = ""  # held-out manifest for zero-shot evaluation
    eval_split: str = "test"
    text_policy: str = "findings_impression"
    batch_size: int = 64
    num_workers: int = 1
    augment: bool = True
    verify_images: bool = True  # open every image once when a manifest is loaded
    skip_bad: bool = False  # train without rejected rows (still written to a rejects file)
    prompt_negatives: int = 0  # sampled "No {finding}." sentences added to label prompts
    # image intensity normalisation: image (each image to zero mean, unit variance) | dataset
    # (one mean/std for all images, so masked pixels never shift the visible ones)
    normalize: str = "image"
    pixel_mean: float = 0.0  # data.normalize=dataset; pixel_std 0: measured on the training
    pixel_std: float = 0.0  # images when pre-training starts and saved in config.yaml
    shuffle_pairs: bool = False  # control experiment: break image-report pairing
    shuffle_buffer: int = 1000  # rows each stream shuffles among (data.sources[].shards)

    def __post_init__(self) -> None:
        _check_data(self)


@dataclass
class TrainConfig:
    out_dir: str = "runs/xlip"
    steps: int = 1000
    lr: float = 5e-4
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-8  # AdamW epsilon (open_clip uses 1e-6 for ViTs)
    warmup_steps: int = 50
    grad_accum: int = 1
    clip_grad: float = 1.0
    # stop (exit 2, no final model) when the loss exceeds this many times its lowest logged
    # value; 0: off. NaN/inf losses and gradient norms always stop the run
    diverge_factor: float = 100.0
    precision: str = "auto"  # auto (bf16 on GPUs and CPUs with AMX/AVX512-BF16, else fp32) | bf16 | fp32
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    threads: int = 0  # torch intra-op threads; 0: leave as is
    # default: CL and MLM read the full image (encoded with gradients), MIM a second, visible-
    # only pass. fast (FLIP-style): one pass with gradients over the visible patches serves CL,
    # MIM and MLM; the full image is encoded without gradients, only for AttMIM's scores
    mode: str = "default"
    # GPUs: TF32 tensor cores for the matmuls and convolutions left in fp32 (no effect on CPU)
    tf32: bool = True
    # torch.compile the model (in place, before DDP wraps it); the first steps then compile
    compile: bool = False
    # where metric rows go (xlip.train.tracking): jsonl (metrics.jsonl, always) and tensorboard
    # (RUN/tensorboard/, needs pip install 'xlip[tensorboard]')
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])

    def __post_init__(self) -> None:
        _check_train(self)


@dataclass
class EvalConfig:
    findings: list[str] = field(default_factory=list)  # empty: every label present in eval set
    bootstrap: int = 200
    batch_size: int = 128

    def __post_init__(self) -> None:
        _check_eval(self)


@dataclass
class Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mim: MIMConfig = field(default_factory=MIMConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)

    def pixel_stats(self) -> tuple[float, float] | None:
        """The (mean, std) images are normalised with; None: per image."""
        d = self.data
        return (d.pixel_mean, d.pixel_std) if d.normalize == "dataset" else None

    def decoders(self) -> tuple[bool, bool]:
        """Which decoders the model has: (MAE decoder, multimodal decoder). The multimodal one
        serves EntMLM and scores patches for AttMIM."""
        return (self.mim.policy != "none",
                self.mlm.policy != "none" or self.mim.policy == "attention")

    def inert_keys(self) -> set[str]:
        """Dotted keys that cannot change a run under this config: the sizes of a decoder the
        model does not build (a CLIP run's ``model.mae_decoder_width``). A finished run or a
        checkpoint whose config differs from another only in these is the same run."""
        has_mae, has_mm = self.decoders()
        keys = set()
        if not has_mae:
            keys |= {f"model.mae_decoder_{k}" for k in ("width", "depth", "heads")}
        if not has_mm:
            keys.add("model.mm_decoder_depth")
        return keys

    def mae_output_dim(self) -> int:
        """What the MAE decoder predicts per patch: C·p·p pixels, or the ViT width
        (``mim.target=features``)."""
        v = self.vision
        return v.resolved()[0] if self.mim.target == "features" else v.in_chans * v.patch_size ** 2

    def validate(self) -> "Config":
        validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: unknown value {value!r}; choose one of {', '.join(allowed)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        need = "0 or more" if allow_zero else "positive"
        raise ConfigError(f"{key}={value} must be {need}")


def _check_vision(v: VisionConfig) -> None:
    _choice("vision.preset", v.preset, [*VIT_PRESETS, "custom"])
    _choice("vision.stem", v.stem, ("linear", "conv", "hybrid"))
    _choice("vision.attn_impl", v.attn_impl, ("explicit", "sdpa"))
    _choice("vision.pool", v.pool, ("cls", "avg"))
    for key in ("image_size", "patch_size", "in_chans", "mlp_ratio"):
        _positive(f"vision.{key}", getattr(v, key))
    for key in ("width", "depth", "heads"):
        _positive(f"vision.{key}", getattr(v, key), allow_zero=True)
    if v.image_size % v.patch_size:
        raise ConfigError(f"vision.image_size={v.image_size} is not a multiple of "
                          f"vision.patch_size={v.patch_size}")
    width, depth, heads = v.resolved()
    if not (width and depth and heads) or width % heads:
        raise ConfigError(f"vision: width {width} / depth {depth} / heads {heads} invalid "
                          "(preset 'custom' needs all three; width must divide by heads)")
    if v.stem == "conv" and v.patch_size % 4:
        raise ConfigError("vision.stem=conv needs vision.patch_size divisible by 4")
    if v.stem == "hybrid" and (v.patch_size < 2 or v.patch_size & (v.patch_size - 1)):
        raise ConfigError("vision.stem=hybrid needs vision.patch_size a power of two "
                          "(one stride-2 stage per halving)")


def _check_text(t: TextConfig) -> None:
    _choice("text.preset", t.preset, [*BERT_PRESETS, "custom"])
    _choice("text.attn_impl", t.attn_impl, ("eager", "sdpa"))
    _choice("text.pool", t.pool, ("cls", "mean"))
    for key in ("hidden", "layers", "heads", "intermediate"):
        _positive(f"text.{key}", getattr(t, key), allow_zero=True)
    if not t.pretrained:
        hidden, layers, theads, _ = t.resolved()
        if not (hidden and layers and theads) or hidden % theads:
            raise ConfigError(f"text: hidden {hidden} / layers {layers} / heads {theads} invalid")
    if t.max_length < 8:
        raise ConfigError("text.max_length must be at least 8")
    if not 0.0 <= t.dropout < 1.0:
        raise ConfigError(f"text.dropout={t.dropout} must lie in [0, 1)")


def _check_model(m: ModelConfig) -> None:
    for key in ("embed_dim", "init_temperature", "max_logit_scale", "mae_decoder_width",
                "mae_decoder_depth", "mae_decoder_heads", "mm_decoder_depth"):
        _positive(f"model.{key}", getattr(m, key))
    if m.mae_decoder_width % m.mae_decoder_heads:
        raise ConfigError(f"model.mae_decoder_width={m.mae_decoder_width} must divide by "
                          f"model.mae_decoder_heads={m.mae_decoder_heads}")


def _check_mim(m: MIMConfig) -> None:
    _choice("mim.policy", m.policy, MIM_POLICIES)
    _choice("mim.target", m.target, MIM_TARGETS)
    _choice("mim.mask_at", m.mask_at, MIM_MASK_AT)
    for name in ("ratio", "high_share"):
        x = getattr(m, name)
        if not 0.0 < x < 1.0:
            raise ConfigError(f"mim.{name}={x} must lie strictly between 0 and 1")
    if not 0.0 < m.row_fraction <= 1.0:
        raise ConfigError(f"mim.row_fraction={m.row_fraction} must lie in (0, 1]")


def _check_mlm(m: MLMConfig) -> None:
    from xlip.text.sections import TEXT_POLICIES

    _choice("mlm.policy", m.policy, MLM_POLICIES)
    if m.text_policy:
        _choice("mlm.text_policy", m.text_policy, TEXT_POLICIES)
    if not 0.0 < m.row_fraction <= 1.0:
        raise ConfigError(f"mlm.row_fraction={m.row_fraction} must lie in (0, 1]")
    if not 0.0 < m.min_ratio <= m.max_ratio < 1.0:
        raise ConfigError(f"need 0 < mlm.min_ratio ({m.min_ratio}) <= mlm.max_ratio "
                          f"({m.max_ratio}) < 1")
    if m.text_only and m.policy == "none":
        raise ConfigError("mlm.text_only=true needs an mlm.policy other than none")


def _check_loss(lo: LossConfig) -> None:
    _choice("loss.cl_targets", lo.cl_targets, ("text", "labels"))
    if not 0.0 < lo.aux_until <= 1.0:
        raise ConfigError(f"loss.aux_until={lo.aux_until}: the share of the steps that run MIM "
                          "and MLM must be in (0, 1] (1: every step); for no MIM and MLM at "
                          "all set mim.policy=none mlm.policy=none loss.w_mim=0 loss.w_mlm=0")
    for term in ("mim", "mlm"):
        w = getattr(lo, f"w_{term}")
        if w < 0:
            raise ConfigError(f"loss.w_{term}={w} is negative")
    if lo.w_cl <= 0:
        raise ConfigError(f"loss.w_cl={lo.w_cl}: the contrastive loss is what trains "
                          "image_proj, text_proj and the temperature, without which the model "
                          "cannot embed images or texts (zero-shot, retrieval); give it a "
                          "positive weight")


def _check_source(s: SourceConfig, where: str = "data.sources[]") -> None:
    _choice(f"{where}.kind", s.kind, KINDS)
    if not s.manifest and not s.shards:
        raise ConfigError(f"{where}.manifest is empty: give the manifest path (or shards: a "
                          "folder that `xlip data shard` wrote, to stream it)")
    if s.manifest and s.shards:
        raise ConfigError(f"{where} gives both manifest and shards: keep one (shards streams "
                          "the folder that `xlip data shard` wrote)")
    if s.weight <= 0:
        raise ConfigError(f"{where}.weight={s.weight} must be positive")
    if not s.split:
        raise ConfigError(f"{where}.split is empty: give the manifest split to read, e.g. train")


def _check_data(d: DataConfig) -> None:
    from xlip.text.sections import TEXT_POLICIES

    _choice("data.text_policy", d.text_policy, TEXT_POLICIES)
    _choice("data.normalize", d.normalize, ("image", "dataset"))
    if d.pixel_std < 0 or (d.normalize == "image" and (d.pixel_std or d.pixel_mean)):
        raise ConfigError(f"data.pixel_mean/pixel_std ({d.pixel_mean}, {d.pixel_std}) are read "
                          "only with data.normalize=dataset, and pixel_std must be positive "
                          "(0: measure it)")
    if d.batch_size < 2:
        raise ConfigError("data.batch_size must be at least 2 (contrastive loss needs negatives)")
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    _positive("data.prompt_negatives", d.prompt_negatives, allow_zero=True)
    for i, s in enumerate(d.sources):
        if not isinstance(s, SourceConfig):
            raise ConfigError(f"data.sources[{i}]: expected a source mapping, got {s!r}")
        _check_source(s, f"data.sources[{i}]")
    _positive("data.shuffle_buffer", d.shuffle_buffer)
    streamed = [bool(s.shards) for s in d.sources]
    if any(streamed) and not all(streamed):
        raise ConfigError("data.sources mixes shards (streamed) and manifest sources; give every "
                          "source as shards (run `xlip data shard` on the manifest) or every "
                          "source as a manifest")
    if any(streamed) and d.shuffle_pairs:
        raise ConfigError("data.shuffle_pairs pairs rows across a whole source, which a stream "
                          "never holds; run the control experiment from a manifest source")


def _check_train(tr: TrainConfig) -> None:
    _choice("train.precision", tr.precision, ("auto", "bf16", "fp32"))
    _choice("train.mode", tr.mode, ("default", "fast"))
    for key in ("steps", "grad_accum", "lr", "log_every", "ckpt_every", "adam_eps"):
        _positive(f"train.{key}", getattr(tr, key))
    for key in ("weight_decay", "warmup_steps", "clip_grad", "threads", "diverge_factor"):
        _positive(f"train.{key}", getattr(tr, key), allow_zero=True)
    if 0 < tr.diverge_factor <= 1:
        raise ConfigError(f"train.diverge_factor={tr.diverge_factor} would stop a run whose "
                          "loss merely does not fall; give a factor above 1 (e.g. 100) or 0 "
                          "(off)")
    if not 0.0 <= tr.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={tr.min_lr_ratio} must lie in [0, 1] (the "
                          "lowest learning rate as a share of train.lr)")
    if tr.warmup_steps >= tr.steps and tr.steps > 1:
        raise ConfigError(f"train.warmup_steps={tr.warmup_steps} must be below "
                          f"train.steps={tr.steps}")
    if len(tuple(tr.betas)) != 2 or not all(0.0 <= b < 1.0 for b in tr.betas):
        raise ConfigError(f"train.betas={list(tr.betas)} needs two numbers in [0, 1), "
                          "e.g. [0.9, 0.98]")
    for i, name in enumerate(tr.report_to):
        _choice(f"train.report_to[{i}]", name, ("jsonl", "tensorboard"))
    if "jsonl" not in tr.report_to or len(set(tr.report_to)) != len(tr.report_to):
        raise ConfigError(f"train.report_to={list(tr.report_to)} must name jsonl once "
                          "(metrics.jsonl, which xlip plot and xlip ablate read), plus "
                          "tensorboard if wanted: e.g. [jsonl, tensorboard]")


def _check_eval(e: EvalConfig) -> None:
    _positive("eval.bootstrap", e.bootstrap, allow_zero=True)
    _positive("eval.batch_size", e.batch_size)


def validate(cfg: Config) -> None:
    """Raise ConfigError on values out of range or settings that contradict each other.

    Each section checks its own values when it is constructed; this adds the checks across
    sections (and repeats the sections', for a config changed after construction)."""
    _check_vision(cfg.vision)
    _check_text(cfg.text)
    _check_model(cfg.model)
    _check_mim(cfg.mim)
    _check_mlm(cfg.mlm)
    _check_loss(cfg.loss)
    _check_data(cfg.data)
    _check_train(cfg.train)
    _check_eval(cfg.eval)
    if cfg.train.mode == "fast" and cfg.mim.policy == "none":
        raise ConfigError("train.mode=fast encodes only the visible patches of a masked image; "
                          "it needs mim.policy=attention or random (mim.policy=none: use "
                          "train.mode=default)")
    if (cfg.mim.target == "features" and cfg.train.mode == "fast"
            and cfg.mim.policy == "random"):
        raise ConfigError("mim.target=features predicts the full-image pass's patch tokens, "
                          "which train.mode=fast with mim.policy=random never computes: use "
                          "mim.target=pixels, mim.policy=attention or train.mode=default")
    if cfg.mim.target == "features" and not cfg.mim.norm_pix:
        raise ConfigError("mim.norm_pix=false only applies to mim.target=pixels (the feature "
                          "target is always layer-normed), so it would be ignored: remove it, "
                          "or set mim.target=pixels")
    if cfg.train.mode == "fast" and cfg.mim.mask_at == "tokens":
        raise ConfigError("mim.mask_at=tokens masks the full-image pass's tokens, which "
                          "train.mode=fast runs without gradients: use train.mode=default "
                          "(the tokens mask then costs no second encoder pass) or "
                          "mim.mask_at=image")
    if cfg.train.mode == "fast" and cfg.mim.row_fraction < 1.0:
        raise ConfigError(f"train.mode=fast trains CL on the masked images, so every row must "
                          f"be masked: mim.row_fraction={cfg.mim.row_fraction} needs "
                          "train.mode=default (or mim.row_fraction=1)")
    for term, policy in (("mim", cfg.mim.policy), ("mlm", cfg.mlm.policy)):
        w = getattr(cfg.loss, f"w_{term}")
        if w == 0 and policy != "none":
            raise ConfigError(f"loss.w_{term}=0 but {term}.policy={policy}: set "
                              f"{term}.policy=none to switch the task off")
        if w > 0 and policy == "none":
            raise ConfigError(f"loss.w_{term}={w} but {term}.policy=none, so the weight is "
                              f"never used: set loss.w_{term}=0, or switch {term} on")
    for task, keys in TASK_OPTIONS.items():
        section = getattr(cfg, task)
        if section.policy != "none":
            continue
        default = type(section)()
        unused = [f"{task}.{k}={getattr(section, k)}" for k in keys
                  if getattr(section, k) != getattr(default, k)]
        if unused:
            raise ConfigError(f"{task}.policy=none, so {', '.join(unused)} would be ignored: "
                              f"remove {'it' if len(unused) == 1 else 'them'}, or switch "
                              f"{task} on")
    if cfg.loss.aux_until < 1.0 and cfg.mim.policy == "none" and cfg.mlm.policy == "none":
        raise ConfigError(f"loss.aux_until={cfg.loss.aux_until} stops MIM and MLM early, but "
                          "both are off (mim.policy=none, mlm.policy=none): remove it, or "
                          "switch one on")
    if cfg.mim.policy == "attention" and cfg.mlm.policy == "none":
        raise ConfigError("mim.policy=attention scores patches with the cross-attention that "
                          "EntMLM trains, but mlm.policy=none; use mim.policy=random or "
                          "switch MLM on")
    for i, s in enumerate(cfg.data.sources):
        if s.kind == "text_only" and not cfg.mlm.text_only:
            raise ConfigError(f"data.sources[{i}] is text_only but mlm.text_only=false: "
                              "text-only reports only train EntMLM; set mlm.text_only=true")
    _check_sources(cfg)


def _check_sources(cfg: Config) -> None:
    """Every switched-on task must have rows that train it (else its parameters stay at their
    initialisation, silently, and DDP fails on unused parameters)."""
    if not cfg.data.sources:
        return
    kinds = sorted({s.kind for s in cfg.data.sources})
    have = f"data.sources has {', '.join(kinds)} rows"
    if not {"paired", "image_only"} & set(kinds):
        raise ConfigError(f"{have}, no images: the contrastive loss (and MIM) need paired or "
                          "image_only sources")
    mlm_rows = ("paired" in kinds or ("text_only" in kinds and cfg.mlm.text_only)
                or ("image_only" in kinds and cfg.mlm.prompts))
    if cfg.mlm.policy != "none" and not mlm_rows:
        raise ConfigError(f"mlm.policy={cfg.mlm.policy} but no row feeds MLM ({have}; "
                          "mlm.prompts=false): add a paired source, set mlm.prompts=true, or "
                          "set mlm.policy=none loss.w_mlm=0")
    # the patch scorer is the multimodal decoder's cross-attention, trained by MLM rows that
    # have an image: reports with their image, or label prompts with mlm.prompts=true
    scorer_rows = "paired" in kinds or ("image_only" in kinds and cfg.mlm.prompts)
    if cfg.mim.policy == "attention" and not scorer_rows:
        raise ConfigError(f"mim.policy=attention scores patches with the multimodal decoder, "
                          f"which only MLM rows with an image train, but {have} and "
                          "mlm.prompts=false: add a paired source, set mlm.prompts=true, or "
                          "use mim.policy=random")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {path + '.' if path else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}; valid keys under "
                              f"{path or 'the top level'}: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(hints[key], value, full)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a source checks itself without knowing its place in the list
        raise ConfigError(str(err).replace("data.sources[]", path)) from None


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if value is None or (isinstance(value, str) and value.strip() == "" and tp is not str):
        raise ConfigError(f"config key {path!r} is empty: give it a value or remove it")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)} "
                              f"({list(value)})")
        return tuple(_coerce(a, v, path) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data or {}, "").validate()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=3e-4'`` → (['train', 'lr'], 0.0003). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has no key")
    if raw.strip() == "":
        raise ConfigError(f"override {text!r} gives config key {key!r} an empty value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.strip().split("."), value


def merge(base: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = _plain(base)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return out


def drop_unused_options(data: dict[str, Any]) -> dict[str, Any]:
    """Remove the :data:`TASK_OPTIONS` of a task switched off (``policy: none``) from a config
    dict, so that they take their defaults: for switching a task off on top of a config that
    tunes it (an ablation's or a benchmark's CLIP row), where :func:`validate` would otherwise
    refuse the options as unused."""
    for task, keys in TASK_OPTIONS.items():
        section = data.get(task) if isinstance(data, dict) else None
        if isinstance(section, dict) and section.get("policy") == "none":
            for k in keys:
                section.pop(k, None)
    return data


def saved_run_compat(data: dict[str, Any]) -> dict[str, Any]:
    """A run's saved config under today's rules: runs saved before xlip required a switched-off
    task's loss weight to be 0 kept the default weight (1, never used); it is set to 0. Options
    of a switched-off task (refused since) are dropped, as is ``mim.norm_pix`` with the feature
    target: they never had an effect."""
    drop_unused_options(data)
    mim = data.get("mim") if isinstance(data, dict) else None
    if isinstance(mim, dict) and mim.get("target") == "features":
        mim.pop("norm_pix", None)
    loss = data.setdefault("loss", {}) if isinstance(data, dict) else {}
    for term in ("mim", "mlm"):
        section = data.get(term) or {}
        if isinstance(section, dict) and section.get("policy") == "none" and \
                loss.get(f"w_{term}", 1.0) != 0:
            loss[f"w_{term}"] = 0.0
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                saved: bool = False) -> Config:
    """Load a YAML config (or the defaults) and apply dotted overrides, then validate.

    ``saved``: the file is a run's or checkpoint's own ``config.yaml``, written by an earlier
    xlip: :func:`saved_run_compat` first."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        if saved:
            data = saved_run_compat(data)
        try:
            return from_dict(merge(data, overrides or []))
        except ConfigError as err:
            raise ConfigError(f"{p}: {err}") from None
    return from_dict(merge(data, overrides or []))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

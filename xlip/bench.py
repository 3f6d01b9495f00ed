"""`xlip bench`: training-step variants measured side by side in one run, with their FLOPs.

For each preset (model size) and precision, every variant trains the same model on the same
random batch; a row gives seconds per step (median of the timed steps, after one warm-up step),
the step's FLOPs counted analytically (:mod:`xlip.flops`), the achieved FLOP/s, the MFU against
a large matmul timed in the same run (the machine's practical peak), the peak memory, and the
time and FLOP ratios to the first variant. The default group compares CLIP, XLIP and XLIP fast
(``train.mode=fast``); ``--group attention|precision|tasks`` compares other pairs. The real
loader (synthetic corpus → :class:`MixedDataset` → :class:`Collator`) is timed too.

Wall-clock figures belong here, never in tests. ``train.precision`` means what it means in
training (:mod:`xlip.precision`); bf16 rows run only where it resolves ``auto`` to bf16.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from xlip.config import Config, drop_unused_options, from_dict, merge
from xlip.data.collate import Collator
from xlip.data.dataset import MixedDataset
from xlip.data.manifest import load_manifest
from xlip.data.synthetic import SynthConfig, synthesize
from xlip.errors import InputError
from xlip.files import writable_dir, writable_file, write_atomic
from xlip.flops import batch_shape, step_flops
from xlip.losses import XLIPLoss, total_loss
from xlip.masking import mlm_positions
from xlip.model.xlip import XLIPModel
from xlip.optim import adamw, to_device
from xlip.precision import autocast, cpu_has_fast_bf16, resolve_precision, set_tf32
from xlip.text.labels import CANONICAL_FINDINGS
from xlip.text.tokenizer import train_wordpiece
from xlip.train.distributed import DistInfo
from xlip.train.loop import build_loader

CLIP = ["mim.policy=none", "mlm.policy=none", "loss.w_mim=0", "loss.w_mlm=0"]
GROUPS: dict[str, list[tuple[str, list[str]]]] = {
    # fast mode encodes the visible patches, so it masks the image even where the config
    # masks the full pass's tokens (the demo's does), as the ablation's xlip_fast does
    "steps": [("clip", CLIP), ("xlip", []), ("xlip_fast", ["train.mode=fast", "mim.mask_at=image"]),
              ("xlip_tokens", ["mim.mask_at=tokens"])],
    "attention": [("explicit", ["vision.attn_impl=explicit"]),
                  ("sdpa", ["vision.attn_impl=sdpa"])],
    "precision": [("fp32", ["train.precision=fp32"]), ("bf16", ["train.precision=bf16"])],
    "tasks": [("xlip", []), ("random_mim", ["mim.policy=random"]),
              ("no_mim", ["mim.policy=none", "loss.w_mim=0"]), ("clip", CLIP)],
}


@dataclass(frozen=True)
class Preset:
    """A model size with the batch it is timed at. ``length``: tokens per text (every row
    padded to it); the MLM labels are a quarter of them."""

    config: dict[str, Any]
    batch: int
    length: int
    steps: int
    vocab: int


PRESETS: dict[str, Preset] = {
    # small enough for tests: a 4-block ViT on 64 px, 2-layer BERT
    "tiny": Preset({"vision": {"preset": "custom", "width": 128, "depth": 4, "heads": 4,
                               "image_size": 64, "patch_size": 8},
                    "text": {"preset": "custom", "hidden": 128, "layers": 2, "heads": 2,
                             "intermediate": 512},
                    "model": {"embed_dim": 128, "mae_decoder_width": 128,
                              "mae_decoder_depth": 2, "mae_decoder_heads": 4,
                              "mm_decoder_depth": 1}},
                   batch=32, length=32, steps=3, vocab=1000),
    # ViT-B/16 at 224 px + BERT-base (BERT's 30522-token vocabulary); the default decoders.
    # Batch 8 and 2 timed steps: a step takes tens of seconds on a 2-core CPU
    "base": Preset({"vision": {"preset": "base", "image_size": 224, "patch_size": 16},
                    "text": {"preset": "base"}},
                   batch=8, length=64, steps=2, vocab=30522),
}


def synthetic_batch(cfg: Config, batch: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    """Random images and token ids, every row paired, a quarter of the tokens MLM labels."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 1:length // 4] = ids[:, 1:length // 4]
    s = cfg.vision.image_size
    return {"images": torch.randn(batch, cfg.vision.in_chans, s, s, generator=g),
            "has_image": torch.ones(batch, dtype=torch.bool), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "text_key": torch.arange(batch),
            "guide_mask": torch.ones_like(ids, dtype=torch.bool),
            "guide_fallback": torch.zeros(batch, dtype=torch.bool),
            "labels": torch.zeros(batch, len(CANONICAL_FINDINGS)),
            "source": torch.zeros(batch, dtype=torch.long), "mlm_rows": torch.arange(batch),
            "mlm_input_ids": ids, "mlm_attention_mask": torch.ones_like(ids),
            "mlm_labels": labels, "mlm_positions": mlm_positions(labels)}


# -- measuring -------------------------------------------------------------------------------


def machine_kind(device: torch.device) -> str:
    """A file-name tag for the hardware: ``cpu_2core_avx2``, ``cuda_nvidia_h100_80gb_hbm3``."""
    if device.type == "cuda":
        return "cuda_" + re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower())
    flags = _cpu_flags()
    isa = next((name for flag, name in (("amx_bf16", "amx"), ("avx512_bf16", "avx512bf16"),
                                        ("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"))
                if flag in flags), "generic")
    return f"cpu_{os.cpu_count()}core_{isa}"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def _cpu_model() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        m = None
    return m.group(1).strip() if m else platform.processor()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of the fastest of ``reps`` (n×n)·(n×n) products: the practical peak."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


class PeakMemory:
    """Peak memory a block of work adds. CUDA: ``max_memory_allocated`` over what was
    allocated before. CPU: the peak resident set size (``VmHWM``, reset through
    ``/proc/self/clear_refs``) over the resident size before; where the reset is refused,
    ``ru_maxrss``'s growth (0 when an earlier, larger peak hides it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                       "peak RSS (VmHWM) over RSS before" if _reset_hwm() else
                       "growth of ru_maxrss (a lower bound)")

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("peak RSS"):
            _reset_hwm()
            self.before = _status_kb("VmRSS") * 1024
        else:
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("peak RSS"):
            peak = _status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.bytes = max(0, peak - self.before)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    m = re.search(rf"^{key}:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def _malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc), so the next variant's RSS starts low."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may include the previous variant's freed memory


def time_steps(cfg: Config, batch: dict, steps: int, vocab: int, device: torch.device,
               tick: Callable[[], None] = lambda: None, warmup: int = 1) -> list[float]:
    """Seconds of each timed training step (model + loss forward, backward, AdamW)."""
    torch.manual_seed(0)
    model = XLIPModel(cfg, vocab).to(device).train()
    crit = XLIPLoss(cfg)
    opt, _ = adamw(model, cfg)
    batch = to_device(batch, device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        with autocast(cfg.train.precision, device):
            losses = crit(model(batch), batch)
        total_loss(losses).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        tick()
    return times


def loader_throughput(cfg: Config, batch_size: int, batches: int = 3) -> dict[str, Any]:
    """Samples/s of the training loader in this process (``num_workers=0``): a small synthetic
    corpus at the preset's image size, read by :class:`MixedDataset` (PNG decoding,
    augmentation) and collated (tokenising, NER, EntMLM masking) as training does."""
    with tempfile.TemporaryDirectory(prefix="xlip_bench_") as tmp:
        manifest = synthesize(Path(tmp), n_train=2 * batch_size, n_test=0, seed=0,
                              cfg=SynthConfig(size=cfg.vision.image_size),
                              image_only_fraction=0.0, text_only_fraction=0.0)
        texts = [r.text for r in load_manifest(manifest, verify_images=False) if r.text]
        tok = train_wordpiece(texts, Path(tmp) / "tok", vocab_size=400, min_frequency=1)
        data = dict(cfg.to_dict(), data={"sources": [{"manifest": str(manifest),
                                                      "kind": "paired"}],
                                         "batch_size": batch_size, "num_workers": 0})
        data["train"] = dict(data["train"], steps=batches + 1, warmup_steps=0)
        lcfg = from_dict(data)
        dataset = MixedDataset(lcfg, train=True)
        collate = Collator(lcfg, tok, train=True, findings=dataset.findings())
        it = iter(build_loader(lcfg, dataset, collate, 0, DistInfo()))
        next(it)  # warm-up
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        sec = time.perf_counter() - t
        # the collator alone on a batch of 256 (rows repeat): its share of the loader's work;
        # a fresh one times it, as the first call's NER cache would serve the second
        big = [dataset[(i % len(dataset), i)] for i in range(256)]
        collate(big)
        cold = Collator(lcfg, tok, train=True, findings=dataset.findings())
        t = time.perf_counter()
        cold(big)
        collate_sec = time.perf_counter() - t
    return {"samples_per_s": batches * batch_size / sec, "batch_size": batch_size,
            "num_workers": 0, "image_size": cfg.vision.image_size,
            "collate_256_s": collate_sec, "collate_samples_per_s": 256 / collate_sec,
            "what": "synthetic PNG corpus → MixedDataset → Collator, one process"}


# -- the run ---------------------------------------------------------------------------------


@dataclass
class BenchOptions:
    """What ``xlip bench`` measures (see its flags)."""

    presets: tuple[str, ...] = ("tiny",)
    group: str = "steps"
    batch_size: int = 0  # 0: the preset's
    steps: int = 0  # 0: the preset's
    overrides: tuple[str, ...] = ()  # section.key=value on top of the preset (and --config)
    base: dict | None = None  # a config file's contents, under the preset
    device: str = "cpu"
    loader: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [p for p in self.presets if p not in PRESETS]
        if bad or not self.presets:
            raise InputError(f"--preset {','.join(self.presets)}: unknown preset "
                             f"{', '.join(bad) or '(none given)'}; choose from "
                             f"{', '.join(PRESETS)} (comma-separated)")
        if self.group not in GROUPS:
            raise InputError(f"--group {self.group}: choose one of {', '.join(GROUPS)}")
        if self.base is not None and not isinstance(self.base, dict):
            raise InputError("--config: the file's top level must be a mapping of config "
                             "sections (vision:, text:, ...)")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is visible; use --device cpu")
        for flag, value in (("--steps", self.steps), ("--batch-size", self.batch_size)):
            if value < 0:
                raise InputError(f"{flag} {value}: give a positive number (0: the preset's)")


def preset_config(name: str, opts: BenchOptions, overrides: list[str]) -> Config:
    """The preset's sizes under ``--config`` (the file wins where both set a key), then the
    command's and the variant's overrides. ``data`` is dropped: the bench makes its batches."""
    base = merge(opts.base or {}, [])
    for section, values in PRESETS[name].config.items():
        base[section] = {**values, **(base.get(section) or {})}
    base.pop("data", None)
    return from_dict(drop_unused_options(merge(base, [*opts.overrides, *overrides])))


def precisions(group: str, device: torch.device) -> list[str]:
    """fp32 always; bf16 too where ``auto`` would train in it (the precision group: as given)."""
    if group == "precision":
        return ["as_variant"]
    return ["fp32", "bf16"] if resolve_precision("auto", device) == "bf16" else ["fp32"]


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Measure every (preset, precision, variant); returns the JSON-ready result."""
    torch.set_flush_denormal(True)
    device = torch.device(opts.device)
    for name in opts.presets:  # a config the FLOP count cannot follow: before any timing
        if preset_config(name, opts, []).mim.row_fraction < 1:
            raise InputError(f"mim.row_fraction={preset_config(name, opts, []).mim.row_fraction}"
                             ": xlip bench counts the FLOPs of MIM on every image row; leave it "
                             "at 1")
    # as training sets it (train.tf32, CUDA only): the peak and the steps under one setting
    tf32 = preset_config(opts.presets[0], opts, []).train.tf32
    set_tf32(tf32, device)
    precs = precisions(opts.group, device)
    peak = {"fp32": matmul_peak(device, torch.float32),
            "bf16": matmul_peak(device, torch.bfloat16) if "bf16" in precs else None}
    memory = PeakMemory(device)
    variants = GROUPS[opts.group]
    total = sum((opts.steps or PRESETS[p].steps) + 1 for p in opts.presets) * len(precs) \
        * len(variants)
    rows: list[dict[str, Any]] = []
    with tqdm(total=total, desc="bench steps", disable=not opts.progress) as bar:
        for name in opts.presets:
            pre = PRESETS[name]
            for prec in precs:
                extra = [] if prec == "as_variant" else [f"train.precision={prec}"]
                first = None
                for variant, overrides in variants:
                    cfg = preset_config(name, opts, [*extra, *overrides])
                    bs, steps = opts.batch_size or pre.batch, opts.steps or pre.steps
                    batch = synthetic_batch(cfg, bs, pre.length, pre.vocab)
                    with PeakMemory(device) as mem:
                        times = time_steps(cfg, batch, steps, pre.vocab, device, bar.update)
                    row = measure_row(cfg, name, variant, overrides, batch, times, mem.bytes,
                                      peak, pre.vocab, device)
                    first = first or row
                    row["time_ratio_to_first"] = row["s_per_step"] / first["s_per_step"]
                    row["flop_ratio_to_first"] = row["flops_step"] / first["flops_step"]
                    rows.append(row)
    result: dict[str, Any] = {
        "group": opts.group, "machine": machine(device), "matmul_peak_flops_per_s": peak,
        "tf32": tf32 if device.type == "cuda" else None,
        "memory_measure": memory.method, "rows": rows}
    if opts.group == "steps":
        result.update(step_summary(rows, device))
    if opts.loader:
        result["loader"] = {name: loader_throughput(preset_config(name, opts, []),
                                                    opts.batch_size or PRESETS[name].batch)
                            for name in opts.presets}
    return result


def measure_row(cfg: Config, preset: str, variant: str, overrides: list[str], batch: dict,
                times: list[float], mem: int, peak: dict, vocab: int,
                device: torch.device) -> dict[str, Any]:
    led = step_flops(cfg, batch_shape(batch, vocab))
    sec = statistics.median(times)
    prec = resolve_precision(cfg.train.precision, device)
    achieved = led.total / sec
    return {"preset": preset, "variant": variant, "overrides": " ".join(overrides),
            "precision": prec, "batch_size": len(batch["has_image"]),
            "text_length": batch["input_ids"].shape[1], "timed_steps": len(times),
            "s_per_step": sec, "s_per_step_all": times,
            "samples_per_s": len(batch["has_image"]) / sec,
            "flops_forward": led.forward, "flops_backward": led.backward,
            "flops_step": led.total, "flops_by_part": led.by_part(),
            "achieved_flops_per_s": achieved,
            "mfu": achieved / peak[prec] if peak.get(prec) else None,
            "peak_memory_bytes": mem}


def _pick(rows: list[dict], preset: str, prec: str, variant: str) -> dict | None:
    return next((r for r in rows if (r["preset"], r["precision"], r["variant"])
                 == (preset, prec, variant)), None)


def preset_ratios(rows: list[dict], preset: str, prec: str) -> dict[str, float]:
    clip, xlip, fast, tokens = (_pick(rows, preset, prec, v)
                                for v in ("clip", "xlip", "xlip_fast", "xlip_tokens"))
    out = {}
    for name, row in (("xlip_default", xlip), ("xlip_fast", fast), ("xlip_tokens", tokens)):
        if row is None:  # xlip_tokens: not in result files written before it existed
            continue
        time_ratio = row["s_per_step"] / clip["s_per_step"]
        flop_ratio = row["flops_step"] / clip["flops_step"]
        out[f"{name}_over_clip"] = time_ratio
        out[f"{name}_flops_over_clip"] = flop_ratio
        out[f"{name}_over_flop_prediction"] = time_ratio / flop_ratio
    return out


def step_summary(rows: list[dict], device: torch.device) -> dict[str, Any]:
    """The issue's headline figures: ratios at the largest preset run (fp32), base MFUs."""
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    by_preset = {p: {prec: preset_ratios(rows, p, prec)
                     for prec in dict.fromkeys(r["precision"] for r in rows if r["preset"] == p)}
                 for p in presets}
    top = "base" if "base" in presets else presets[-1]
    head = by_preset[top]["fp32"]
    out: dict[str, Any] = {
        "ratio_preset": top,
        "xlip_fast_over_clip": head["xlip_fast_over_clip"],
        "xlip_default_over_clip": head["xlip_default_over_clip"],
        "xlip_default_over_flop_prediction": head["xlip_default_over_flop_prediction"],
        "xlip_tokens_over_clip": head.get("xlip_tokens_over_clip"),
        "ratios": by_preset}
    for prec in ("fp32", "bf16"):
        row = _pick(rows, "base", prec, "xlip")
        out[f"mfu_{prec}_base"] = row["mfu"] if row else None
        if row is None:
            out[f"mfu_{prec}_base_reason"] = (
                "the base preset was not run (--preset base)" if "base" not in presets else
                f"bf16 is not accelerated on this {device.type} (no AMX / AVX512-BF16; "
                "xlip/precision.py): not run")
    mfu = out["mfu_fp32_base"]
    out["targets"] = {
        "xlip_fast_le_1.2x_clip": head["xlip_fast_over_clip"] <= 1.2,
        "xlip_default_within_10pct_of_flop_prediction":
            abs(head["xlip_default_over_flop_prediction"] - 1) <= 0.10,
        "mfu_fp32_base_ge_0.5": None if mfu is None else mfu >= 0.5}
    return out


def machine(device: torch.device) -> dict[str, Any]:
    return {"kind": machine_kind(device), "device": device.type,
            "cpu": _cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_fast_bf16": cpu_has_fast_bf16(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


# -- the report ------------------------------------------------------------------------------


def _g(x: float) -> str:
    return f"{x / 1e9:.1f}"


def markdown(result: dict[str, Any], command: str = "") -> str:
    m, peak = result["machine"], result["matmul_peak_flops_per_s"]
    lines = [f"# xlip bench: {m['kind']}", "",
             f"{m['cpu']} ({m['cores']} cores, {m['threads']} torch threads), torch "
             f"{m['torch']}{', GPU ' + m['gpu'] if m['gpu'] else ''}."]
    if command:
        lines += ["", f"`{command}`"]
    lines += ["", f"Matmul peak (2048² fp32, best of 3): {_g(peak['fp32'])} GFLOP/s"
              + (f"; bf16 {_g(peak['bf16'])} GFLOP/s" if peak.get("bf16") else "")
              + f". Peak memory: {result['memory_measure']}.", ""]
    lines += ["| preset | precision | variant | batch | s/step | samples/s | GFLOP/step "
              "(fwd+bwd) | FLOP ratio | time ratio | GFLOP/s | MFU | peak mem MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "–"
        lines.append(
            f"| {r['preset']} | {r['precision']} | {r['variant']} | {r['batch_size']} | "
            f"{r['s_per_step']:.3f} | {r['samples_per_s']:.1f} | {_g(r['flops_step'])} | "
            f"{r['flop_ratio_to_first']:.2f} | {r['time_ratio_to_first']:.2f} | "
            f"{_g(r['achieved_flops_per_s'])} | {mfu} | {r['peak_memory_bytes'] / 2**20:.0f} |")
    lines += ["", "Ratios are to the first variant of each preset and precision."]
    if result["group"] == "steps":
        lines += ["", f"At the {result['ratio_preset']} preset (fp32): XLIP fast / CLIP "
                  f"**{result['xlip_fast_over_clip']:.2f}×** (target ≤ 1.2), XLIP default / "
                  f"CLIP {result['xlip_default_over_clip']:.2f}×, which is "
                  f"**{result['xlip_default_over_flop_prediction']:.2f}×** its FLOP "
                  "prediction (target 1 ± 0.1)."]
        if result.get("xlip_tokens_over_clip") is not None:
            lines.append(f"XLIP with `mim.mask_at=tokens` (no second encoder pass) / CLIP: "
                         f"{result['xlip_tokens_over_clip']:.2f}×.")
        for prec in ("fp32", "bf16"):
            v = result[f"mfu_{prec}_base"]
            lines.append(f"MFU {prec} at base: " + (
                f"**{v:.1%}** of the measured {prec} matmul peak" if v is not None
                else f"null ({result[f'mfu_{prec}_base_reason']})"))
    for name, ld in (result.get("loader") or {}).items():
        lines.append(f"Loader ({name}, {ld['image_size']} px, batch {ld['batch_size']}, one "
                     f"process): {ld['samples_per_s']:.1f} samples/s; the collator alone at "
                     f"batch 256: {ld['collate_samples_per_s']:.0f} samples/s.")
    return "\n".join(lines) + "\n"


def bench_command(opts: BenchOptions, out: str | None, command: str) -> str:
    """``xlip bench``: run, write ``out`` (F.json + F.md, or FOLDER/bench_<machine kind>.json
    + .md; checked before any work), return the Markdown report."""
    path = None
    if out:
        path = Path(out)
        if path.suffix != ".json":
            kind = machine_kind(torch.device(opts.device))
            path = writable_dir(path, "--out") / f"bench_{kind}.json"
        writable_file(path, "--out")
    result = run_bench(opts)
    text = markdown(result, command)
    if path:
        write_atomic(path, json.dumps(result, indent=2) + "\n")
        write_atomic(path.with_suffix(".md"), text)
        text += f"\nwritten: {path} {path.with_suffix('.md')}"
    return text

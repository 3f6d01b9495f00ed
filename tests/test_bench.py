"""The analytic FLOP count (xlip/flops.py), fast mode's gradient paths, gradient checkpointing,
and `xlip bench`'s result file. No test here asserts a wall-clock time."""

import json
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import CLIP, VOCAB, random_batch, tiny_config
from xlip.bench import BenchOptions, PeakMemory, machine_kind, run_bench
from xlip.cli import main
from xlip.errors import InputError
from xlip.flops import StepShape, batch_shape, step_flops
from xlip.losses import XLIPLoss, total_loss
from xlip.model.xlip import XLIPModel
from xlip.precision import resolve_precision

def shape_of(batch: dict) -> StepShape:
    return batch_shape(batch, VOCAB)


def counted(cfg, seed: int = 0, batch: dict | None = None) -> tuple[int, int]:
    """(forward, backward) FLOPs of one training step as torch's FlopCounterMode counts them
    (on ``random_batch`` unless a batch is given)."""
    torch.manual_seed(seed)
    model, crit = XLIPModel(cfg, VOCAB).train(), XLIPLoss(cfg)
    batch = random_batch(cfg) if batch is None else batch
    with FlopCounterMode(display=False) as fwd:
        losses = crit(model(batch), batch)
        loss = total_loss(losses)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def test_hand_count_one_block_vit_one_layer_bert():
    """CLIP step of a 1-block ViT (32 px, patch 8: 16 patches + CLS, width 32, MLP 128) and a
    1-layer BERT (hidden 32, FFN 64), batch 4, 10 tokens, embedding 16, counted by hand."""
    cfg = tiny_config(vision={"depth": 1}, **CLIP)
    B, T, D, L, H = 4, 17, 32, 10, 32
    patch = 2 * B * 16 * D * 64  # 16 patches of 8·8 pixels → 32
    vit = (2 * B * T * D * 3 * D  # qkv
           + 2 * 2 * B * T * T * D  # Q·Kᵀ and A·V
           + 2 * B * T * D * D  # output projection
           + 2 * 2 * B * T * D * 4 * D)  # MLP 32 → 128 → 32
    bert = (2 * B * L * H * 3 * H + 2 * 2 * B * L * L * H + 2 * B * L * H * H
            + 2 * 2 * B * L * H * 64)
    proj = 2 * B * D * 16 + 2 * B * H * 16  # image_proj, text_proj
    logits = 2 * (2 * B * B * 16)  # image·textᵀ and text·imageᵀ
    forward = patch + vit + bert + proj + logits
    assert forward == 262144 + 1819136 + 706560 + 8192 + 1024
    backward = patch + 2 * (vit + bert + proj + logits)  # the images need no gradient
    led = step_flops(cfg, shape_of(random_batch(cfg)))
    assert (led.forward, led.backward) == (forward, backward)
    assert counted(cfg) == (forward, backward)


@pytest.mark.parametrize("sections", [
    {},  # XLIP default: AttMIM, EntMLM
    {"train": {"mode": "fast"}},
    {"train": {"mode": "fast"}, "mim": {"policy": "random"}},
    CLIP,
    {"vision": {"stem": "hybrid"}},
    {"vision": {"stem": "hybrid"}, "train": {"mode": "fast"}},
    {"vision": {"stem": "hybrid"}, "train": {"mode": "fast"}, "mim": {"policy": "random"}},
    {"vision": {"stem": "conv"}},
    {"loss": {"cl_targets": "labels"}},
    {"vision": {"grad_checkpointing": True}, "text": {"grad_checkpointing": True}},
    {"mim": {"mask_at": "tokens"}},
    {"vision": {"stem": "hybrid"}, "mim": {"mask_at": "tokens", "policy": "random"}},
], ids=["default", "fast", "fast-random", "clip", "hybrid", "hybrid-fast",
        "hybrid-fast-random", "conv-stem", "label-targets", "checkpointing", "tokens-mask",
        "hybrid-tokens-mask-random"])
def test_step_flops_equal_torch_flop_counter(sections):
    """Every matmul, convolution and attention product of the real step, forward and backward
    (no-grad passes, inputs without gradients and checkpoint recomputation included)."""
    cfg = tiny_config(**sections)
    led = step_flops(cfg, shape_of(random_batch(cfg)))
    assert counted(cfg) == (led.forward, led.backward)


@pytest.mark.parametrize("sections", [{}, {"mim": {"mask_at": "tokens"}},
                                      {"train": {"mode": "fast"}, "vision": {"stem": "hybrid"}}],
                         ids=["default", "tokens-mask", "fast-hybrid"])
def test_step_flops_after_aux_until_are_clips(sections):
    """A step after ``loss.aux_until`` (``aux=False``) costs what FlopCounterMode counts on
    the real model's CL-only step, which is the CLIP config's step."""
    cfg = tiny_config(loss={"aux_until": 0.5}, **sections)
    batch = random_batch(cfg)
    led = step_flops(cfg, shape_of(batch), aux=False)
    torch.manual_seed(0)
    model, crit = XLIPModel(cfg, VOCAB).train(), XLIPLoss(cfg)
    with FlopCounterMode(display=False) as fwd:
        loss = total_loss(crit(model(batch, aux=False), batch))
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    assert (fwd.get_total_flops(), bwd.get_total_flops()) == (led.forward, led.backward)
    clip = tiny_config(**{**sections, **CLIP, "train": {}, "mim": {"policy": "none"}})
    assert led.total == step_flops(clip, shape_of(batch)).total
    assert led.total < step_flops(cfg, shape_of(batch)).total


def test_step_flops_count_clean_texts_grouped_by_length():
    """With the clean texts in two length groups (the collator's ``clean_groups``) BERT's
    clean pass costs each group's rows × its length; FlopCounterMode on the real step agrees."""
    cfg = tiny_config(mim={"policy": "attention"})
    batch = random_batch(cfg, B=4, L=10)
    batch["attention_mask"][:2, 4:] = 0
    batch["guide_mask"] &= batch["attention_mask"].bool()
    grouped = dict(batch, clean_rows=torch.tensor([0, 1, 2, 3]), clean_groups=((2, 4), (2, 10)))
    led, one = step_flops(cfg, shape_of(grouped)), step_flops(cfg, shape_of(batch))
    assert counted(cfg, batch=grouped) == (led.forward, led.backward)
    text = {n: sum(t.forward + t.backward for t in x.terms if t.name.startswith("text"))
            for n, x in (("grouped", led), ("one", one))}
    assert text["grouped"] < text["one"]
    assert one.total - led.total == text["one"] - text["grouped"]  # nothing else changes


def test_flop_counter_misses_cpu_sdpa():
    """FlopCounterMode has no formula for the CPU flash-attention kernel that
    ``scaled_dot_product_attention`` runs: with ``vision.attn_impl=sdpa`` it misses exactly
    the ViT's Q·Kᵀ and A·V products, which xlip/flops.py counts."""
    cfg = tiny_config(vision={"attn_impl": "sdpa"})
    led = step_flops(cfg, shape_of(random_batch(cfg)))
    attn = [t for t in led.terms if t.name.startswith("vision") and t.name.endswith("/attn")]
    fwd, bwd = counted(cfg)
    assert fwd == led.forward - sum(t.forward for t in attn)
    assert bwd == led.backward - sum(t.backward for t in attn)


def full_pass_leaves(cfg):
    """Run a step with the full-image ViT pass's outputs replaced by leaves that require
    gradients; return (loss, leaves)."""
    torch.manual_seed(0)
    model, crit = XLIPModel(cfg, VOCAB).train(), XLIPLoss(cfg)
    leaves = []

    def hook(module, args, out):
        if len(args) == 1:  # keep_ids not given: the full image
            out = {k: v.detach().requires_grad_() for k, v in out.items()}
            leaves.extend(out.values())
            return out

    model.vision.register_forward_hook(hook)
    batch = random_batch(cfg)
    losses = crit(model(batch), batch)
    return total_loss(losses), leaves, model


def test_fast_mode_loss_does_not_depend_on_full_pass():
    """Fast mode with AttMIM: the full pass only picks the mask; autograd finds no path from
    the loss to its outputs. In default mode the same check finds one (the test can fail)."""
    loss, leaves, model = full_pass_leaves(tiny_config(train={"mode": "fast"}))
    assert leaves  # the full pass ran (AttMIM scores it)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    assert all(g is None for g in grads)
    # every parameter still gets a gradient through the visible pass and the decoders
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())

    loss, leaves, _ = full_pass_leaves(tiny_config())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("stem", ["linear", "hybrid"])
def test_grad_checkpointing_same_loss_and_gradients(stem):
    """Checkpointed encoders recompute activations (dropout included, with its RNG state) and
    give the loss and every gradient of the plain step."""
    def step(ckpt: bool):
        cfg = tiny_config(vision={"stem": stem, "grad_checkpointing": ckpt},
                          text={"grad_checkpointing": ckpt, "dropout": 0.1})
        torch.manual_seed(0)
        model, crit = XLIPModel(cfg, VOCAB).train(), XLIPLoss(cfg)
        batch = random_batch(cfg)
        torch.manual_seed(1)  # the masks and the dropout draws
        losses = crit(model(batch), batch)
        loss = total_loss(losses)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    (l0, g0), (l1, g1) = step(False), step(True)
    assert torch.allclose(l0, l1, rtol=1e-6, atol=1e-7)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-5, atol=1e-7), name


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "F.json"
    assert main(["bench", "--preset", "tiny", "--steps", "1", "--batch-size", "8",
                 "--out", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_bench_writes_the_issue_keys(bench_result):
    result, out = bench_result
    for key in ("xlip_fast_over_clip", "xlip_default_over_flop_prediction"):
        assert isinstance(result[key], float) and result[key] > 0
    # the tiny preset only: the base MFUs are null, each with the reason
    assert result["mfu_fp32_base"] is None and "base" in result["mfu_fp32_base_reason"]
    assert result["mfu_bf16_base"] is None and result["mfu_bf16_base_reason"]
    # fp32 rows always, bf16 rows too on a CPU with AVX512-BF16 or AMX (where train.precision
    # auto trains in bf16); the ratios and the MFU below are the fp32 rows'
    variants = ["clip", "xlip", "xlip_fast", "xlip_tokens"]
    precs = ["fp32", "bf16"] if resolve_precision("auto", torch.device("cpu")) == "bf16" \
        else ["fp32"]
    assert sorted((r["precision"], r["variant"]) for r in result["rows"]) == \
        sorted((p, v) for p in precs for v in variants)
    rows = {r["variant"]: r for r in result["rows"] if r["precision"] == "fp32"}
    assert list(rows) == variants
    for r in rows.values():
        assert r["batch_size"] == 8 and r["timed_steps"] == 1
        for key in ("s_per_step", "samples_per_s", "flops_step", "achieved_flops_per_s", "mfu"):
            assert r[key] > 0, key
        assert r["flops_step"] == r["flops_forward"] + r["flops_backward"]
        assert sum(r["flops_by_part"].values()) == r["flops_step"]
        assert r["peak_memory_bytes"] >= 0
        assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"]
                                         / result["matmul_peak_flops_per_s"]["fp32"])
    clip, xlip, fast, tokens = (rows[v] for v in ("clip", "xlip", "xlip_fast", "xlip_tokens"))
    assert result["xlip_fast_over_clip"] == pytest.approx(fast["s_per_step"] / clip["s_per_step"])
    assert result["xlip_tokens_over_clip"] == pytest.approx(
        tokens["s_per_step"] / clip["s_per_step"])
    time_ratio = xlip["s_per_step"] / clip["s_per_step"]
    flop_ratio = xlip["flops_step"] / clip["flops_step"]
    assert result["xlip_default_over_flop_prediction"] == pytest.approx(time_ratio / flop_ratio)
    assert xlip["time_ratio_to_first"] == pytest.approx(time_ratio)
    # the arithmetic the figures rest on: XLIP costs more than CLIP, fast mode less than XLIP
    assert clip["flops_step"] < fast["flops_step"] < xlip["flops_step"]
    # masking the full pass's tokens saves exactly the visible-patch encoder pass
    assert clip["flops_step"] < tokens["flops_step"] < xlip["flops_step"]
    assert "vision.visible" in xlip["flops_by_part"]
    assert "vision.visible" not in tokens["flops_by_part"]
    assert result["loader"]["tiny"]["samples_per_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| tiny | fp32 | xlip_fast | 8 |" in md and "XLIP fast / CLIP" in md
    assert "mim.mask_at=tokens" in md


def test_bench_steps_group_runs_a_config_that_masks_tokens(tmp_path):
    """The demo config masks the full pass's tokens (mim.mask_at=tokens), which fast mode
    cannot: the fast variant masks the image instead of stopping the bench with an error."""
    out = tmp_path / "F.json"
    assert main(["bench", "--preset", "tiny", "--steps", "1", "--batch-size", "4",
                 "--no-loader", "--out", str(out), "mim.mask_at=tokens"]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]
            if r["precision"] == "fp32"}
    assert "mim.mask_at=image" in rows["xlip_fast"]["overrides"]
    # the config's own xlip masks tokens: no visible-patch pass; fast mode has one
    assert "vision.visible" not in rows["xlip"]["flops_by_part"]
    assert "vision.visible" in rows["xlip_fast"]["flops_by_part"]


def test_bench_refuses_bad_options(tmp_path):
    with pytest.raises(InputError, match="--preset huge: unknown preset huge; choose from tiny"):
        BenchOptions(presets=("huge",))
    (tmp_path / "file").write_text("")
    assert main(["bench", "--out", str(tmp_path / "file" / "F.json")]) == 2
    with pytest.raises(InputError, match="--steps -1: give a positive number"):
        BenchOptions(steps=-1)
    with pytest.raises(InputError, match="--batch-size -2: give a positive number"):
        BenchOptions(batch_size=-2)
    # refused before any step is timed (a step of the tiny preset would take seconds)
    with pytest.raises(InputError, match="mim.row_fraction=0.5: xlip bench counts"):
        run_bench(BenchOptions(overrides=("mim.row_fraction=0.5",), progress=False))


def test_peak_memory_sees_an_allocation():
    """The CPU measure (peak RSS over the RSS before, or ru_maxrss's growth) finds 64 MB
    written inside the block, and the machine kind names the CPU's cores and vector unit."""
    mem = PeakMemory(torch.device("cpu"))
    if not mem.method.startswith("peak RSS"):
        pytest.skip(f"no /proc/self/clear_refs here: the bench falls back to {mem.method}")
    with mem:
        x = torch.ones(16 * 2 ** 20)  # 64 MB, every page touched
        del x
    assert mem.bytes >= 60 * 2 ** 20, mem.method
    assert re.fullmatch(r"cpu_\d+core_[a-z0-9]+", machine_kind(torch.device("cpu")))


def benchmark_script(name: str):
    """The module of ``benchmarks/<name>.py`` (a script folder, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shard_throughput_base_preset_takes_the_bench_sizes(tmp_path):
    """benchmarks/shard_throughput.py --stream-preset base: the streaming loader and the step
    at xlip bench's base sizes (ViT-B/16 at 224 px, BERT-base, batch 8, 64 tokens), nothing of
    the demo's small model left; `demo` leaves the demo config alone."""
    from xlip.demo import demo_config

    mod = benchmark_script("shard_throughput")
    demo = demo_config(tmp_path, [])
    assert mod.at_preset(demo, "demo") is demo
    base = mod.at_preset(demo, "base")
    v, t = base.vision, base.text
    assert (v.preset, v.resolved()[:2], v.image_size, v.patch_size) == ("base", (768, 12), 224, 16)
    assert (t.preset, t.resolved()[:2]) == ("base", (768, 12))
    assert (base.data.batch_size, t.max_length) == (8, 64)
    assert base.model.mae_decoder_depth == 4 and base.model.embed_dim == 256  # the defaults
    assert base.mim.policy == demo.mim.policy and base.data.sources == demo.data.sources


def test_compute_curve_reads_the_committed_ablations(tmp_path, monkeypatch):
    """benchmarks/compute_curve.py plots what the committed result files say: each point's mean
    is its file's per-seed AUCs averaged (the 2x-budget CLIP point: that file's own mean), and
    the figure is written."""
    import statistics
    import sys

    mod = benchmark_script("compute_curve")
    pts = mod.points()
    assert {p["curve"] for p in pts} == {"clip", "xlip", "plain"}
    budget2x = json.loads((mod.RESULTS / "ablation_demo_budget2x.json").read_text())
    clip2x = next(p for p in pts if p["curve"] == "clip" and p["steps"] == 2624)
    assert clip2x["mean"] == pytest.approx(budget2x["variants"]["clip"]["mean_auc"])
    assert clip2x["seeds"] == 5 and clip2x["tflop"] == pytest.approx(68.1, abs=0.1)
    lean = json.loads((mod.RESULTS / "ablation_demo_lean_cpu.json").read_text())
    xlip560 = next(p for p in pts if p["curve"] == "xlip" and p["steps"] == 560)
    assert xlip560["mean"] == pytest.approx(statistics.fmean(
        r["zeroshot"] for r in lean["runs"] if r["run"] == "xlip_tok_w64@560"))
    out = tmp_path / "curve.png"
    monkeypatch.setattr(sys, "argv", ["compute_curve.py", "--out", str(out)])
    mod.main()
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"

"""`xlip ablate` (variants side by side, resume, equal time) and `xlip visualize`."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CLIP, build_corpus, tiny_config
from xlip import ablate
from xlip.cli import main
from xlip.config import load_config, save_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"), 64, 16, seed=7, size=32,
                        vocab_size=400)


def write_cfg(corpus, path, steps=3):
    manifest, tok = corpus
    cfg = tiny_config(
        data={"sources": [{"manifest": str(manifest), "kind": "paired", "weight": 0.75},
                          {"manifest": str(manifest), "kind": "image_only", "weight": 0.25}],
              "batch_size": 8, "num_workers": 0, "eval_manifest": str(manifest),
              "verify_images": False},
        text={"tokenizer": str(tok), "max_length": 96},
        eval={"bootstrap": 20},
        train={"steps": steps, "warmup_steps": 1, "log_every": 1, "ckpt_every": steps})
    save_config(cfg, path)
    return path


def test_ablation_runs_variants_and_seeds_then_resumes(corpus, tmp_path, monkeypatch, capsys):
    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    out = tmp_path / "abl"
    args = ["ablate", "--config", str(cfg), "--variants", "clip,xlip,xlip-no_prompts,lr",
            "--define", "lr=train.lr=1e-3,mim.policy=random", "--seeds", "0,1",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    summary = json.loads((out / "ablation.json").read_text())
    assert set(summary["variants"]) == {"clip", "xlip", "xlip-no_prompts", "lr"}
    assert summary["budget"]["equal"] == "steps" and summary["seeds"] == [0, 1]
    for name, v in summary["variants"].items():
        aucs = [s["mean_auc"] for s in v["seeds"]]
        assert len(aucs) == 2 and v["mean_auc"] == pytest.approx(np.mean(aucs))
        assert v["sd"] == pytest.approx(np.std(aucs, ddof=1))
        assert v["s_per_step"] > 0 and v["steps"] == 3
        for s in v["seeds"]:
            lo, hi = s["ci95"]
            # a percentile CI need not hold the mean: only its bounds are checked
            assert (0.0 <= lo <= hi <= 1.0) or np.isnan(lo)
    # the variants really differ: clip has no MIM/MLM terms, no_prompts no image-only rows
    m = json.loads((out / "runs" / "clip" / "seed0" / "metrics.jsonl").read_text()
                   .splitlines()[-1])
    assert "mim_loss" not in m and "cl_loss/image_only" in m
    m = json.loads((out / "runs" / "xlip-no_prompts" / "seed1" / "metrics.jsonl").read_text()
                   .splitlines()[-1])
    assert "mim_loss" in m and "cl_loss/image_only" not in m
    run_cfg = (out / "runs" / "lr" / "seed1" / "config.yaml").read_text()
    assert "lr: 0.001" in run_cfg and "seed: 1" in run_cfg
    # the paired difference to clip, seed by seed
    clip = {s["seed"]: s["mean_auc"] for s in summary["variants"]["clip"]["seeds"]}
    xl = summary["variants"]["xlip"]
    diffs = [s["mean_auc"] - clip[s["seed"]] for s in xl["seeds"]]
    assert xl["vs_clip"]["mean"] == pytest.approx(np.mean(diffs))
    assert xl["vs_clip"]["ahead"] == sum(d > 0 for d in diffs) and xl["vs_clip"]["seeds"] == 2
    md = (out / "ablation.md").read_text()
    assert "| clip | 3 |" in md and "Nodule" in md and "Δ clip" in md
    assert f"{xl['vs_clip']['mean']:+.3f} ({xl['vs_clip']['ahead']}/2)" in md
    # a second call trains nothing: every (variant, seed) has its result
    monkeypatch.setattr("xlip.train.loop.pretrain",
                        lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert main(args) == 0
    assert json.loads((out / "ablation.json").read_text())["variants"].keys() == \
        summary["variants"].keys()


def test_a_probe_is_added_to_finished_runs_without_training_them_again(tmp_path, monkeypatch):
    corpus = build_corpus(tmp_path / "corpus", 240, 80, seed=3, size=32, vocab_size=400)
    cfg = write_cfg(corpus, tmp_path / "c.yaml", steps=2)
    args = ["ablate", "--config", str(cfg), "--variants", "clip,xlip", "--out",
            str(tmp_path / "abl"), "--quiet"]
    assert main(args) == 0
    assert "linear probe" not in (tmp_path / "abl" / "ablation.md").read_text()
    monkeypatch.setattr("xlip.train.loop.pretrain",
                        lambda *a, **k: pytest.fail("a finished run was trained again"))
    # a run trained whose evaluation never finished (no result.json): evaluated, not retrained
    (tmp_path / "abl" / "runs" / "clip" / "seed0" / "result.json").unlink()
    assert main(args + ["--probe", "--retrieval"]) == 0
    summary = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    for name in ("clip", "xlip"):
        res = json.loads((tmp_path / "abl" / "runs" / name / "seed0" / "result.json")
                         .read_text())
        assert 0.0 < res["probe"]["mean_auc"] <= 1.0 and "zeroshot" in res
        assert summary["variants"][name]["probe"]["mean_auc"] == res["probe"]["mean_auc"]
    md = (tmp_path / "abl" / "ablation.md").read_text()
    probe = summary["variants"]["xlip"]["probe"]
    assert "| probe 100 % | probe 10 % |" in md and f" {probe['mean_auc']:.3f} |" in md
    assert probe["fractions"]["1"]["mean_auc"] == probe["mean_auc"]
    assert res["probe"]["fractions"]["0.1"]["n_train"] < res["probe"]["n_train"]
    # 1 % of the ~195 training patients is 2 patients, chosen (xlip.data.splits, rarest
    # finding first) so that findings have both classes: scored (a fraction too small to score
    # is recorded, not fatal: tests/test_splits.py)
    one = res["probe"]["fractions"]["0.01"]
    assert "error" not in one and 0 < one["n_train"] < res["probe"]["fractions"]["0.1"]["n_train"]
    assert "0.01" in probe["fractions"] and "probe 1 %" in md
    ret = summary["variants"]["xlip"]["retrieval"]
    assert 0 <= ret["image_to_text"]["R@1"] <= ret["image_to_text"]["R@5"] <= 1
    assert "| i→t R@5 | t→i R@5 |" in md and f" {ret['text_to_image']['R@5']:.3f} |" in md


def test_finetuning_is_added_to_finished_runs_as_xlip_eval_finetune_scores_it(tmp_path,
                                                                               monkeypatch):
    corpus = build_corpus(tmp_path / "corpus", 240, 80, seed=3, size=32, vocab_size=400)
    cfg = write_cfg(corpus, tmp_path / "c.yaml", steps=2)
    out = tmp_path / "abl"
    args = ["ablate", "--config", str(cfg), "--variants", "clip,xlip", "--seeds", "1", "--out",
            str(out), "--quiet"]
    assert main(args) == 0
    monkeypatch.setattr("xlip.train.loop.pretrain",
                        lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert main(args + ["--finetune", "--finetune-steps", "4"]) == 0
    run = out / "runs" / "xlip" / "seed1"
    res = json.loads((run / "result.json").read_text())["finetune"]
    assert res["steps"] == 4 and set(res["fractions"]) == {"1", "0.1", "0.01"}
    assert res["fractions"]["1"]["mean_auc"] == res["mean_auc"]
    assert res["fractions"]["0.01"]["n_train"] < res["fractions"]["0.1"]["n_train"] < \
        res["n_train"]
    # the same rows, seed and budget as `xlip eval finetune` on that run: the same score
    assert main(["eval", "finetune", "--model", str(run), "--fraction", "0.1", "--seed", "1",
                 "--steps", "4", "--quiet", "--out", str(tmp_path / "ft")]) == 0
    alone = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert alone["n_train"] == res["fractions"]["0.1"]["n_train"]
    assert alone["mean_auc"] == pytest.approx(res["fractions"]["0.1"]["mean_auc"], abs=1e-6)
    summary = json.loads((out / "ablation.json").read_text())
    ft = summary["variants"]["xlip"]["finetune"]
    assert ft["mean_auc"] == res["mean_auc"] and ft["steps"] == 4
    md = (out / "ablation.md").read_text()
    assert "| fine-tune 100 % | fine-tune 10 % | fine-tune 1 % |" in md
    assert f" {ft['fractions']['0.01']['mean_auc']:.3f} |" in md and "4 steps at most" in md
    # another fine-tuning budget fine-tunes again (and only that: the model is kept)
    assert main(args + ["--finetune", "--finetune-steps", "5"]) == 0
    again = json.loads((run / "result.json").read_text())
    assert again["finetune"]["steps"] == 5 and "zeroshot" in again
    assert main(args + ["--finetune", "--finetune-steps", "0"]) == 2


def test_a_config_key_added_since_a_run_does_not_make_it_changed(tmp_path):
    import yaml

    from xlip.config import from_dict

    cfg = from_dict({"train": {"out_dir": str(tmp_path)}})
    data = cfg.to_dict()
    del data["train"]["diverge_factor"], data["train"]["adam_eps"]  # keys newer than the run
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert ablate.same_config(tmp_path, cfg)
    cfg.train.diverge_factor = 5.0  # not the default: a run without the key did not have it
    assert not ablate.same_config(tmp_path, cfg)
    cfg.train.diverge_factor, cfg.train.lr = 100.0, 1e-2
    assert not ablate.same_config(tmp_path, cfg)


def test_a_decoder_the_run_never_built_does_not_make_it_changed(tmp_path):
    """A CLIP run has no MAE or multimodal decoder, so their sizes cannot change it: a finished
    CLIP run made under a config with another MAE decoder width (the demo config's changed
    from 128 to 64) is the same run; an XLIP run, which builds the decoder, is not."""
    import yaml

    from xlip.config import from_dict
    from xlip.model.xlip import XLIPModel

    for sections, inert in ((CLIP, True), ({}, False)):
        cfg = from_dict({**sections, "train": {"out_dir": str(tmp_path)},
                         "model": {"mae_decoder_width": 128, "mm_decoder_depth": 1}})
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        cfg.model.mae_decoder_width, cfg.model.mm_decoder_depth = 64, 2
        assert ablate.same_config(tmp_path, cfg) is inert
    # inert indeed: the CLIP model is the same module for module, weight for weight
    models = []
    for width in (128, 64):
        torch.manual_seed(0)
        models.append(XLIPModel(from_dict({**CLIP, "model": {"mae_decoder_width": width}}), 50))
    a, b = (m.state_dict() for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def equal_time_spec(corpus, tmp_path) -> tuple[Path, Path, ablate.AblationSpec]:
    """clip and xlip at equal time, 40 steps of xlip: (config file, OUT, spec)."""
    cfg = write_cfg(corpus, tmp_path / "c.yaml", steps=40)
    out = tmp_path / "abl"
    out.mkdir()
    return cfg, out, ablate.AblationSpec(base=load_config(cfg).to_dict(), out=out,
                                         variants=ablate.variant_overrides(["clip", "xlip"]),
                                         equal="time")


def calibration_entry(spec, name, seconds, base=None) -> dict:
    """A calibration.json entry for ``name``, as if measured under ``base`` (the spec's)."""
    c = ablate.variant_config(base or spec.base, name, spec.variants[name], 0,
                              spec.out / "calibration" / name, spec.calibrate_steps)
    return {"s_per_step": seconds, "config_digest": ablate.config_digest(c)}


def test_equal_time_gives_each_variant_the_reference_budget(corpus, tmp_path, monkeypatch):
    cfg, out, spec = equal_time_spec(corpus, tmp_path)
    calibrated = functools.partial(calibration_entry, spec)
    # measured seconds per step, as if calibrated: CLIP 4x cheaper than XLIP
    (out / "calibration.json").write_text(json.dumps(
        {"clip": calibrated("clip", 0.05), "xlip": calibrated("xlip", 0.2)}))
    seen = {}

    def fake_pretrain(cfg, progress=True):
        seen[cfg.train.out_dir] = cfg.train.steps
        raise SystemExit  # stop after the budget is known

    monkeypatch.setattr("xlip.train.loop.pretrain", fake_pretrain)
    with pytest.raises(SystemExit):
        ablate.run_ablation(spec, progress=False, log=lambda s: None)
    assert list(seen.values()) == [160]  # clip first: 40 xlip steps x 0.2 s / 0.05 s
    assert ablate.step_budget(spec, lambda s: None) == {"clip": 160, "xlip": 40}
    # another seed, run by its own invocation, shares the measurement (it used to calibrate
    # again and, on a loaded machine, give its seed other step counts)
    other_seed = dataclasses.replace(spec, seeds=[1])
    assert ablate.step_budget(other_seed, lambda s: None) == {"clip": 160, "xlip": 40}
    # a measurement made under another config (here: another lr) is not reused
    other = load_config(cfg, ["train.lr=1e-4"]).to_dict()
    (out / "calibration.json").write_text(json.dumps(
        {"clip": calibrated("clip", 0.05, other), "xlip": calibrated("xlip", 0.2)}))
    seen.clear()
    with pytest.raises(SystemExit):
        ablate.step_budget(spec, lambda s: None)
    assert [Path(p).name for p in seen] == ["clip"]  # clip is calibrated again


def test_equal_time_waits_for_a_calibration_in_progress(corpus, tmp_path, monkeypatch, capsys):
    """Two invocations started side by side (one seed each) used to calibrate the same variants
    at the same moment; the second then stopped at the calibration run folder's lock. Now it
    waits for the first's measurement and reuses it."""
    _, out, spec = equal_time_spec(corpus, tmp_path)
    cal = {"clip": calibration_entry(spec, "clip", 0.05),
           "xlip": calibration_entry(spec, "xlip", 0.2)}
    calibrated = []
    monkeypatch.setattr("xlip.train.loop.pretrain",  # imported here: it takes seconds
                        lambda cfg, progress=True: calibrated.append(cfg.train.out_dir))
    lock = out / ".locks" / "calibration.lock"
    # the other invocation: holds the lock while it "measures", writes its result, exits
    other = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, time\nfrom xlip.files import exclusive\n"
         f"with exclusive({str(lock)!r}, 'calibration', ''):\n"
         "    print('held', flush=True)\n    time.sleep(1.5)\n"
         f"    pathlib.Path({str(out / 'calibration.json')!r}).write_text({json.dumps(cal)!r})\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        assert not (out / "calibration.json").exists()
        assert ablate.step_budget(spec, lambda s: None) == {"clip": 160, "xlip": 40}
    finally:
        other.kill()
        other.wait()
    assert calibrated == []  # nothing measured again: the other's figures were read
    assert f"in use by another xlip process (pid {other.pid}); waiting for it" in \
        capsys.readouterr().err


def test_equal_time_times_aux_and_cl_only_steps_apart(corpus, tmp_path, monkeypatch):
    """A variant with loss.aux_until=0.25: its steps with MIM and MLM and its CL-only steps
    are calibrated apart and weighted 1:3 (a 30-step calibration run would time only the
    CL-only steps, which come after its first third)."""
    cfg = write_cfg(corpus, tmp_path / "c.yaml", steps=40)
    out = tmp_path / "abl"
    out.mkdir()
    spec = ablate.AblationSpec(
        base=load_config(cfg).to_dict(), out=out, equal="time", reference="xlip_early",
        calibrate_s=0.0,
        variants={"clip": ablate.variant_overrides(["clip"])["clip"],
                  "xlip_early": ablate.variant_overrides(["xlip"])["xlip"]
                  + ["loss.aux_until=0.25"]})
    runs = []

    def fake_pretrain(cfg, progress=True):  # an aux step 0.4 s, a CL-only step 0.1 s
        aux = cfg.loss.aux_steps(cfg.train.steps) if cfg.mim.policy != "none" else 0
        runs.append((Path(cfg.train.out_dir).name, aux))
        every = cfg.train.log_every
        rows = [json.dumps({"step": n, "elapsed_s": 0.4 * min(n, aux) + 0.1 * max(0, n - aux)})
                for n in range(every, cfg.train.steps + 1, every)]
        Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.train.out_dir) / "metrics.jsonl").write_text("\n".join(rows) + "\n")

    monkeypatch.setattr("xlip.train.loop.pretrain", fake_pretrain)
    # xlip_early: 0.25 x 0.4 + 0.75 x 0.1 = 0.175 s/step, CLIP 0.1: 40 x 0.175 / 0.1 = 70
    assert ablate.step_budget(spec, lambda s: None) == {"clip": 70, "xlip_early": 40}
    assert runs == [("clip", 0), ("xlip_early.aux", 30), ("xlip_early.cl", 0)]
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["xlip_early.aux"]["s_per_step"] == pytest.approx(0.4)
    assert cal["xlip_early.cl"]["s_per_step"] == pytest.approx(0.1)


def test_equal_time_calibration_measures_past_the_warm_up(corpus, tmp_path, monkeypatch):
    """On a GPU the 30 calibration steps last about 2 s, and early steps are slower than later
    ones (warm-up): XLIP's step was measured at 0.089 s and ran at 0.063 s, so CLIP got
    1,469 steps where equal time gave it 1,070. A measurement shorter than calibrate_s is made
    again over enough steps, and only its steps after the first third count."""
    cfg = write_cfg(corpus, tmp_path / "c.yaml", steps=40)
    out = tmp_path / "abl"
    out.mkdir()
    spec = ablate.AblationSpec(base=load_config(cfg).to_dict(), out=out,
                               variants=ablate.variant_overrides(["clip"]), equal="time",
                               reference="clip", calibrate_s=10.0)
    runs = []

    def fake_pretrain(cfg, progress=True):  # 0.2 s a step for 20 steps, then 0.05 s
        runs.append(cfg.train.steps)
        rows, every = [], cfg.train.log_every
        for step in range(every, cfg.train.steps + 1, every):
            elapsed = 0.2 * min(step, 20) + 0.05 * max(0, step - 20)
            rows.append(json.dumps({"step": step, "elapsed_s": elapsed}))
        run = Path(cfg.train.out_dir)
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")

    monkeypatch.setattr("xlip.train.loop.pretrain", fake_pretrain)
    assert ablate.step_budget(spec, lambda s: None) == {"clip": 40}
    # 30 steps measured steps 10-30 (2.5 s, 0.125 s/step): too short, so once more with
    # 30 x 10 s / 2.5 s x 1.1 = 132 steps, measured from step 44 on
    assert runs == [30, 132]
    sec = json.loads((out / "calibration.json").read_text())["clip"]["s_per_step"]
    assert sec == pytest.approx(0.05)
    # long enough the first time: one run
    runs.clear()
    (out / "calibration.json").unlink()
    assert ablate.calibrate(ablate.variant_config(spec.base, "clip", [], 0, out / "cal", 30),
                            out / "cal", 2.0, lambda s: None) == pytest.approx(0.125)
    assert runs == [30]


def test_equal_flops_counts_each_variant_on_its_own_batches(corpus, tmp_path):
    """--equal flops: each variant's FLOPs per step are what torch's FlopCounterMode counts on
    the real model over the batches its loader gives, and its steps spend the reference's
    compute (to within half a step)."""
    from torch.utils.flop_counter import FlopCounterMode

    from xlip.data.collate import Collator
    from xlip.data.dataset import MixedDataset
    from xlip.losses import XLIPLoss, total_loss
    from xlip.model.xlip import XLIPModel
    from xlip.text.tokenizer import load_tokenizer
    from xlip.train.distributed import DistInfo
    from xlip.train.loop import build_loader

    cfg = write_cfg(corpus, tmp_path / "c.yaml", steps=40)
    spec = ablate.AblationSpec(base=load_config(cfg).to_dict(), out=tmp_path / "abl",
                               variants=ablate.variant_overrides(["clip", "clip+entmlm", "xlip"]),
                               equal="flops")
    flops = ablate.flops_per_step(spec)
    assert ablate.flops_per_step(spec) == flops  # counted, not timed: no noise
    tok = load_tokenizer(corpus[1])
    for name in ("clip", "xlip"):
        c = ablate.variant_config(spec.base, name, spec.variants[name], 0, tmp_path / name,
                                  ablate.FLOP_BATCHES)
        dataset = MixedDataset(c, train=True)
        loader = build_loader(c, dataset, Collator(c, tok, train=True,
                                                   findings=dataset.findings()), 0, DistInfo())
        model, crit, seen = XLIPModel(c, len(tok)).train(), XLIPLoss(c), []
        for batch in loader:
            with FlopCounterMode(display=False) as counter:
                losses = crit(model(batch), batch)
                total_loss(losses).backward()
            seen.append(counter.get_total_flops())
        assert len(seen) == ablate.FLOP_BATCHES
        assert flops[name] == pytest.approx(np.mean(seen), rel=1e-9)
    assert flops["clip"] < flops["clip+entmlm"] < flops["xlip"]
    steps = ablate.step_budget(spec, lambda s: None, flops)
    assert steps["xlip"] == 40 and steps["clip"] > steps["clip+entmlm"] > 40
    for name, n in steps.items():
        assert abs(n * flops[name] - 40 * flops["xlip"]) <= flops[name] / 2
    summary = ablate.summarise(spec, steps, flops)
    assert summary["budget"]["flops_per_step"] == flops
    assert summary["budget"]["reference"] == "xlip"


def test_equal_flops_counts_aux_until_as_its_share_of_aux_steps(corpus, tmp_path):
    """A variant with loss.aux_until=0.25 costs a quarter of its own XLIP step and three
    quarters of a CLIP step (on the same batches); the budget follows."""
    cfg = write_cfg(corpus, tmp_path / "c.yaml", steps=40)
    spec = ablate.AblationSpec(
        base=load_config(cfg).to_dict(), out=tmp_path / "abl",
        variants=ablate.variant_overrides(["clip", "xlip", "xlip_early"]),  # aux_until 0.25
        equal="flops", reference="xlip_early")
    flops = ablate.flops_per_step(spec)
    # the CLIP variant's batches carry no masked texts, but the CL-only step's FLOPs do not
    # depend on them
    assert flops["xlip_early"] == pytest.approx(0.25 * flops["xlip"] + 0.75 * flops["clip"],
                                                rel=1e-9)
    steps = ablate.step_budget(spec, lambda s: None, flops)
    assert steps["xlip_early"] == 40 and 40 < steps["clip"] < 40 * flops["xlip"] / flops["clip"]


def test_a_variant_without_overrides_is_the_base_config(corpus, tmp_path):
    """A variant whose override list is empty runs the base config as it is, also when its
    name is a built-in variant's: its FLOPs are the base's, not the built-in list's."""
    cfg = write_cfg(corpus, tmp_path / "c.yaml", steps=40)  # an XLIP config
    spec = ablate.AblationSpec(base=load_config(cfg).to_dict(), out=tmp_path / "abl",
                               variants={"clip": [], "xlip": ablate.VARIANTS["xlip"][0]},
                               equal="flops")
    assert spec.overrides("clip") == [] and spec.overrides("xlip") == ablate.VARIANTS["xlip"][0]
    flops = ablate.flops_per_step(spec)
    assert flops["clip"] == flops["xlip"]  # the base is XLIP; the built-in clip would be less
    assert ablate.step_budget(spec, lambda s: None, flops) == {"clip": 40, "xlip": 40}
    # the reference, not run itself, still takes its built-in overrides
    other = ablate.AblationSpec(base=spec.base, out=tmp_path / "abl2",
                                variants={"clip": ablate.VARIANTS["clip"][0]}, equal="flops")
    assert other.overrides("xlip") == ablate.VARIANTS["xlip"][0]


def test_equal_flops_counts_every_batch_of_an_accumulated_step(corpus, tmp_path):
    """With train.grad_accum=2 a step is two batches: its FLOPs are their sum, so a variant
    that accumulates gets half the steps of one that does not at the same compute."""
    from xlip.data.collate import Collator
    from xlip.data.dataset import MixedDataset
    from xlip.flops import batch_shape, step_flops
    from xlip.text.tokenizer import load_tokenizer
    from xlip.train.distributed import DistInfo
    from xlip.train.loop import build_loader

    cfg = write_cfg(corpus, tmp_path / "c.yaml", steps=40)
    base = load_config(cfg).to_dict()
    variants = {"clip": ablate.variant_overrides(["clip"])["clip"],
                "clip_acc2": ablate.variant_overrides(["clip"])["clip"] + ["train.grad_accum=2"]}
    spec = ablate.AblationSpec(base=base, out=tmp_path / "abl", variants=variants,
                               equal="flops", reference="clip")
    flops = ablate.flops_per_step(spec)
    tok = load_tokenizer(corpus[1])
    c = ablate.variant_config(base, "clip_acc2", variants["clip_acc2"], 0, tmp_path / "x",
                              ablate.FLOP_BATCHES)
    dataset = MixedDataset(c, train=True)
    batches = list(build_loader(c, dataset, Collator(c, tok, train=True,
                                                     findings=dataset.findings()), 0, DistInfo()))
    assert len(batches) == 2 * ablate.FLOP_BATCHES
    per_step = [sum(step_flops(c, batch_shape(b, len(tok))).total for b in batches[i:i + 2])
                for i in range(0, len(batches), 2)]
    assert flops["clip_acc2"] == pytest.approx(np.mean(per_step), rel=1e-9)
    assert flops["clip_acc2"] == pytest.approx(2 * flops["clip"], rel=0.1)
    steps = ablate.step_budget(spec, lambda s: None, flops)
    assert steps["clip"] == 40 and abs(steps["clip_acc2"] - 20) <= 2


def test_equal_flops_refuses_what_it_cannot_count(corpus, tmp_path, capsys):
    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    assert main(["ablate", "--config", str(cfg), "--variants", "clip,xlip_lite", "--equal",
                 "flops", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "xlip_lite" in err and "row_fraction" in err and "--equal time" in err
    assert main(["ablate", "--config", str(cfg), "--variants", "clip", "--equal", "flops",
                 "--budget-s", "60", "--out", str(tmp_path / "b")]) == 2
    assert "--budget-s" in capsys.readouterr().err
    assert not (tmp_path / "a" / "runs").exists() and not (tmp_path / "b" / "runs").exists()


def test_ablation_refuses_unknown_variants_and_contradictions(corpus, tmp_path, capsys):
    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    assert main(["ablate", "--config", str(cfg), "--variants", "clip,bogus", "--out",
                 str(tmp_path / "a")]) == 2
    assert "unknown variant 'bogus'" in capsys.readouterr().err
    # xlip_fast needs MIM: a variant whose overrides contradict it fails before any training
    assert main(["ablate", "--config", str(cfg), "--variants", "xlip,bad", "--define",
                 "bad=train.mode=fast,mim.policy=none,loss.w_mim=0", "--out",
                 str(tmp_path / "a")]) == 2
    assert "variant bad: train.mode=fast" in capsys.readouterr().err
    assert not (tmp_path / "a" / "runs").exists()


def test_visualize_writes_one_figure_per_image(corpus, tmp_path, capsys):
    from xlip.api import XLIP
    from xlip.data.manifest import load_manifest
    from xlip.eval.visualize import compute_views

    cfg = write_cfg(corpus, tmp_path / "c.yaml", steps=2)
    assert main(["pretrain", "--config", str(cfg), "--quiet",
                 f"train.out_dir={tmp_path / 'run'}"]) == 0
    rows = [r for r in load_manifest(corpus[0], verify_images=False)
            if r.split == "test" and r.kind == "paired"][:2]
    assert main(["visualize", "--model", str(tmp_path / "run"), rows[0].image, rows[1].image,
                 "--text", "left pleural effusion", "--out", str(tmp_path / "viz")]) == 0
    pngs = sorted((tmp_path / "viz").glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 10_000 for p in pngs)
    m = XLIP.from_pretrained(tmp_path / "run")
    v = compute_views(m.model, m.tokenizer, m.cfg, rows[0].image, rows[0], "left pleural effusion")
    g = m.cfg.vision.grid
    assert v.scores.shape == v.mask.shape == v.phrase_map.shape == (g, g)
    assert v.mask.sum() == round(g * g * m.cfg.mim.ratio)
    # the guide sums one unit of attention per guiding token; the phrase has four word tokens
    assert v.scores.sum() == pytest.approx(len(v.guide_words), rel=1e-4)
    assert v.phrase_map.sum() == pytest.approx(
        len(m.tokenizer.tokenize("left pleural effusion")), rel=1e-4)
    # visible patches of the reconstruction are the image itself
    p = m.cfg.vision.patch_size
    img = v.image.reshape(g, p, g, p).transpose(0, 2, 1, 3)
    rec = v.reconstruction.reshape(g, p, g, p).transpose(0, 2, 1, 3)
    visible = v.mask == 0
    assert np.allclose(img[visible], rec[visible], atol=1e-5)
    assert main(["visualize", "--model", str(tmp_path / "run"), str(tmp_path / "nope.png"),
                 "--out", str(tmp_path / "viz")]) == 2
    assert "no such image file" in capsys.readouterr().err


def test_lesion_patches_are_the_cells_the_circle_touches():
    from xlip.eval.attmim import lesion_patches

    # 128-px source, 64-px model, patch 8: grid 8. A 6-px lesion centred in cell (2, 3)
    assert lesion_patches((2 * (3 * 8 + 4), 2 * (2 * 8 + 4)), 6, 128, 64, 8) == [2 * 8 + 3]
    # centred on the corner of four cells: all four
    assert lesion_patches((2 * 32, 2 * 32), 4, 128, 64, 8) == [27, 28, 35, 36]
    # a large lesion covers a block
    assert len(lesion_patches((64, 64), 40, 128, 64, 8)) >= 9


def test_variant_sources_follow_the_switches(tmp_path):
    base = load_config(None, [
        "data.sources=[{manifest: m.csv, kind: paired}, {manifest: m.csv, kind: image_only},"
        " {manifest: m.csv, kind: text_only}]", "mlm.text_only=true"]).to_dict()
    kinds = {}
    for name, overrides in ablate.variant_overrides(["clip", "xlip", "xlip-no_prompts",
                                                     "clip+random_mim",
                                                     "clip-no_prompts"]).items():
        cfg = ablate.variant_config(base, name, overrides, 0, tmp_path)
        kinds[name] = [s.kind for s in cfg.data.sources]
    assert kinds == {"clip": ["paired", "image_only"], "clip+random_mim": ["paired", "image_only"],
                     "xlip": ["paired", "image_only", "text_only"],
                     "xlip-no_prompts": ["paired", "text_only"],
                     "clip-no_prompts": ["paired"]}  # plain CLIP: pairs only


def test_ablation_refuses_to_resume_under_another_config(corpus, tmp_path, capsys):
    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    out = tmp_path / "abl"
    args = ["ablate", "--config", str(cfg), "--variants", "clip", "--out", str(out), "--quiet"]
    assert main(args) == 0
    # the same folder with other steps: the finished run is not silently reused
    assert main(args + ["--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "runs/clip/seed0: finished under another config" in err and "new --out" in err


def test_a_diverged_run_is_recorded_and_the_others_go_on(corpus, tmp_path, monkeypatch, capsys):
    from xlip.train import loop

    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    real = loop.pretrain

    def pretrain(cfg, progress=True):
        if cfg.mim.policy == "none":
            raise loop.NonFiniteLossError("step 2: loss is nan; lower train.lr")
        return real(cfg, progress=progress)

    monkeypatch.setattr("xlip.train.loop.pretrain", pretrain)
    out = tmp_path / "abl"
    assert main(["ablate", "--config", str(cfg), "--variants", "clip,xlip", "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "ablation.json").read_text())
    assert list(summary["variants"]) == ["xlip"]
    assert summary["failed"] == [{"variant": "clip", "seed": 0,
                                  "error": "step 2: loss is nan; lower train.lr"}]
    assert "Failed (left out above): clip seed 0" in (out / "ablation.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,a"], "--seeds '0,a': give whole numbers"),
    (["--seeds", ","], "--seeds is empty"),
    (["data.eval_manifest="], "data.eval_manifest"),
])
def test_ablation_flags_fail_with_one_line(corpus, tmp_path, capsys, argv, message):
    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    assert main(["ablate", "--config", str(cfg), "--out", str(tmp_path / "a"), "--variants",
                 "clip"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "a" / "runs").exists()


def test_without_seeds_the_config_seed_runs(corpus, tmp_path):
    # --seeds used to default to 0, so a config's own train.seed was replaced without a word
    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    out = tmp_path / "a"
    assert main(["ablate", "--config", str(cfg), "--variants", "clip", "--out", str(out),
                 "--quiet", "train.seed=2"]) == 0
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["seeds"] == [2]
    assert [s["seed"] for s in summary["variants"]["clip"]["seeds"]] == [2]
    assert [p.name for p in (out / "runs" / "clip").iterdir()] == ["seed2"]


def test_a_variant_cannot_set_what_the_ablation_sets(corpus, tmp_path, capsys):
    # a variant's train.steps used to be replaced by the ablation's steps without a word
    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    assert main(["ablate", "--config", str(cfg), "--variants", "long", "--define",
                 "long=mim.policy=none,mlm.policy=none,loss.w_mim=0,loss.w_mlm=0,train.steps=9",
                 "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "variant long: train.steps is set by the ablation" in err and "--steps" in err
    assert "Traceback" not in err and not (tmp_path / "a" / "runs").exists()
    with pytest.raises(ablate.ConfigError, match="variant s: train.seed is set by the ablation"):
        ablate.variant_config({}, "s", ["train.seed=3"], 0, tmp_path)


def test_defined_variants_run_only_when_listed(corpus, tmp_path, capsys):
    # with --variants, exactly the listed variants run; a definition left out of the list is
    # refused rather than run (it used to be added to the list) or ignored
    assert list(ablate.variant_overrides(["clip"], ["mine=mim.policy=random"],
                                         add_defined=True)) == ["clip", "mine"]
    assert list(ablate.variant_overrides(["mine"], ["mine=mim.policy=random"],
                                         add_defined=False)) == ["mine"]
    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    assert main(["ablate", "--config", str(cfg), "--variants", "clip", "--define",
                 "mine=mim.policy=random", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--define mine: mine is not in --variants" in err and "Traceback" not in err
    assert not (tmp_path / "a" / "runs").exists()


def test_default_list_runs_a_variant_the_config_already_is_once(corpus, tmp_path, monkeypatch,
                                                               capsys):
    """On a config with mim.mask_at=tokens and a 64-wide MAE decoder (the demo's), xlip_tokens
    and xlip_lean are xlip: the default list leaves them out, saying so; named in --variants
    they run."""
    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    base = load_config(cfg, ["mim.mask_at=tokens", "model.mae_decoder_width=64"]).to_dict()
    kept, same = ablate.distinct_variants(base, ablate.variant_overrides(
        ablate.DEFAULT_VARIANTS))
    assert same == {"xlip_tokens": "xlip", "xlip_lean": "xlip"}
    assert list(kept) == [v for v in ablate.DEFAULT_VARIANTS if v not in same]
    kept, same = ablate.distinct_variants(load_config(cfg).to_dict(), ablate.variant_overrides(
        ablate.DEFAULT_VARIANTS))  # the config masks the image: all differ
    assert same == {} and list(kept) == ablate.DEFAULT_VARIANTS
    ran = []

    def fake_run(spec, progress=True):
        ran.append(list(spec.variants))
        (spec.out / "ablation.md").write_text("")
        return {"variants": spec.variants}

    monkeypatch.setattr(ablate, "run_ablation", fake_run)
    assert main(["ablate", "--config", str(cfg), "--out", str(tmp_path / "a"), "--quiet",
                 "mim.mask_at=tokens", "model.mae_decoder_width=64"]) == 0
    assert "xlip_lean: the same config as xlip here, not run" in capsys.readouterr().err
    assert "xlip_lean" not in ran[0] and "xlip" in ran[0]


def test_ablation_refuses_torchrun(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    assert main(["ablate", "--config", str(cfg), "--out", str(tmp_path / "a")]) == 2
    assert "without torchrun" in capsys.readouterr().err


def test_define_keeps_commas_inside_a_value():
    got = ablate.variant_overrides(["two"], [
        "two=mim.policy=random, data.sources=[{manifest: a.csv, kind: paired}], train.lr=1e-3"])
    assert got["two"] == ["mim.policy=random",
                          "data.sources=[{manifest: a.csv, kind: paired}]", "train.lr=1e-3"]


def test_table_shows_the_step_range_when_seeds_got_different_budgets():
    def seed(s, steps):
        return {"seed": s, "mean_auc": 0.8, "ci95": [0.79, 0.81], "steps": steps,
                "s_per_step": 1.0, "wall_s": 60.0}

    row = {"mean_auc": 0.8, "sd": 0.0, "per_finding": {"Nodule": 0.7}, "s_per_step": 1.0,
           "lesion_mask_share": None, "wall_s": 60.0, "overrides": [], "description": "",
           "steps": 714, "seeds": [seed(0, 737), seed(1, 714)]}
    summary = {"variants": {"clip": row}, "failed": [], "seeds": [0, 1],
               "budget": {"equal": "time", "steps": {"clip": 737}, "reference": "xlip"}}
    assert "| clip | 714–737 |" in ablate.markdown(summary)
    row["seeds"] = [seed(0, 560), seed(1, 560)]
    assert "| clip | 560 |" in ablate.markdown(summary)


def test_clip_variant_of_a_config_that_tunes_mim_and_mlm(tmp_path):
    # the base config's MIM/MLM options would be refused as unused under mim/mlm.policy=none;
    # the CLIP variant (and bench's CLIP row) switch the tasks off, options included
    from xlip.bench import BenchOptions, preset_config

    base = load_config(None, ["data.sources=[{manifest: m.csv, kind: paired}]",
                              "mim.mask_at=tokens", "mlm.prompts=true"]).to_dict()
    clip = ablate.variant_config(base, "clip", ablate.variant_overrides(["clip"])["clip"], 0,
                                 tmp_path)
    assert (clip.mim.policy, clip.mim.mask_at, clip.mlm.prompts) == ("none", "image", False)
    xlip = ablate.variant_config(base, "xlip", ablate.variant_overrides(["xlip"])["xlip"], 0,
                                 tmp_path)
    assert (xlip.mim.mask_at, xlip.mlm.prompts) == ("tokens", True)
    row = preset_config("tiny", BenchOptions(base=base), ablate.CLIP)
    assert (row.mim.policy, row.mim.mask_at) == ("none", "image")


def test_a_run_in_use_by_another_process_is_left_alone(corpus, tmp_path, capsys):
    """Two invocations on one --out (lanes side by side, one seed each) must not both take a
    run: the second used to delete the first one's run folder under it and train it again."""
    from xlip.files import exclusive

    cfg = write_cfg(corpus, tmp_path / "c.yaml")
    out = tmp_path / "a"
    run = out / "runs" / "clip" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10}\n')  # the other process's run so far
    with exclusive(out / ".locks" / "clip.seed0.lock", str(run), "wait"):
        assert main(["ablate", "--config", str(cfg), "--out", str(out), "--variants", "clip",
                     "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{run}: in use by another xlip process (pid {os.getpid()})" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (run / "metrics.jsonl").read_text() == '{"step": 10}\n'
    # a training of its own into a run folder in use: refused before a file is touched
    with exclusive(run / ".lock", "x", "wait"):
        assert main(["pretrain", "--config", str(cfg), "--quiet",
                     f"train.out_dir={run}"]) == 2
    assert "in use by another xlip process" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [".lock", "metrics.jsonl"]
    # once the holder is gone the ablation runs
    assert main(["ablate", "--config", str(cfg), "--out", str(out), "--variants", "clip",
                 "--quiet"]) == 0
    assert (run / "result.json").is_file()

"""`xlip eval finetune`: the result's keys and determinism, early stopping that restores the
best-validation weights, a test split read once after training, the init that matters, and
one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from xlip.api import XLIP
from xlip.cli import main
from xlip.eval import finetune as ft
from xlip.eval.finetune import FinetuneOptions, finetune, schedule_config
from xlip.eval.probe import ProbeOptions, split_rows
from xlip.errors import InputError
from xlip.optim import NonFiniteLossError, adamw, lr_lambda, param_groups


def test_finetune_command_writes_its_protocol_and_is_deterministic(eval_corpus, eval_run, tmp_path):
    manifest, _ = eval_corpus
    args = ["eval", "finetune", "--model", str(eval_run), "--steps", "6", "--eval-every", "3",
            "--batch-size", "16", "--lr", "1e-3", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    res = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert res["protocol"] == "finetune" and res["init"] == "pretrained"
    assert res["fraction"] == 1.0 and 0.0 <= res["mean_auc"] <= 1.0
    lo, hi = res["mean_auc_ci95"]
    assert lo <= res["mean_auc"] <= hi
    for d in res["per_finding"].values():
        assert d["auc_ci95"][0] <= d["auc"] <= d["auc_ci95"][1] and d["positives"] > 0
    assert (res["steps"], res["lr"], res["batch_size"], res["eval_every"], res["patience"]) \
        == (6, 1e-3, 16, 3, 4)
    # the probe's rows: same training, validation and test images
    train, val, test, how = split_rows(ProbeOptions(manifest))
    assert (res["n_train"], res["n_val"], res["n_test"]) == (len(train), len(val), len(test))
    assert res["validation"] == how
    # validation after steps 3 and 6; the lr logged is warm-up + cosine of xlip.optim
    curve = res["validation_curve"]
    assert [c["step"] for c in curve] == [3, 6] and res["steps_done"] == 6
    assert res["best_step"] in (3, 6)
    assert res["best_val_mean_auc"] == max(c["val_mean_auc"] for c in curve)
    m = XLIP.from_pretrained(eval_run)
    sched = lr_lambda(schedule_config(m.cfg, FinetuneOptions(manifest, steps=6, lr=1e-3)))
    assert [c["lr"] for c in curve] == pytest.approx([1e-3 * sched(3), 1e-3 * sched(6)])
    assert (tmp_path / "a" / "finetune.md").read_text().startswith(
        "# Fine-tuning (pretrained encoder, 1 of the training labels)")
    # the best image encoder and head: every encoder weight, one output per learnt finding
    w = load_file(str(tmp_path / "a" / "finetune.safetensors"))
    vision = {k for k in w if k.startswith("vision.")}
    assert vision == {f"vision.{k}" for k in m.model.vision.state_dict()}
    assert w["head.weight"].shape == (len(res["head_findings"]), m.model.vision.width)
    # the same command again: the same numbers and weights
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "finetune.json").read_text())
    assert again["validation_curve"] == curve and again["per_finding"] == res["per_finding"]
    assert ((tmp_path / "a" / "finetune.safetensors").read_bytes()
            == (tmp_path / "b" / "finetune.safetensors").read_bytes())


def test_early_stopping_restores_the_best_validation_weights(eval_corpus, eval_run, tmp_path,
                                                             monkeypatch):
    """A contrived validation curve: best at the 2nd measurement, then 3 without improvement
    (patience 3): training stops at the 5th, and the weights tested and saved are those of the
    2nd."""
    manifest, _ = eval_corpus
    curve, seen = [0.6, 0.8, 0.7, 0.75, 0.65, 0.9, 0.9], []

    def contrived(net, paths, y, cfg):
        seen.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return curve[len(seen) - 1]

    tested = []

    def scores(net, paths, cfg):  # only the test images are scored: validation is contrived
        tested.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return np.zeros((len(paths), len(net.head.bias)))

    monkeypatch.setattr(ft, "validation_auc", contrived)
    monkeypatch.setattr(ft, "scores", scores)
    m = XLIP.from_pretrained(eval_run)
    opt = FinetuneOptions(manifest, steps=40, eval_every=2, patience=3, batch_size=8, lr=1e-3)
    res = finetune(m.model, m.cfg, opt, tmp_path / "w.safetensors", bootstrap=0)
    assert [c["step"] for c in res["validation_curve"]] == [2, 4, 6, 8, 10]
    assert res["steps_done"] == 10 and res["stopped_early"] is True
    assert res["best_step"] == 4 and res["best_val_mean_auc"] == 0.8
    saved = load_file(str(tmp_path / "w.safetensors"))
    assert len(tested) == 1
    for k, v in seen[1].items():
        assert torch.equal(tested[0][k], v) and torch.equal(saved[k], v)
    assert any(not torch.equal(seen[1][k], seen[4][k]) for k in seen[1])  # it did move on


def test_the_test_split_is_read_once_after_training(eval_corpus, eval_run, monkeypatch):
    """Validation images are decoded once, before training, and scored at each check; the test
    images are read once, after the last training batch."""
    manifest, _ = eval_corpus
    _, val, test, _ = split_rows(ProbeOptions(manifest))
    val_paths, test_paths = [r.image for r in val], [r.image for r in test]
    events, trained_on = [], set()
    encode, prepare, decode = ft.pooled_features, ft.prepare_image, ft.decode_images

    def pooled(model, images, cfg, batch_size=128, progress=""):
        events.append(("scored", images if isinstance(images, torch.Tensor) else list(images)))
        return encode(model, images, cfg, batch_size)

    def decode_images(paths, cfg, *args):
        events.append(("decoded", list(paths)))
        return decode(paths, cfg, *args)

    def prepare_image(path, *args, **kwargs):  # the training batches
        trained_on.add(path)
        events.append("train")
        return prepare(path, *args, **kwargs)

    monkeypatch.setattr(ft, "pooled_features", pooled)
    monkeypatch.setattr(ft, "decode_images", decode_images)
    monkeypatch.setattr(ft, "prepare_image", prepare_image)
    m = XLIP.from_pretrained(eval_run)
    finetune(m.model, m.cfg, FinetuneOptions(manifest, steps=4, eval_every=2, batch_size=8),
             bootstrap=0)
    reads = [e for e in events if e != "train"]
    assert reads[0] == ("decoded", val_paths) and events.index(reads[0]) == 0
    cached = reads[1][1]  # after steps 2 and 4 the same decoded tensor, then the test
    assert isinstance(cached, torch.Tensor) and len(cached) == len(val_paths)
    assert reads[1:] == [("scored", cached), ("scored", cached), ("scored", test_paths)]
    assert events.index(("scored", test_paths)) > max(i for i, e in enumerate(events)
                                                      if e == "train")
    assert not trained_on & (set(test_paths) | set(val_paths))


def test_a_pretrained_encoder_beats_random_init_at_equal_steps(eval_corpus, eval_run, tmp_path):
    """At a test-sized budget a tiny XLIP pre-training does not reliably help (200 steps of
    the tiny model on 600 images, three seeds: test AUC 0.003-0.014 above random init, within
    the noise), so the encoder "pre-trained" here is one that already knows the findings:
    fine-tuned for 150 steps first. From it, 20 steps beat 20 steps from the same architecture
    untrained (--init random); measured margin 0.07-0.18 over three corpora x two seeds."""
    manifest, _ = eval_corpus
    m = XLIP.from_pretrained(eval_run)
    first = FinetuneOptions(manifest, steps=150, lr=3e-3, eval_every=50, patience=3)
    finetune(m.model, m.cfg, first, tmp_path / "first.safetensors", bootstrap=0)
    w = load_file(str(tmp_path / "first.safetensors"))
    m.model.vision.load_state_dict({k[len("vision."):]: v for k, v in w.items()
                                    if k.startswith("vision.")})
    same = dict(steps=20, lr=1e-3, eval_every=10, patience=2)
    pre = finetune(m.model, m.cfg, FinetuneOptions(manifest, **same), bootstrap=0)
    rnd = finetune(m.untrained(0).model, m.cfg,
                   FinetuneOptions(manifest, init="random", **same), bootstrap=0)
    assert pre["mean_auc"] >= rnd["mean_auc"] + 0.05, (pre["mean_auc"], rnd["mean_auc"])


def test_a_non_finite_loss_stops_fine_tuning_with_the_fix(eval_corpus, eval_run, monkeypatch):
    manifest, _ = eval_corpus
    monkeypatch.setattr(ft.Classifier, "forward",
                        lambda self, images: torch.full((len(images), len(self.head.bias)),
                                                        float("nan")))
    m = XLIP.from_pretrained(eval_run)
    with pytest.raises(NonFiniteLossError, match=r"fine-tuning diverged: non-finite loss at "
                                                 r"step 1: .*Lower --lr \(it was 0.0003\)"):
        finetune(m.model, m.cfg, FinetuneOptions(manifest, steps=3), bootstrap=0)


def test_the_new_head_learns_at_a_multiple_of_the_lr_and_pretraining_is_unchanged(eval_run):
    m = XLIP.from_pretrained(eval_run)
    cfg = schedule_config(m.cfg, FinetuneOptions("unused.csv", steps=10, lr=1e-3))
    net = ft.Classifier(m.model.vision, 3)
    opt, sched = adamw(net, cfg, {"head": 10.0})
    head = {id(p) for p in net.head.parameters()}
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [
        (1e-3 * sched.lr_lambdas[0](0), 0.05, len(param_groups(net.vision, 0.05)[0]["params"])),
        (1e-3 * sched.lr_lambdas[0](0), 0.0, len(param_groups(net.vision, 0.05)[1]["params"])),
        (1e-2 * sched.lr_lambdas[0](0), 0.05, 1), (1e-2 * sched.lr_lambdas[0](0), 0.0, 1)]
    assert {id(p) for g in opt.param_groups[2:] for p in g["params"]} == head
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())  # each once
    # without lr_scale (pre-training): exactly param_groups' two groups, at train.lr
    plain, _ = adamw(m.model, m.cfg)
    assert [[id(p) for p in g["params"]] for g in plain.param_groups] == [
        [id(p) for p in g["params"]] for g in param_groups(m.model, m.cfg.train.weight_decay)]


def test_options_refuse_bad_values(eval_corpus):
    manifest, _ = eval_corpus
    for kw, msg in ((dict(steps=0), "--steps 0: give at least 1 optimisation step"),
                    (dict(patience=0), "--patience 0: give at least 1 validation measurement"),
                    (dict(eval_every=0), "--eval-every 0: give at least 1"),
                    (dict(batch_size=0), "--batch-size 0: give at least 1"),
                    (dict(lr=0.0), "--lr 0.0: give a positive learning rate"),
                    (dict(lr=float("nan")), "--lr nan"),
                    (dict(head_lr_scale=0.0), "--head-lr-scale 0.0: give a positive"),
                    (dict(fraction=1.5), "--fraction 1.5")):
        with pytest.raises(InputError, match=msg):
            FinetuneOptions(manifest, **kw)


def test_user_faults_are_one_line_errors(eval_run, tmp_path, capsys):
    def error(*argv: str, model=eval_run) -> str:
        assert main(["eval", "finetune", "--model", str(model), *argv, "--quiet", "--out",
                     str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        return err

    assert "--patience 0: give at least 1" in error("--patience", "0")
    assert "--steps 0: give at least 1 optimisation step" in error("--steps", "0")
    msg = error("--fraction", "0.0001")  # the split selection's message (xlip.data.splits)
    assert "--fraction 0.0001" in msg and "rounds to 0 patients" in msg
    assert "use a larger fraction" in msg
    msg = error("--findings", "Cardiomegaly", "Hernia")
    assert "--findings 'Hernia': none of the" in msg and "training" in msg
    assert "Cardiomegaly" in msg  # what can be asked for instead
    broken = tmp_path / "broken"
    shutil.copytree(eval_run, broken, ignore=shutil.ignore_patterns("checkpoints"))
    (broken / "model.safetensors").write_bytes(b"not weights")
    assert "not a readable safetensors file" in error(model=broken)
    (broken / "model.safetensors").unlink()
    assert "is not an xlip model folder: model.safetensors missing" in error(model=broken)
    assert not (tmp_path / "out" / "finetune.json").exists()

"""The training loop: resume equality, metrics, non-finite abort, CLI runs of every policy."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CLIP, build_corpus, tiny_config
from xlip.cli import main
from xlip.config import load_config, save_config
from xlip.data.manifest import load_manifest
from xlip.train.loop import DivergenceGuard, NonFiniteLossError, lr_lambda, pretrain


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"), 64, 16, seed=5, size=32,
                        vocab_size=400)


def run_cfg(corpus, out, **train):
    manifest, tok = corpus
    return tiny_config(
        data={"sources": [{"manifest": str(manifest), "kind": "paired", "weight": 0.75},
                          {"manifest": str(manifest), "kind": "image_only", "weight": 0.25}],
              "batch_size": 8, "num_workers": 0, "eval_manifest": str(manifest)},
        text={"tokenizer": str(tok), "max_length": 96},
        train={"out_dir": str(out), "steps": 4, "warmup_steps": 1, "log_every": 1,
               "ckpt_every": 2, **train})


def test_resume_continues_at_the_right_step_with_the_same_state(corpus, tmp_path):
    full = pretrain(run_cfg(corpus, tmp_path / "full"), progress=False)
    # a second run that "crashed" after step 2: only the step-2 checkpoint survives
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000002", part / "checkpoints" / "step_0000002")
    (part / "checkpoints" / "latest").write_text("step_0000002\n")
    pretrain(run_cfg(corpus, part), resume="latest", progress=False)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(full / "checkpoints" / "step_0000004" / "state.pt", weights_only=True)
    sb = torch.load(part / "checkpoints" / "step_0000004" / "state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 4
    for ka, kb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ka["exp_avg"], kb["exp_avg"]) and torch.equal(ka["exp_avg_sq"], kb["exp_avg_sq"])
    assert sa["scheduler"] == sb["scheduler"]
    steps = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]


def test_optimizer_takes_the_configured_betas_and_eps(corpus, tmp_path):
    out = pretrain(run_cfg(corpus, tmp_path / "run", steps=2, ckpt_every=2, adam_eps=1e-6,
                           betas=(0.8, 0.9)), progress=False)
    state = torch.load(out / "checkpoints" / "step_0000002" / "state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert groups and all(g["eps"] == 1e-6 and tuple(g["betas"]) == (0.8, 0.9) for g in groups)


def test_metrics_log_every_term_and_source(corpus, tmp_path):
    cfg = run_cfg(corpus, tmp_path / "run", steps=2)
    cfg.model.init_temperature = 0.005  # logit scale 200 at init: clamped after the first step
    out = pretrain(cfg, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set(rows[-1])
    for term in ("cl_loss", "mim_loss", "mlm_loss", "cl_loss/paired", "cl_loss/image_only",
                 "mim_loss/paired", "mim_loss/image_only", "mlm_loss/paired", "lr",
                 "samples_per_s", "grad_norm", "logit_scale"):
        assert term in keys, term
    assert "mlm_loss/image_only" not in keys  # prompts stay out of MLM by default
    assert all(r["logit_scale"] <= 100.0 + 1e-3 for r in rows)
    for name in ("config.yaml", "model.safetensors", "text_config.json", "tokenizer",
                 "checkpoints/latest"):
        assert (out / name).exists()


def test_aux_until_runs_mim_and_mlm_on_the_first_steps_only(corpus, tmp_path):
    """loss.aux_until=0.5 of 4 steps: steps 1-2 log MIM and MLM, steps 3-4 CL only; the
    decoders stop changing at the cutoff (no gradient, so AdamW leaves them), the encoders do
    not; a resume from step 2 continues exactly."""
    def cfg(out):
        c = run_cfg(corpus, out)
        c.loss.aux_until = 0.5
        return c

    out = pretrain(cfg(tmp_path / "run"), progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [("mim_loss" in r, "mlm_loss" in r, "cl_loss" in r) for r in rows] == \
        [(True, True, True)] * 2 + [(False, False, True)] * 2
    ck = {n: load_file(str(out / "checkpoints" / f"step_000000{n}" / "model.safetensors"))
          for n in (2, 4)}
    decoders = [k for k in ck[2] if k.startswith(("mae_decoder.", "mm_decoder."))]
    assert decoders and all(torch.equal(ck[2][k], ck[4][k]) for k in decoders)
    assert not torch.equal(ck[2]["image_proj.weight"], ck[4]["image_proj.weight"])
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step_0000002", part / "checkpoints" / "step_0000002")
    (part / "checkpoints" / "latest").write_text("step_0000002\n")
    pretrain(cfg(part), resume="latest", progress=False)
    b = load_file(str(part / "model.safetensors"))
    assert all(torch.equal(ck[4][k], b[k]) for k in b)


def test_non_finite_loss_aborts_with_a_clear_message(corpus, tmp_path, monkeypatch):
    from xlip import losses

    orig = losses.MIMLoss.forward

    def broken(self, *args):
        loss, per = orig(self, *args)
        return loss * float("nan"), per

    monkeypatch.setattr(losses.MIMLoss, "forward", broken)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1: \{'mim_loss'"):
        pretrain(run_cfg(corpus, tmp_path / "nan"), progress=False)


@pytest.mark.parametrize("mim,mlm", [("attention", "entity"), ("random", "random"),
                                     ("none", "entity"), ("random", "none"), ("none", "none")])
def test_cli_pretrain_and_zeroshot_for_each_policy(corpus, tmp_path, mim, mlm, capsys):
    cfg = run_cfg(corpus, tmp_path / "run", steps=2)
    save_config(cfg, tmp_path / "c.yaml")
    extra = [f"mim.policy={mim}", f"mlm.policy={mlm}"]
    extra += ["loss.w_mim=0"] if mim == "none" else []
    extra += ["loss.w_mlm=0"] if mlm == "none" else []
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--quiet", *extra]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ("mim_loss" in rows[-1]) == (mim != "none")
    assert ("mlm_loss" in rows[-1]) == (mlm != "none")
    assert main(["eval", "zeroshot", "--model", str(tmp_path / "run"), "--split", "test"]) == 0
    result = json.loads((tmp_path / "run" / "zeroshot.json").read_text())
    assert 0.0 <= result["mean_auc"] <= 1.0 and result["per_finding"]


def test_cli_refuses_bad_input(corpus, tmp_path, capsys):
    cfg = run_cfg(corpus, tmp_path / "run")
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "mim.policy=magic"]) == 2
    assert "mim.policy: unknown value 'magic'" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"),
                 f"text.tokenizer={tmp_path / 'missing_tok'}"]) == 2
    assert "tokenizer directory" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "train.steps="]) == 2
    assert "empty value" in capsys.readouterr().err


def test_dataset_normalisation_is_measured_saved_and_used_in_eval(corpus, tmp_path):
    from xlip.api import XLIP
    from xlip.data.images import prepare_image

    cfg = run_cfg(corpus, tmp_path / "run", steps=2)
    cfg.data.normalize = "dataset"
    out = pretrain(cfg, progress=False)
    m = XLIP.from_pretrained(out)
    mean, std = m.cfg.data.pixel_mean, m.cfg.data.pixel_std
    assert 0 < mean < 1 and 0 < std < 1
    image = next(r.image for r in load_manifest(corpus[0], verify_images=False) if r.image)
    from_path = m.encode_image([image])
    same = m.encode_image(prepare_image(image, 32, stats=(mean, std))[None])
    per_image = m.encode_image(prepare_image(image, 32)[None])
    assert torch.allclose(from_path, same, atol=1e-5)
    assert (from_path - per_image).abs().max() > 1e-3
    # a path and a tensor are encoded at the same precision (bf16 here), as in training
    m.cfg.train.precision = "bf16"
    tensor = prepare_image(image, 32, stats=(mean, std))[None]
    assert torch.allclose(m.encode_image([image]), m.encode_image(tensor), atol=1e-6)
    assert not torch.allclose(m.encode_image(tensor), same, atol=1e-6)  # bf16 is not fp32


def test_a_diverged_run_stops_and_writes_no_model(corpus, tmp_path, capsys):
    cfg = run_cfg(corpus, tmp_path / "run", steps=6, ckpt_every=2, lr=50.0, warmup_steps=0)
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training diverged" in err[0] and "train.lr" in err[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    for ck in (tmp_path / "run" / "checkpoints").glob("step_*"):  # only good ones were kept
        w = load_file(str(ck / "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in w.values())


def test_a_non_finite_gradient_stops_before_the_step(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(np.inf))
    with pytest.raises(NonFiniteLossError, match=r"the gradient norm is inf at step 1; no "
                                                 r"model.safetensors was written"):
        pretrain(run_cfg(corpus, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_divergence_guard_compares_with_the_lowest_logged_loss(tmp_path):
    guard = DivergenceGuard(10.0)
    for step, (cl, mim) in enumerate([(4.0, 1.5), (3.0, 0.9), (2.0, 0.6), (3.5, 5.0)], 1):
        guard.check({"step": step, "cl_loss": cl, "mim_loss": mim, "cl_loss/paired": 99.0},
                    tmp_path)  # per-source terms are not summed twice
    with pytest.raises(NonFiniteLossError, match=r"loss rose to 27 at step 5, over "
                                                 r"train.diverge_factor=10 times .* 2.6"):
        guard.check({"step": 5, "cl_loss": 3.0, "mim_loss": 24.0}, tmp_path)
    DivergenceGuard(0.0).check({"step": 1, "cl_loss": 1e30}, tmp_path)  # 0: off
    near_zero = DivergenceGuard(10.0, best=1e-4)  # compared with the floor 0.01, not 1e-4
    near_zero.check({"step": 6, "mlm_loss": 0.05}, tmp_path)
    with pytest.raises(NonFiniteLossError):
        near_zero.check({"step": 7, "mlm_loss": 0.2}, tmp_path)


def resumable(corpus, tmp_path):
    """A 4-step run with checkpoints at 2 and 4, its config file, and the step-2 folder."""
    cfg = run_cfg(corpus, tmp_path / "run", steps=4, ckpt_every=2)
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    return tmp_path / "run" / "checkpoints" / "step_0000002"


def test_resume_refuses_changed_settings_and_applies_them_on_request(corpus, tmp_path, capsys):
    ck = resumable(corpus, tmp_path)
    run = tmp_path / "run"
    assert main(["pretrain", "--resume", str(ck), "--quiet", "train.lr=5e-2",
                 "mim.ratio=0.9"]) == 2
    err = capsys.readouterr().err
    assert "mim.ratio: 0.5 → 0.9, train.lr: 0.0005 → 0.05" in err and "--resume-override" in err
    assert main(["pretrain", "--resume", str(ck), "--quiet", "vision.width=64",
                 "--resume-override"]) == 2
    assert "vision.width: 32 → 64" in capsys.readouterr().err
    # the MAE decoder predicts other things (another output size), or is dropped: refused
    for change, shown in (("mim.target=features", "mim.target: 'pixels' → 'features'"),
                          ("mim.policy=none", "mim.policy: 'attention' → 'none'")):
        extra = ["loss.w_mim=0"] if change == "mim.policy=none" else []
        assert main(["pretrain", "--resume", str(ck), "--quiet", change, *extra,
                     "--resume-override"]) == 2
        err = capsys.readouterr().err
        assert shown in err and "these change its parameters" in err, err
    # with --resume-override the new lr truly applies: the schedule restarts from it at step 2
    assert main(["pretrain", "--resume", str(ck), "--quiet", "--resume-override",
                 "train.lr=5e-2"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # steps 3, 4 of the first run redone
    cfg = load_config(run / "config.yaml")
    assert cfg.train.lr == 5e-2
    assert rows[2]["lr"] == pytest.approx(5e-2 * lr_lambda(cfg)(3))
    assert rows[1]["lr"] == pytest.approx(5e-4 * lr_lambda(cfg)(2))


def test_resume_ignores_the_sizes_of_a_decoder_the_model_lacks():
    """A CLIP checkpoint resumes under a config with another MAE / multimodal decoder size
    (the model has neither decoder); an XLIP checkpoint, which has them, is refused."""
    from xlip.config import ConfigError, from_dict
    from xlip.train.resume import check_resume

    for sections in (CLIP, {}):
        old, new = (from_dict({**sections, "model": {"mae_decoder_width": w,
                                                     "mm_decoder_depth": d}})
                    for w, d in ((128, 1), (64, 2)))
        if sections:
            assert check_resume(old, new, "CK", override=False) == []
        else:
            with pytest.raises(ConfigError, match="model.mae_decoder_width: 128 → 64.*"
                                                  "these change its parameters"):
                check_resume(old, new, "CK", override=False)


def test_resume_takes_safe_changes(corpus, tmp_path):
    ck = resumable(corpus, tmp_path)
    # the divergence guard's lowest loss travels with the checkpoint
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lowest = min(sum(v for k, v in r.items() if k.endswith("_loss") and "/" not in k)
                 for r in rows[:2])
    state = torch.load(ck / "state.pt", weights_only=True)
    assert state["guard_best"] == pytest.approx(lowest)
    # nor do the weights or the batches depend on gradient checkpointing or TF32
    assert main(["pretrain", "--resume", str(ck), "--quiet", "train.steps=5",
                 "train.log_every=1", "vision.grad_checkpointing=true",
                 "text.grad_checkpointing=true", "train.tf32=false"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_eval_takes_a_checkpoint_folder_and_suggests_finding_names(corpus, tmp_path, capsys):
    ck = resumable(corpus, tmp_path)
    assert main(["eval", "zeroshot", "--model", str(ck)]) == 0
    assert json.loads((ck / "zeroshot.json").read_text())["mean_auc"] > 0
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--model", str(ck), "--findings", "Pleural Efusion"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'Pleural Efusion' (did you mean Pleural Effusion?)" in err[0]
    assert main(["eval", "zeroshot", "--model", str(tmp_path / "nothing")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    taken = tmp_path / "taken.txt"
    taken.write_text("")
    assert main(["eval", "zeroshot", "--model", str(ck), "--out", str(taken)]) == 2
    assert "is an existing file" in capsys.readouterr().err  # before encoding, not after


class Payload:
    """A pickled object that would run code on load (here only a print)."""

    def __reduce__(self):
        return (print, ("this ran at load time",))


def test_damaged_or_pickled_checkpoint_files_are_one_line_naming_the_file(corpus, tmp_path,
                                                                           capsys):
    ck = resumable(corpus, tmp_path)
    run = tmp_path / "run"
    assert oct((run / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~umask())
    assert oct((ck / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~umask())
    # a blocked pickle: the file is named, torch's "weights_only=False" hint is not repeated
    state = torch.load(ck / "state.pt", weights_only=True)
    torch.save({**state, "extra": Payload()}, ck / "state.pt")
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(ck), "--quiet"]) == 2
    out = capsys.readouterr()
    assert "this ran" not in out.out + out.err
    err = out.err.strip().splitlines()
    assert len(err) == 1 and str(ck / "state.pt") in err[0] and "pickled" in err[0]
    assert "weights_only" not in err[0]
    # a truncated state.pt
    (ck / "state.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    assert main(["pretrain", "--resume", str(ck), "--quiet"]) == 2
    assert f"{ck / 'state.pt'}: not a readable training state" in capsys.readouterr().err
    # a corrupt model.safetensors: evaluation names the file
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["eval", "zeroshot", "--model", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run / 'model.safetensors'}: not a readable safetensors" in err[0]


def umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask

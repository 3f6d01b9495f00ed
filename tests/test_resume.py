"""Crash-safe checkpoints and exact resume; metric tracking (``train.report_to``).

- A resumed run logs the same losses as an uninterrupted one: text dropout draws from the torch
  RNG, so without the saved generators the losses after the resume differ (checked too).
- A process SIGKILLed while writing a checkpoint leaves ``latest`` naming the previous, complete
  one; ``--resume latest`` then finishes the run as if nothing happened and removes the leftover.
- ``latest`` names a complete folder after a crash at any point of the write.
- Two ``torchrun`` processes (gloo, CPU): each rank's generators are saved and restored.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import ROOT, build_corpus, tiny_config, torchrun_pretrain
from xlip.cli import main
from xlip.config import ConfigError, save_config
from xlip.errors import MissingFileError
from xlip.train import checkpoint as ck_mod
from xlip.train import tracking
from xlip.train.checkpoint import (load_state, point_latest_at, resolve_checkpoint,
                                   save_checkpoint)
from xlip.train.loop import pretrain


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"), 64, 16, seed=5, size=32,
                        vocab_size=400)


def run_cfg(corpus, out, workers=0, **train):
    manifest, tok = corpus
    return tiny_config(
        data={"sources": [{"manifest": str(manifest), "kind": "paired", "weight": 0.75},
                          {"manifest": str(manifest), "kind": "image_only", "weight": 0.25}],
              "batch_size": 8, "num_workers": workers},
        text={"tokenizer": str(tok), "max_length": 96, "dropout": 0.1},
        train={"out_dir": str(out), "steps": 4, "warmup_steps": 1, "log_every": 1,
               "ckpt_every": 2, **train})


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def losses(row):
    return {k: v for k, v in row.items() if "loss" in k or k in ("grad_norm", "lr")}


def crashed_copy(full, part, step):
    """``part``: a run folder as a crash after ``step`` leaves it (checkpoint and metrics)."""
    name = f"step_{step:07d}"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / name, part / "checkpoints" / name)
    (part / "checkpoints" / "latest").write_text(name + "\n")
    (part / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text())  # rows > step too


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_logs_the_losses_of_an_uninterrupted_run(corpus, tmp_path, monkeypatch, workers):
    """With loader workers too: every sample's augmentation and masks come from a seed the
    sampler draws for it, not from a worker's generators."""
    full = pretrain(run_cfg(corpus, tmp_path / "full", workers), progress=False)
    part = tmp_path / "part"
    crashed_copy(full, part, 2)
    pretrain(run_cfg(corpus, part, workers), resume="latest", progress=False)
    a, b = rows(full), rows(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # rows 3, 4 of the crashed run were redone
    for ra, rb in zip(a, b):
        assert losses(rb) == pytest.approx(losses(ra), rel=1e-6, abs=1e-7), ra["step"]
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the comparison can fail: the same resume without the saved generators (dropout draws
    # from the torch RNG) logs other losses
    monkeypatch.setattr("xlip.train.loop.restore_rng", lambda *a: None)
    other = tmp_path / "other"
    crashed_copy(full, other, 2)
    pretrain(run_cfg(corpus, other, workers), resume="latest", progress=False)
    assert rows(other)[2]["mlm_loss"] != pytest.approx(a[2]["mlm_loss"], rel=1e-6)


def test_the_state_holds_every_generator_and_loads_weights_only(corpus, tmp_path):
    out = pretrain(run_cfg(corpus, tmp_path / "run", steps=2), progress=False)
    state = torch.load(out / "checkpoints" / "step_0000002" / "state.pt", weights_only=True)
    assert state["world_size"] == 1 and len(state["rng"]) == 1
    assert {"torch", "python", "numpy"} <= state["rng"][0].keys()
    assert {"optimizer", "scheduler", "guard_best", "step"} <= state.keys()


CHILD = """
import os, sys, time
import torch

real_save = torch.save


def slow_save(obj, f, *args, **kwargs):  # the step-4 state: half written, then a long pause
    if isinstance(obj, dict) and obj.get("step") == 4:
        with open(f, "wb") as fh:
            fh.write(b"PK\\x03\\x04 half of a zip")
            fh.flush()
        open(os.environ["XLIP_TEST_MARK"], "w").write("writing")
        time.sleep(300)
    return real_save(obj, f, *args, **kwargs)


torch.save = slow_save
from xlip.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(corpus, tmp_path, capsys):
    full = pretrain(run_cfg(corpus, tmp_path / "full"), progress=False)
    run = tmp_path / "run"
    save_config(run_cfg(corpus, run), tmp_path / "c.yaml")
    (tmp_path / "child.py").write_text(CHILD)
    mark = tmp_path / "mark"
    env = dict(os.environ, XLIP_TEST_MARK=str(mark), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), "pretrain",
                              "--config", str(tmp_path / "c.yaml"), "--quiet"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not mark.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mark.exists(), child.stderr.read().decode()[-2000:] if child.poll() is not None else ""
    os.kill(child.pid, signal.SIGKILL)  # in the middle of writing the step-4 checkpoint
    child.wait(timeout=30)
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000002"
    assert (root / ".tmp_step_0000004").is_dir() and not (root / "step_0000004").exists()
    ck = resolve_checkpoint(run, "latest")
    assert load_state(ck)["step"] == 2 and load_file(str(ck / "model.safetensors"))
    # a checkpoint from another config is refused, naming the keys that differ
    save_config(run_cfg(corpus, run, lr=1e-3, grad_accum=2), tmp_path / "other.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "other.yaml"), "--resume", "latest",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.grad_accum: 1 → 2, train.lr: 0.0005 → 0.001" in err[0]
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--resume", "latest",
                 "--quiet"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000004"]
    assert (root / "latest").read_text().strip() == "step_0000004"
    a, b = rows(full), rows(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert losses(rb) == pytest.approx(losses(ra), rel=1e-6, abs=1e-7), ra["step"]


class Boom(RuntimeError):
    pass


def fail(*args, **kwargs):
    raise Boom()


def fail_folder_rename(real):
    """``os.replace`` that fails on the rename of a ``.tmp_step_*`` folder only (``latest`` is
    written through ``os.replace`` too)."""

    def replace(src, dst):
        if os.path.basename(src).startswith(".tmp_step_"):
            raise Boom()
        return real(src, dst)

    return replace


def assert_latest_is_complete(out, step):
    ck = resolve_checkpoint(out, "latest")
    assert ck.name == f"step_{step:07d}"
    assert load_state(ck)["step"] == step and load_file(str(ck / "model.safetensors"))


@pytest.mark.parametrize("where", ["save_model", "save_config", "_fsync", "os.replace",
                                   "write_atomic"])
def test_latest_names_a_complete_checkpoint_after_a_crash_anywhere(tmp_path, monkeypatch, where):
    model, cfg = nn.Linear(3, 2), tiny_config()
    opt = torch.optim.AdamW(model.parameters())
    state = {"optimizer": opt.state_dict()}
    save_checkpoint(tmp_path, 2, model, cfg, state)
    with monkeypatch.context() as m:
        if where == "os.replace":  # the rename of the folder
            m.setattr(ck_mod.os, "replace", fail_folder_rename(os.replace))
        else:
            m.setattr(ck_mod, where, fail)
        with pytest.raises(Boom):
            save_checkpoint(tmp_path, 4, model, cfg, state)
    root = tmp_path / "checkpoints"
    # a crash after the rename, before ``latest`` was rewritten, leaves step 4 complete but
    # unnamed; before it, a partial .tmp_step folder
    assert_latest_is_complete(tmp_path, 2)
    assert (root / ".tmp_step_0000004").exists() == (where not in ("write_atomic",))
    save_checkpoint(tmp_path, 6, model, cfg, state)  # the next write cleans up
    assert not list(root.glob(".tmp_*")) and not list(root.glob("*.tmp"))
    assert_latest_is_complete(tmp_path, 6)


def test_a_rewound_run_never_points_latest_at_a_folder_being_replaced(tmp_path, monkeypatch):
    model, cfg = nn.Linear(3, 2), tiny_config()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, cfg, {}, keep=3)
    root = tmp_path / "checkpoints"
    # resumed from step 4 of its own folder: latest names it; steps after it are dropped at
    # the next write, and step 6 is replaced
    point_latest_at(tmp_path, root / "step_0000004")
    assert_latest_is_complete(tmp_path, 4)
    point_latest_at(tmp_path, tmp_path / "elsewhere" / "step_0000002")  # not this run's: no-op
    assert_latest_is_complete(tmp_path, 4)
    (root / "latest").write_text("step_0000006\n")  # as if the run had been rewound to 6 ...
    with monkeypatch.context() as m:  # ... and crashed while replacing step 6
        m.setattr(ck_mod.os, "replace", fail_folder_rename(os.replace))
        with pytest.raises(Boom):
            save_checkpoint(tmp_path, 6, model, cfg, {}, keep=3)
    assert_latest_is_complete(tmp_path, 4)  # not the removed step 6
    save_checkpoint(tmp_path, 5, model, cfg, {}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004", "step_0000005"]
    (root / "latest").write_text("step_0000009\n")
    with pytest.raises(MissingFileError, match=r"names step_0000009, which holds no state.pt"):
        resolve_checkpoint(tmp_path, "latest")


def test_old_single_rank_rng_states_still_restore(tmp_path):
    torch.manual_seed(3)
    saved = {"rng": ck_mod.rng_state(), "step": 1}  # the format before per-rank states
    want = torch.rand(3)
    torch.manual_seed(99)
    assert ck_mod.restore_rng(saved, rank=0, world_size=1) is None
    assert torch.equal(torch.rand(3), want)
    note = ck_mod.restore_rng({"rng": [saved["rng"]] * 2, "world_size": 2}, 0, 1)
    assert "written by 2 process(es), this run has 1" in note


# ------------------------------------------------------------------------------ tracking


class FakeWriter:
    made: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tracker_writes_every_key_on_rank_0_only(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "summary_writer_class", lambda: FakeWriter)
    FakeWriter.made = []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    t = tracking.Tracker(tmp_path, ["jsonl", "tensorboard"], start=2, write=True)
    row = {"step": 3, "cl_loss": 1.5, "cl_loss/covid_paired": 1.25, "lr": 1e-4,
           "grad_norm": 0.5, "samples_per_s": 64.0}
    t.log(row)
    t.close()
    (w,) = FakeWriter.made
    assert w.purge_step == 3 and w.closed and w.log_dir == str(tmp_path / "tensorboard")
    assert w.scalars == [(k, v, 3) for k, v in row.items() if k != "step"]
    assert rows(tmp_path) == [{"step": 1}, {"step": 2}, row]  # step 3 of before: dropped
    FakeWriter.made = []
    quiet = tracking.Tracker(tmp_path / "rank1", ["jsonl", "tensorboard"], 0, write=False)
    quiet.log(row)
    assert FakeWriter.made == [] and not (tmp_path / "rank1").exists()


def test_report_to_is_checked(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"train.report_to\[1\]: unknown value 'wandb'"):
        run_cfg(corpus, tmp_path, report_to=["jsonl", "wandb"])
    with pytest.raises(ConfigError, match=r"must name jsonl once"):
        run_cfg(corpus, tmp_path, report_to=["tensorboard"])
    assert run_cfg(corpus, tmp_path).train.report_to == ["jsonl"]


def test_tensorboard_missing_is_a_one_line_error_naming_the_fix(corpus, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    save_config(run_cfg(corpus, tmp_path / "run"), tmp_path / "c.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--quiet",
                 "train.report_to=[jsonl, tensorboard]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'xlip[tensorboard]'" in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_tensorboard_events_hold_each_logged_scalar(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = pretrain(run_cfg(corpus, tmp_path / "run", steps=2,
                           report_to=["jsonl", "tensorboard"]), progress=False)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    logged = rows(out)
    assert tags == {k for k in logged[-1] if k != "step"}
    for tag in ("cl_loss/paired", "cl_loss/image_only", "mim_loss", "lr", "grad_norm",
                "samples_per_s"):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in logged], tag


# ------------------------------------------------------------------------------ two processes


@pytest.mark.slow
def test_two_process_resume_logs_the_losses_of_an_uninterrupted_run(corpus, tmp_path):
    """Each rank draws its own dropout masks (torch seeded with seed + rank): the checkpoint
    must restore every rank's generators, not rank 0's on all."""
    cfgs = {}
    for name in ("full", "part", "rank0_rng"):
        cfgs[name] = tmp_path / f"{name}.yaml"
        save_config(run_cfg(corpus, tmp_path / name, threads=1), cfgs[name])
    torchrun_pretrain(cfgs["full"])
    full = tmp_path / "full"
    state = load_state(full / "checkpoints" / "step_0000002")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    crashed_copy(full, tmp_path / "part", 2)
    torchrun_pretrain(cfgs["part"], "--resume", "latest")
    a, b = rows(full), rows(tmp_path / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert losses(rb) == pytest.approx(losses(ra), rel=1e-6, abs=1e-7), ra["step"]
    wa = load_file(str(full / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the comparison can fail: rank 0's generators on both ranks (a checkpoint in the format
    # before per-rank states) give other losses after the resume
    old = tmp_path / "rank0_rng"
    crashed_copy(full, old, 2)
    torch.save({**state, "rng": state["rng"][0], "world_size": 1},
               old / "checkpoints" / "step_0000002" / "state.pt")
    torchrun_pretrain(cfgs["rank0_rng"], "--resume", "latest")
    assert rows(old)[2]["mlm_loss"] != pytest.approx(a[2]["mlm_loss"], rel=1e-6)

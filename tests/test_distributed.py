"""How processes find each other (the launchers' variables, pure functions), and one process with
batch 2B against two ``torchrun`` processes (gloo, CPU) with batch B each.

The contrastive loss gathers embeddings across ranks (with gradient), the MLM loss is a mean over
the global batch's masked tokens, and DDP averages the ranks' gradients: the two runs must take
the same optimisation steps. CL + EntMLM on paired, image-only (prompt) and text-only rows; no
MIM (its patch masks are drawn per rank), linear stem (CPU BatchNorm keeps per-process
statistics), no dropout. EntMLM masks are drawn per sample, so they match.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import build_corpus, free_port, tiny_config, torchrun_pretrain
from xlip.config import save_config
from xlip.model.xlip import XLIPModel
from xlip.text.tokenizer import load_tokenizer
from xlip.train.distributed import (Launch, LaunchError, backend_for, launch_from_env,
                                    training_device)
from xlip.train.loop import pretrain


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"), 48, 8, seed=11, size=32,
                        vocab_size=300)


def cl_mlm_cfg(corpus, out, batch_size, mim="none"):
    """CL + EntMLM; with ``mim="attention"`` the full XLIP loss (AttMIM masks drawn from each
    sample's seed, so the same on one or two processes); ``"attention-aux"``: that, with MIM
    and MLM on the first two of the three steps only (``loss.aux_until``: DDP then meets
    parameters without a gradient)."""
    manifest, tok = corpus
    aux_until = 0.5 if mim == "attention-aux" else 1.0
    mim = mim.removesuffix("-aux")
    return tiny_config(
        data={"sources": [{"manifest": str(manifest), "kind": "paired", "weight": 0.5},
                          {"manifest": str(manifest), "kind": "image_only", "weight": 0.25},
                          {"manifest": str(manifest), "kind": "text_only", "weight": 0.25}],
              "batch_size": batch_size, "num_workers": 0, "prompt_negatives": 2},
        text={"tokenizer": str(tok), "max_length": 64, "dropout": 0.0},
        vision={"stem": "linear"},
        mim={"policy": mim}, mlm={"policy": "entity", "text_only": True},
        loss={"w_mim": 0.0 if mim == "none" else 1.0, "aux_until": aux_until},
        # adam_eps 1e-6: Adam's first step moves every weight by ~lr * g / (|g| + eps), so with
        # the default 1e-8 a weight whose gradient is near 0 moves by +lr or -lr depending on the
        # sign of float round-off, which differs between one and two processes (and between
        # CPUs: it failed CI on another machine). 1e-6 makes the step continuous in g there.
        train={"out_dir": str(out), "steps": 3, "warmup_steps": 1, "log_every": 1,
               "ckpt_every": 3, "threads": 1, "lr": 1e-3, "adam_eps": 1e-6})


@pytest.mark.slow
@pytest.mark.parametrize("mim", ["none", "attention", "attention-aux"])
def test_two_processes_train_like_one_with_the_global_batch(corpus, tmp_path, mim):
    one = pretrain(cl_mlm_cfg(corpus, tmp_path / "one", batch_size=8, mim=mim), progress=False)
    cfg2 = cl_mlm_cfg(corpus, tmp_path / "two", batch_size=4, mim=mim)
    save_config(cfg2, tmp_path / "two.yaml")
    torchrun_pretrain(tmp_path / "two.yaml")

    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):  # the same global loss, step by step
        assert b["cl_loss"] == pytest.approx(a["cl_loss"], rel=1e-4, abs=1e-5)
        assert ("mlm_loss" in b) == ("mlm_loss" in a) == (mim != "attention-aux"
                                                          or a["step"] < 3)
        if "mlm_loss" in a:
            assert b["mlm_loss"] == pytest.approx(a["mlm_loss"], rel=1e-4, abs=1e-5)
        if mim != "none" and "mlm_loss" in a:
            assert b["mim_loss"] == pytest.approx(a["mim_loss"], rel=1e-4, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    w1 = load_file(str(one / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        a, b = w1[k], w2[k]
        if k.endswith("attn.qkv.bias"):
            # the key bias adds a constant to each query's logits, which softmax ignores: its
            # true gradient is 0, so Adam turns float round-off (which differs between one and
            # two processes) into steps of ~lr. Compare the query and value parts.
            d = a.numel() // 3
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5, msg=k)
    # and training moved the weights: this is not a comparison of two untouched initialisations
    torch.manual_seed(0)
    w0 = XLIPModel(cl_mlm_cfg(corpus, tmp_path / "x", 8), len(load_tokenizer(corpus[1])))
    w0 = {k: v for k, v in w0.state_dict().items() if k in w1}
    changed = sum(not torch.allclose(w0[k], w1[k], atol=1e-6) for k in w0)
    assert len(w0) > len(w1) // 2 and changed > len(w0) // 2


REDUCE_WORKER = """
import json, sys, torch
from xlip.train.distributed import init_distributed, shutdown_distributed
from xlip.train.loop import MetricLog
info = init_distributed()
log = MetricLog(["paired", "text_only"], ["cl", "mlm"])
if info.rank == 0:  # rank 0 saw CL and MLM rows, rank 1 only CL: different keys per rank
    log.sums.update({"cl_loss": 2.0, "mlm_loss": 6.0, "mlm_loss/text_only": 9.0, "samples": 8})
    log.counts.update({"cl_loss": 1, "mlm_loss": 1, "mlm_loss/text_only": 3, "samples": 1})
else:
    log.sums.update({"cl_loss": 4.0, "cl_loss/paired": 5.0, "samples": 8})
    log.counts.update({"cl_loss": 1, "cl_loss/paired": 2, "samples": 1})
import time
log.t0 = time.perf_counter() - 1.0  # one second since the last flush
row = log.flush(info.device)
json.dump(row, open(sys.argv[1] + f".{info.rank}", "w"))
shutdown_distributed()
"""


@pytest.mark.slow
def test_metrics_reduce_over_ranks_whose_keys_differ(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(REDUCE_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", free_port(), str(script), str(tmp_path / "row")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads((tmp_path / f"row.{r}").read_text()) for r in (0, 1)]
    assert rows[0].keys() == rows[1].keys()
    for row in rows:
        assert row["cl_loss"] == pytest.approx(3.0)  # (2 + 4) / 2 steps
        assert row["mlm_loss"] == pytest.approx(6.0)  # only rank 0 had MLM rows
        assert row["mlm_loss/text_only"] == pytest.approx(3.0)
        assert row["cl_loss/paired"] == pytest.approx(2.5)
        assert "cl_loss/text_only" not in row and "guide_fallback" not in row
        # throughput is the sum over ranks: 8 + 8 samples in one second
        assert 14.0 < row["samples_per_s"] <= 16.0


# --- the launchers' variables ------------------------------------------------------------------

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
         "SLURM_LOCALID": "1", "MASTER_ADDR": "node01", "MASTER_PORT": "29400"}


def test_no_launcher_is_one_process():
    assert launch_from_env({}) == Launch(0, 1, 0, "single", "")
    assert launch_from_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == Launch()
    # srun -n 1 inside an allocation of 8 tasks: the step has one task
    assert launch_from_env({**SLURM, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) == Launch()


def test_a_batch_script_of_several_tasks_that_runs_python_itself_is_refused():
    """sbatch --ntasks 8 with a plain `python -m xlip pretrain`: one process, no srun step
    (SLURM_NTASKS=8, SLURM_PROCID=0, no SLURM_STEP_NUM_TASKS). Joining a group of 8 would
    wait forever; the error says to use srun."""
    batch = {"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "MASTER_ADDR": "node01", "MASTER_PORT": "29400"}
    with pytest.raises(LaunchError, match=r"SLURM_NTASKS=8 but this process was not started "
                                          r"by srun.*srun python -m xlip pretrain"):
        launch_from_env(batch)


def test_torchrun_variables():
    assert launch_from_env(TORCHRUN) == Launch(3, 4, 1, "torchrun", "")
    # torchrun inside a SLURM allocation: torchrun's variables describe the processes
    assert launch_from_env({**SLURM, **TORCHRUN}) == Launch(3, 4, 1, "torchrun", "")


def test_slurm_variables():
    assert launch_from_env(SLURM) == Launch(5, 8, 1, "slurm", "node01:29400")


@pytest.mark.parametrize("env, message", [
    ({**SLURM, "MASTER_ADDR": ""}, r"SLURM_STEP_NUM_TASKS=8 but MASTER_ADDR is not set.*scontrol show "
                                   r"hostnames"),
    ({k: v for k, v in SLURM.items() if not k.startswith("MASTER")},
     r"MASTER_ADDR and MASTER_PORT are not set"),
    ({**SLURM, "SLURM_PROCID": "8"}, r"SLURM_PROCID=8 is outside 0\.\.7 \(SLURM_STEP_NUM_TASKS=8\)"),
    ({**SLURM, "MASTER_PORT": "auto"}, r"MASTER_PORT='auto' is not an integer"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}, r"SLURM_LOCALID is not set"),
    ({**TORCHRUN, "RANK": "4"}, r"RANK=4 is outside 0\.\.3 \(WORLD_SIZE=4\)"),
    ({**TORCHRUN, "WORLD_SIZE": "0", "RANK": "0"}, r"WORLD_SIZE=0: the number of processes"),
    ({"RANK": "0"}, r"WORLD_SIZE is not set"),
    ({**TORCHRUN, "LOCAL_RANK": "-1"}, r"LOCAL_RANK=-1 must lie in 0\.\.RANK"),
])
def test_launch_errors_name_the_variable(env, message):
    with pytest.raises(LaunchError, match=message):
        launch_from_env(env)


def test_each_process_takes_the_gpu_of_its_local_rank():
    assert training_device(0, 0) == torch.device("cpu")
    assert training_device(3, 0) == torch.device("cpu")  # no GPU: every process on the CPU
    assert training_device(1, 2) == torch.device("cuda", 1)
    # srun --gpus-per-task 1: each task sees only its own GPU, as cuda:0
    assert training_device(3, 1, "slurm") == torch.device("cuda", 0)
    with pytest.raises(LaunchError, match=r"local rank 1 has no GPU: this process sees 1"):
        training_device(1, 1, "torchrun")
    with pytest.raises(LaunchError, match=r"local rank 2 has no GPU: this process sees 2.*"
                                          r"--nproc_per_node 2"):
        training_device(2, 2)
    assert (backend_for(torch.device("cuda", 0)), backend_for(torch.device("cpu"))) == \
        ("nccl", "gloo")


def test_pretrain_reports_a_bad_launch_in_one_line(tmp_path, monkeypatch, capsys):
    from xlip.cli import main

    cfg = tiny_config(data={"sources": [{"manifest": str(tmp_path / "m.csv"), "kind": "paired"}]},
                      train={"out_dir": str(tmp_path / "run")})
    save_config(cfg, tmp_path / "c.yaml")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xlip: error: SLURM_STEP_NUM_TASKS=2 but MASTER_ADDR and MASTER_PORT are not "
                          "set") and err.count("\n") == 1


SLURM_WORKER = """
import json, sys
from xlip.train.distributed import init_distributed, reduce_sums, shutdown_distributed
info = init_distributed()
got = reduce_sums({"x": float(info.rank + 1)}, {"x": 1.0}, ["x"], info.device)
json.dump({"rank": info.rank, "world": info.world_size, "local": info.local_rank,
           "device": str(info.device), "x": got["x"]}, open(sys.argv[1], "w"))
shutdown_distributed()
"""


@pytest.mark.slow
def test_two_srun_processes_join_one_group(tmp_path):
    """Two processes started as srun starts them (SLURM variables, no torchrun) meet over gloo."""
    script = tmp_path / "worker.py"
    script.write_text(SLURM_WORKER)
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base.update(OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=free_port(), CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"r{r}.json")],
                              env=dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    rows = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1)]
    assert [(x["rank"], x["world"], x["local"], x["device"]) for x in rows] == \
        [(0, 2, 0, "cpu"), (1, 2, 1, "cpu")]
    assert all(x["x"] == [3.0, 2.0] for x in rows)  # (1 + 2, 1 + 1) summed over both

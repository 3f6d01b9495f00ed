"""`xlip eval retrieval` (ranks against a brute-force count, ties, identical reports as one
target, the command on a short pre-training run) and `xlip plot` on that run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import build_corpus, tiny_config
from xlip.cli import main
from xlip.eval.retrieval import ranks, summary
from xlip.train.loop import pretrain


def brute_force(sim, target):
    """Rank = 1 + the number of other candidates scoring at least as high, one by one."""
    n_img, n_txt = sim.shape
    i2t = [1 + sum(1 for j in range(n_txt) if j != target[i] and sim[i, j] >= sim[i, target[i]])
           for i in range(n_img)]
    t2i = []
    for j in range(n_txt):
        best = max(sim[i, j] for i in range(n_img) if target[i] == j)
        t2i.append(1 + sum(1 for i in range(n_img) if target[i] != j and sim[i, j] >= best))
    return np.array(i2t), np.array(t2i)


def test_ranks_match_a_brute_force_count():
    rng = np.random.default_rng(0)
    target = np.array([0, 1, 1, 2, 3, 3, 3, 4])  # reports 1 and 3 shared by several images
    for trial in range(20):
        sim = rng.normal(size=(8, 5)).round(1)  # rounding makes ties
        a, b = ranks(sim, target)
        c, d = brute_force(sim, target)
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    flat = np.zeros((8, 5))  # a model that scores everything alike: last place, no credit
    i2t, t2i = ranks(flat, target)
    assert (i2t == 5).all() and summary(i2t)["R@1"] == 0.0
    assert list(t2i) == [1 + (target != j).sum() for j in range(5)]
    perfect = np.eye(5)[target] * 10
    i2t, t2i = ranks(perfect, target)
    assert (i2t == 1).all() and (t2i == 1).all() and summary(t2i)["median_rank"] == 1.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest, tok = build_corpus(root, 96, 32, seed=4, size=32, vocab_size=400)
    cfg = tiny_config(
        data={"sources": [{"manifest": str(manifest), "kind": "paired"}], "batch_size": 8,
              "num_workers": 0, "eval_manifest": str(manifest)},
        text={"tokenizer": str(tok), "max_length": 64},
        train={"out_dir": str(root / "run"), "steps": 2, "warmup_steps": 1, "ckpt_every": 2})
    return pretrain(cfg, progress=False)


def test_retrieval_command(run, tmp_path, capsys):
    assert main(["eval", "retrieval", "--model", str(run), "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "retrieval.json").read_text())
    assert res["protocol"] == "retrieval" and res["split"] == "test"
    assert 1 < res["n_reports"] <= res["n_images"] <= 32
    for d in ("image_to_text", "text_to_image"):
        r = res[d]
        assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1 and r["median_rank"] >= 1
    assert "| image to text |" in (tmp_path / "retrieval.md").read_text()
    capsys.readouterr()
    assert main(["eval", "retrieval", "--model", str(run), "--split", "nosuch"]) == 2
    assert "split 'nosuch' has 0 rows" in capsys.readouterr().err


def test_plot_draws_the_curves_of_a_run(run, tmp_path, capsys):
    from PIL import Image

    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    img = Image.open(tmp_path / "c.png")
    assert img.size[0] > 3 * img.size[1]  # one panel per loss term and the schedule
    colours = len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0))
    assert colours > 50  # lines drawn, not a blank canvas
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err

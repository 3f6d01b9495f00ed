"""`xlip eval zeroshot`: prompt sets and their sensitivity table, multi-class mode against sklearn,
thresholds chosen on validation only (against a brute-force search), ROC PNGs, refused options.
The scores are recomputed here from the model's own embeddings, step by step."""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from tests.conftest import build_corpus, tiny_config
from xlip.api import XLIP
from xlip.cli import main
from xlip.config import ConfigError
from xlip.errors import InputError
from xlip.eval.zeroshot import (ZeroShotOptions, eval_records, evaluate_zeroshot, run_zeroshot,
                                write_zeroshot)
from xlip.text.prompts import PROMPT_SETS, zeroshot_prompts
from xlip.train.loop import pretrain

FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Nodule")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rewrite(manifest, name, change):
    """A copy of ``manifest`` beside it (so image paths still resolve), ``change`` applied to
    its list of row dicts."""
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    change(rows)
    out = manifest.with_name(name)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The synthetic corpus with 60 of its training patients moved to a ``valid`` split."""
    manifest, tok = build_corpus(tmp_path_factory.mktemp("corpus"), 150, 60, seed=7, size=32,
                                 vocab_size=400)

    def validation(rows):
        for r in [r for r in rows if r["split"] == "train" and r["image"]][:60]:
            r["split"] = "valid"

    return rewrite(manifest, "manifest_valid.csv", validation), tok


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    manifest, tok = corpus
    cfg = tiny_config(
        data={"sources": [{"manifest": str(manifest), "kind": "paired"}], "batch_size": 8,
              "num_workers": 0, "eval_manifest": str(manifest)},
        text={"tokenizer": str(tok), "max_length": 64},
        eval={"bootstrap": 20},
        train={"out_dir": str(tmp_path_factory.mktemp("run")), "steps": 2, "warmup_steps": 1,
               "ckpt_every": 2})
    return pretrain(cfg, progress=False)


@pytest.fixture(scope="module")
def model(run):
    return XLIP.from_pretrained(run)


def scores(m: XLIP, split: str, manifest, findings, prompt_set="xlip"):
    """(rows, cosines (n, F, 2)) recomputed from the public encoders: each prompt list's mean
    unit embedding, renormalised."""
    rows = eval_records(manifest, split)
    img = m.encode_image([r.image for r in rows])
    cls = []
    for f in findings:
        pair = [torch.nn.functional.normalize(m.encode_text(p).mean(0), dim=-1)
                for p in zeroshot_prompts(f, prompt_set)]
        cls.append(torch.stack(pair))
    cos = torch.einsum("be,fke->bfk", img, torch.stack(cls))
    return rows, float(m.model.scale().detach()) * cos.numpy()


def brute_force_threshold(y, prob):
    best = None
    for t in sorted(set(prob.tolist())):
        f1 = f1_score(y, prob >= t)
        if best is None or f1 >= best[0]:
            best = (f1, t)
    return best[1]


def curves(model, manifest, split, findings, **how):
    """The result and the scores it was computed from: {name: (y, score)} of its ROC curves."""
    [scored] = run_zeroshot(model.model, model.tokenizer, model.cfg,
                            ZeroShotOptions(manifest, split, tuple(findings), **how))
    return scored.result, {c.name: (c.y, c.score) for c in scored.curves}


def test_multiclass_accuracy_and_macro_auc_equal_sklearn(model, corpus):
    manifest, _ = corpus
    rows = eval_records(manifest, "test")
    singles = {}
    for r in rows:
        for f in r.labels:
            singles[f] = singles.get(f, 0) + (len(r.labels) == 1)
    classes = sorted(singles, key=lambda f: -singles[f])[:3]  # No Finding and two findings
    res, by_class = curves(model, manifest, "test", classes, mode="multiclass")
    assert res == curves(model, manifest, "test", classes, mode="multiclass")[0]  # same again
    # the rows: exactly one of the classes; the others counted
    keep = [i for i, r in enumerate(rows) if sum(c in r.labels for c in classes) == 1]
    assert res["n_images"] == len(keep) and res["left_out"]["count"] == len(rows) - len(keep)
    assert res["left_out"]["count"] > 0
    y = np.array([next(j for j, c in enumerate(classes) if c in rows[i].labels) for i in keep])
    prob = np.stack([by_class[c][1] for c in classes], axis=1)  # (n, C) the module's scores
    for j, c in enumerate(classes):
        np.testing.assert_array_equal(by_class[c][0], y == j)
    # the scores: softmax over the classes of the scaled cosines with the positive prompts
    _, logits = scores(model, "test", manifest, classes)
    logit = logits[keep, :, 0]  # (n, C)
    want = np.exp(logit - logit.max(1, keepdims=True))
    np.testing.assert_allclose(prob, want / want.sum(1, keepdims=True), atol=1e-5)
    # the metrics: sklearn's on those scores
    assert res["accuracy"] == accuracy_score(y, prob.argmax(1))
    assert res["mean_auc"] == pytest.approx(
        roc_auc_score(y, prob, multi_class="ovr", average="macro"), abs=1e-12)
    for j, c in enumerate(classes):
        assert res["per_finding"][c] == roc_auc_score(y == j, prob[:, j])
        assert res["details"][c]["n"] == int(np.sum(y == j))
    assert res["confusion_matrix"]["counts"] == confusion_matrix(y, prob.argmax(1)).tolist()
    assert res["mode"] == "multiclass" and res["classes"] == classes
    assert set(res["prompts"][classes[0]]) == {"positive"}


def test_threshold_is_chosen_on_validation_and_never_on_test(model, corpus):
    manifest, _ = corpus
    res, test = curves(model, manifest, "test", FINDINGS, val_split="valid")
    n_val = len(eval_records(manifest, "valid"))
    assert res["threshold"]["source"] == f"validation split 'valid' ({n_val} images)"
    _, val = curves(model, manifest, "valid", FINDINGS)  # the validation rows' scores
    _, logits = scores(model, "test", manifest, FINDINGS)  # softmax over [positive, negative]
    on_test = []
    for j, f in enumerate(FINDINGS):
        np.testing.assert_allclose(test[f][1], 1 / (1 + np.exp(logits[:, j, 1] - logits[:, j, 0])),
                                   atol=1e-5)
        t = res["threshold"]["values"][f]
        assert t == brute_force_threshold(*val[f])
        ty, tprob = test[f]
        assert res["details"][f]["f1"] == pytest.approx(f1_score(ty, tprob >= t))
        assert res["details"][f]["acc"] == pytest.approx(accuracy_score(ty, tprob >= t))
        on_test.append(brute_force_threshold(ty, tprob))
    # choosing on the test rows would have given other thresholds ...
    assert on_test != [res["threshold"]["values"][f] for f in FINDINGS]
    # ... and the thresholds do not move when other rows are tested
    other, _ = curves(model, manifest, "train", FINDINGS, val_split="valid")
    assert other["threshold"] == res["threshold"]
    fixed, _ = curves(model, manifest, "test", FINDINGS)
    assert fixed["threshold"] == {"source": "fixed 0.5", "values": {f: 0.5 for f in FINDINGS}}
    assert fixed["per_finding"] == res["per_finding"]  # AUC needs no threshold
    assert fixed["details"]["Nodule"]["f1"] == f1_score(*test["Nodule"][:1],
                                                        test["Nodule"][1] >= 0.5)


def test_cli_prompts_all_writes_the_sensitivity_table_and_roc(run, corpus, tmp_path, capsys):
    out = tmp_path / "all"
    assert main(["eval", "zeroshot", "--model", str(run), "--split", "test", "--findings",
                 *FINDINGS, "--prompts", "all", "--val-split", "valid", "--out", str(out)]) == 0
    table = json.loads((out / "zeroshot_prompts.json").read_text())
    sets = list(PROMPT_SETS)
    assert table["prompt_sets"] == sets and set(table["results"]) == set(sets)
    assert table["model"] == str(run) and table["mode"] == "multilabel"
    for f in FINDINGS:
        row = table["sensitivity"][f]
        aucs = [table["results"][s]["per_finding"][f] for s in sets]
        assert list(row["auc"]) == sets and list(row["auc"].values()) == aucs
        assert row["mean"] == pytest.approx(statistics.fmean(aucs))
        assert row["sd"] == pytest.approx(statistics.stdev(aucs))
        assert row["range"] == pytest.approx(max(aucs) - min(aucs))
    for s in sets:
        res = table["results"][s]
        assert res["prompt_set"] == s and table["mean_auc_by_set"][s] == res["mean_auc"]
        assert res["prompts"][FINDINGS[0]]["positive"] == zeroshot_prompts(FINDINGS[0], s)[0]
    md = (out / "zeroshot_prompts.md").read_text()
    assert "| finding | xlip | chexzero | report | mean | sd | max − min |" in md
    assert "validation split 'valid'" in md
    assert (out / "zeroshot_prompts_roc.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "zeroshot.json").exists()
    # each set alone gives the same numbers as in the table
    one = tmp_path / "one"
    assert main(["eval", "zeroshot", "--model", str(run), "--split", "test", "--findings",
                 *FINDINGS, "--prompts", "chexzero", "--val-split", "valid", "--out",
                 str(one)]) == 0
    alone = json.loads((one / "zeroshot.json").read_text())
    assert alone["per_finding"] == table["results"]["chexzero"]["per_finding"]
    assert alone["threshold"] == table["results"]["chexzero"]["threshold"]
    for key, want in {"protocol": "zeroshot", "mode": "multilabel", "prompt_set": "chexzero",
                      "split": "test", "manifest": str(corpus[0])}.items():
        assert alone[key] == want
    assert alone["n_images"] == len(eval_records(corpus[0], "test"))
    assert "maximises F1 on the validation split 'valid'" in (one / "zeroshot.md").read_text()


def test_roc_png_is_written_and_no_plots_skips_it(model, corpus, tmp_path):
    import matplotlib.image

    manifest, _ = corpus
    for mode, findings in (("multilabel", FINDINGS), ("multiclass", ("No Finding", "Nodule"))):
        scored = run_zeroshot(model.model, model.tokenizer, model.cfg,
                              ZeroShotOptions(manifest, "test", findings, mode=mode))
        paths = write_zeroshot(scored, tmp_path / mode)
        png = tmp_path / mode / "zeroshot_roc.png"
        assert png in paths and png.read_bytes()[:8] == PNG_MAGIC
        h, w, _ = matplotlib.image.imread(png).shape
        assert h > 100 and w > 100
        assert [c.name for c in scored[0].curves] == list(findings)
        md = (tmp_path / mode / "zeroshot.md").read_text()
        assert ("Confusion matrix" in md) == (mode == "multiclass")
        assert json.loads((tmp_path / mode / "zeroshot.json").read_text())["mode"] == mode
    write_zeroshot(scored, tmp_path / "bare", plots=False)
    assert not (tmp_path / "bare" / "zeroshot_roc.png").exists()


def test_bad_options_are_refused_in_one_line(run, corpus, tmp_path, capsys):
    manifest, _ = corpus
    base = ["eval", "zeroshot", "--model", str(run), "--split", "test", "--out",
            str(tmp_path / "o")]
    cases = [
        (["--mode", "multiclass", "--findings", "Nodule"],
         "--mode multiclass needs --findings with at least two different classes"),
        (["--mode", "multiclass", "--findings", "Nodule", "Nodule"], "at least two different"),
        (["--prompts", "clip"], "--prompts 'clip': unknown prompt set; choose one of xlip, "
                                "chexzero, report, all"),
        (["--val-split", "test"], "--val-split 'test' is the split tested (--split)"),
        (["--mode", "multiclass", "--findings", "Nodule", "Edema", "--val-split", "valid"],
         "--val-split applies to --mode multilabel"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not (tmp_path / "o").exists()  # options are refused before the output folder
    assert main(base + ["--val-split", "nope", "--findings", *FINDINGS]) == 2
    err = capsys.readouterr().err
    assert "no rows with image and labels in split 'nope'" in err and "encoding" not in err
    with pytest.raises(ConfigError, match="call run_zeroshot"):
        evaluate_zeroshot(None, None, None, ZeroShotOptions(manifest, prompt_set="all"))


def test_empty_class_and_unusable_validation_rows_are_refused(model, corpus):
    manifest, _ = corpus

    def edema_with_cardiomegaly(rows):  # Edema never the only class of (Cardiomegaly, Edema)
        for r in rows:
            if "Edema" in r["labels"] and "Cardiomegaly" not in r["labels"]:
                r["labels"] += ";Cardiomegaly"

    def shared_patient(rows):
        test_patient = next(r["patient_id"] for r in rows if r["split"] == "test")
        next(r for r in rows if r["split"] == "valid")["patient_id"] = test_patient

    def no_valid_nodule(rows):
        for r in rows:
            if r["split"] == "valid":
                r["labels"] = r["labels"].replace("Nodule", "Mass")

    def zeroshot(name, change, **how):
        m = rewrite(manifest, name, change)
        run_zeroshot(model.model, model.tokenizer, model.cfg,
                     ZeroShotOptions(m, "test", **how))

    with pytest.raises(InputError, match=r"no image of .* split 'test' has 'Edema' as its only "
                                         r"class of Cardiomegaly, Edema; drop it from --findings"):
        zeroshot("m1.csv", edema_with_cardiomegaly, findings=("Cardiomegaly", "Edema"),
                 mode="multiclass")
    with pytest.raises(InputError, match=r"validation split 'valid' and the test rows share 1 "
                                         r"patients \(e\.g\. "):
        zeroshot("m2.csv", shared_patient, findings=FINDINGS, val_split="valid")
    with pytest.raises(InputError, match="split 'valid': no positive image of Nodule, so no F1 "
                                         "threshold can be chosen"):
        zeroshot("m3.csv", no_valid_nodule, findings=FINDINGS, val_split="valid")


def test_api_zero_shot_uses_the_named_prompt_set(model, corpus):
    """``XLIP.zero_shot(..., prompts=NAME)``: the softmax over [positive, negative] of the
    scaled cosines with that set's mean prompt embeddings; an unknown name is refused."""
    manifest, _ = corpus
    findings = ["Cardiomegaly", "Edema"]
    rows, logits = scores(model, "test", manifest, findings, "chexzero")
    probs = model.zero_shot([r.image for r in rows[:20]], findings, prompts="chexzero")
    for j, f in enumerate(findings):
        want = 1 / (1 + np.exp(logits[:20, j, 1] - logits[:20, j, 0]))
        np.testing.assert_allclose(probs[f], want, atol=1e-5)
    default = model.zero_shot([r.image for r in rows[:20]], findings)
    assert not np.allclose(default["Edema"], probs["Edema"])  # another set, other scores
    with pytest.raises(InputError, match="prompt set 'cxr': unknown"):
        model.zero_shot([r.image for r in rows[:2]], findings, prompts="cxr")

"""`xlip eval probe`: splits (held-out validation patients, label fractions), the choice of C on
validation only, and the command on a short pre-training run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xlip.cli import main
from xlip.errors import InputError
from xlip.eval import probe
from xlip.eval.probe import ProbeOptions, linear_probe, split_rows


def test_validation_patients_are_held_out_and_fractions_shrink_training(eval_corpus):
    manifest, _ = eval_corpus
    train, val, test, how = split_rows(ProbeOptions(manifest))
    assert "10% of the training patients" in how and val and test
    assert not {r.patient_id for r in train} & {r.patient_id for r in val}
    assert {r.split for r in train + val} == {"train"} and {r.split for r in test} == {"test"}
    small, val2, _, _ = split_rows(ProbeOptions(manifest, fraction=0.25))
    assert val2 == val  # the validation rows do not depend on the fraction
    assert {r.image for r in small} < {r.image for r in train}
    assert 0.1 < len(small) / len(train) < 0.45
    with pytest.raises(InputError, match="--fraction 0.0"):
        ProbeOptions(manifest, fraction=0.0)
    # C chosen on the rows that are tested on (or trained on) would be a leak: refused
    with pytest.raises(InputError, match=r"the probe's training and test rows share \d+ images"):
        split_rows(ProbeOptions(manifest, test_split="train"))
    with pytest.raises(InputError, match="validation and test rows share"):
        split_rows(ProbeOptions(manifest, val_split="test"))


def test_c_is_chosen_on_validation_never_on_test(eval_corpus, eval_run, monkeypatch):
    """Features that carry the labels on training and validation images and noise on the
    test images: the choice of C follows validation, and the test AUC is at chance."""
    manifest, _ = eval_corpus
    train, val, test, _ = split_rows(ProbeOptions(manifest))
    test_images = {r.image for r in test}
    findings = ("Cardiomegaly", "Pleural Effusion")
    by_image = {r.image: r for r in train + val + test}
    rng = np.random.default_rng(0)

    def features(model, paths, cfg, batch_size=128, progress=""):
        y = np.array([[f in by_image[p].labels for f in findings] for p in paths], float)
        noise = rng.normal(size=(len(paths), 4))
        if paths[0] in test_images:
            return noise
        return np.concatenate([y + 0.3 * noise[:, :2], noise[:, 2:]], axis=1)

    monkeypatch.setattr(probe, "pooled_features", features)
    from xlip.api import XLIP

    m = XLIP.from_pretrained(eval_run)
    res = linear_probe(m.model, m.cfg, ProbeOptions(manifest, findings=findings), bootstrap=20)
    by_c = res["val_mean_auc_by_C"]
    assert res["C"] == max(probe.C_GRID, key=lambda c: (by_c[str(c)], -c))
    assert by_c[str(res["C"])] > 0.95  # validation sees the signal
    assert abs(res["mean_auc"] - 0.5) < 0.15  # test does not: nothing leaked from it
    assert set(res["per_finding"]) == set(findings)


def test_probe_command_writes_the_protocol_and_its_numbers(eval_run, tmp_path, capsys):
    assert main(["eval", "probe", "--model", str(eval_run), "--out", str(tmp_path / "p")]) == 0
    res = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert res["protocol"] == "linear_probe" and res["init"] == "pretrained"
    assert res["fraction"] == 1.0 and 0.5 < res["mean_auc"] <= 1.0
    for f, d in res["per_finding"].items():
        lo, hi = d["auc_ci95"]
        assert lo <= d["auc"] <= hi and d["positives"] > 0 and d["train_positives"] > 0
    assert (tmp_path / "p" / "probe.md").read_text().startswith("# Linear probe")
    assert main(["eval", "probe", "--model", str(eval_run), "--init", "random", "--fraction",
                 "0.5", "--out", str(tmp_path / "r")]) == 0
    rnd = json.loads((tmp_path / "r" / "probe.json").read_text())
    assert rnd["init"] == "random" and rnd["fraction"] == 0.5
    assert rnd["n_train"] < res["n_train"] and rnd["n_test"] == res["n_test"]
    capsys.readouterr()
    assert main(["eval", "probe", "--model", str(eval_run), "--test-split", "holdout"]) == 2
    assert "no rows with image and labels in split 'holdout'" in capsys.readouterr().err

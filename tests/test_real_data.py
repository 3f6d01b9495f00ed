"""configs/shared-real.yaml end to end on the real sets in ../shared/data, shortened to a few steps:
the three adapters, the tokenizer, pre-training with per-source loss terms, zero-shot."""

from __future__ import annotations

import json

import pytest
import yaml
from tests.conftest import ROOT, SHARED_DATA, needs_shared_data

from xlip.cli import main


@pytest.mark.slow
@needs_shared_data("covid_cxr/source/metadata.csv", "nih_cxr14_starter/source",
                   "iu_reports/source/ecgen-radiology-train.tgz")
def test_shared_real_config_runs(tmp_path, capsys):
    data = tmp_path / "data"
    for args in (["covid-collection", str(SHARED_DATA / "covid_cxr")],
                 ["nih-cxr14", str(SHARED_DATA / "nih_cxr14_starter")],
                 ["iu-xray", str(SHARED_DATA / "iu_reports" / "source"), "--reports-only"]):
        out = data / {"covid-collection": "covid", "nih-cxr14": "nih", "iu-xray": "iu"}[args[0]]
        assert main(["data", "prepare", *args, "--out", str(out)]) == 0
    summaries = {d.name: json.loads((d / "summary.json").read_text()) for d in data.iterdir()}
    assert summaries["covid"]["kinds"]["paired"] > 300
    assert summaries["nih"]["kinds"] == {"image_only": 493}
    assert summaries["iu"]["kinds"]["text_only"] > 3000
    assert main(["tokenizer", "train", str(data / "covid" / "manifest.csv"),
                 str(data / "iu" / "manifest.csv"), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "2000"]) == 0
    cfg = yaml.safe_load((ROOT / "configs" / "shared-real.yaml").read_text())
    for src in cfg["data"]["sources"]:
        src["manifest"] = src["manifest"].replace("runs/shared-real/data", str(data))
    cfg["data"]["eval_manifest"] = str(data / "nih" / "manifest.csv")
    cfg["text"]["tokenizer"] = str(tmp_path / "tok")
    cfg["train"].update(out_dir=str(tmp_path / "run"), steps=4, warmup_steps=1, log_every=2,
                        ckpt_every=4)
    cfg["data"]["batch_size"] = 12
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", "--config", str(tmp_path / "cfg.yaml"), "--quiet"]) == 0
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # every source logs its own loss terms: CL and MIM for image rows, MLM for report rows
    for key in ("cl_loss/covid_paired", "cl_loss/nih_image_only", "mim_loss/covid_paired",
                "mim_loss/nih_image_only", "mlm_loss/covid_paired", "mlm_loss/iu_text_only"):
        assert key in last and last[key] == last[key] > 0, key
    assert "mlm_loss/nih_image_only" not in last and "cl_loss/iu_text_only" not in last
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--model", str(tmp_path / "run"), "--out",
                 str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "zeroshot.json").read_text())
    assert len(result["per_finding"]) >= 5

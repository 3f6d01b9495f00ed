"""`xlip eval suite`: the suite file (expansion, errors before any work), reruns, and the page."""

from __future__ import annotations

import json

import pytest

from xlip.config import ConfigError
from xlip.cli import main
from xlip.hashing import file_sha256
from xlip.suite import SuiteEntry, load_suite


def write(tmp_path, text: str):
    path = tmp_path / "eval.yaml"
    path.write_text(text)
    return path


def test_lists_expand_into_one_entry_per_value_and_options_become_flags(tmp_path):
    entries = load_suite(write(tmp_path, """
evaluations:
  - kind: zeroshot
    prompts: all
    val_split: valid
    findings: [Edema, Nodule]
  - kind: probe
    fraction: [0.01, 1.0]
    init: [pretrained, random]
  - kind: benchmark
    name: nih-cxr14
    data_root: /data/nih
    protocol: probe
    fraction: 10
  - kind: retrieval
    id: retrieval_test
    no_plots: true
    quiet: false
"""))
    assert [e.name for e in entries] == [
        "zeroshot", "probe_f0.01_pretrained", "probe_f0.01_random", "probe_f1_pretrained",
        "probe_f1_random", "benchmark_nih-cxr14_probe", "retrieval_test"]
    assert entries[0].argv("RUN", "OUT") == [
        "eval", "zeroshot", "--model", "RUN", "--prompts", "all", "--val-split", "valid",
        "--findings", "Edema", "Nodule", "--out", "OUT/zeroshot"]
    assert entries[2].options == {"fraction": 0.01, "init": "random"}
    assert entries[5].argv("RUN", "OUT")[:5] == ["eval", "benchmark", "nih-cxr14", "--model",
                                                  "RUN"]
    # true is a bare flag, false leaves the flag out
    assert entries[6].argv("RUN", "OUT") == ["eval", "retrieval", "--model", "RUN",
                                             "--no-plots", "--out", "OUT/retrieval_test"]


@pytest.mark.parametrize("text, message", [
    ("evaluations: []", "give a list under `evaluations:`"),
    ("evaluations:\n  - kind: zeroshoot", "`kind` must be one of zeroshot"),
    ("evaluations:\n  - kind: probe\n    out: /tmp/x", "out is set by the suite"),
    ("evaluations:\n  - kind: probe\n    fraction: {a: 1}", "fraction: give a value or a list"),
    ("evaluations:\n  - kind: probe\n  - kind: probe", "two evaluations would write to probe"),
    ("evaluations:\n  - kind: probe\n    id: ../x", "not a plain folder name"),
    ("evals:\n  - kind: probe", "give a list under `evaluations:`"),
    ("evaluations:\n  - kind: probe\nextra: 1", "unknown top-level key(s) extra"),
    ("evaluations: [", "not valid YAML"),
])
def test_a_malformed_suite_file_is_refused_naming_the_entry(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_suite(write(tmp_path, text))


def test_a_missing_suite_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such suite file"):
        load_suite(tmp_path / "nope.yaml")


def test_entry_argv_keeps_the_suite_folder_layout():
    e = SuiteEntry("probe_f0.1", "probe", {"fraction": 0.1})
    assert e.argv("m", "o")[-2:] == ["--out", "o/probe_f0.1"]
    assert json.dumps(e.argv("m", "o"))  # plain strings only


def test_suite_command_checks_every_entry_runs_them_and_writes_the_model_card(
        eval_run, tmp_path, capsys):
    suite_file = write(tmp_path, """
evaluations:
  - kind: zeroshot
    no_plots: true
  - kind: zeroshot
    id: prompt_sets
    prompts: all
    no_plots: true
  - kind: probe
    init: [pretrained, random]
  - kind: retrieval
""")
    out = tmp_path / "eval"
    argv = ["eval", "suite", "--model", str(eval_run), "--config", str(suite_file),
            "--out", str(out)]
    assert main(argv) == 0
    suite = json.loads((out / "suite.json").read_text())
    rows = {r["name"]: r for r in suite["evaluations"]}
    assert list(rows) == ["zeroshot", "prompt_sets", "probe_pretrained", "probe_random",
                          "retrieval"]
    for name, row in rows.items():  # each row is its command's own result, not a copy of another
        own = json.loads((out / name / row["result_file"]).read_text())
        if name == "prompt_sets":
            assert row["mean_auc_by_set"] == own["mean_auc_by_set"]
            assert row["mean_auc_by_set"]["xlip"] == rows["zeroshot"]["mean_auc"]
        elif row["kind"] == "retrieval":
            assert row["figures"]["image_to_text R@5"] == own["image_to_text"]["R@5"]
        else:
            assert row["mean_auc"] == own["mean_auc"] and 0 <= own["mean_auc"] <= 1
    assert rows["probe_random"]["init"] == "random" and rows["probe_pretrained"]["data_sha256"]
    assert rows["zeroshot"]["prompts"] == "xlip" and rows["zeroshot"]["protocol"] == "zeroshot"
    assert suite["model"]["weights_sha256"] == file_sha256(eval_run / "model.safetensors")
    page = (out / "README.md").read_text()
    assert page.startswith(f"# Evaluation of `{eval_run}`")
    assert all(f"[{n}]({n}/)" in page and f"## {n}" in page for n in rows)
    assert "100 % of training labels; random init" in page
    assert "\n### Linear probe" in page  # each command's own page, below its entry's heading

    capsys.readouterr()  # a second run keeps every result and runs nothing
    stamp = (out / "probe_random" / "probe.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert capsys.readouterr().err.count("result exists for this command; kept") == 5
    assert (out / "probe_random" / "probe.json").stat().st_mtime_ns == stamp


def test_suite_command_refuses_a_bad_entry_before_running_any(eval_run, tmp_path, capsys):
    suite_file = write(tmp_path, """
evaluations:
  - kind: retrieval
  - kind: probe
    frction: 0.1
""")
    out = tmp_path / "eval"
    assert main(["eval", "suite", "--model", str(eval_run), "--config", str(suite_file),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--frction" in err and str(suite_file) in err
    assert not (out / "retrieval").exists()  # the first entry did not run
    assert main(["eval", "suite", "--model", str(tmp_path), "--config", str(suite_file)]) == 2
    assert "not a model folder" in capsys.readouterr().err

"""``xlip eval suite``: run a list of evaluations of one model and write one page reporting them.

A suite file (YAML) lists evaluations; each is one ``xlip eval KIND`` command, its keys the
command's options (``val_split: valid`` is ``--val-split valid``; ``true`` is a bare flag)::

    evaluations:
      - kind: zeroshot
        prompts: all
        val_split: valid
      - kind: probe
        fraction: [0.01, 0.1, 1.0]     # a list expands into one evaluation per value
        init: [pretrained, random]
      - kind: retrieval
      - kind: benchmark
        name: nih-cxr14
        data_root: /data/nih
        protocol: zeroshot

An entry's folder is named after its kind and values (``id: NAME`` names it). Every entry is
checked by the command's own argument parser before anything runs, so a typo in
the last entry fails in a second, not after an hour. Each entry writes its usual JSON and Markdown
into ``OUT/<entry name>/``; an entry whose JSON exists for the same command is not run again
(``--force`` reruns all). ``OUT/suite.json`` collects the results, and ``OUT/README.md`` is a
model-card style page: every number with its protocol, data, split hash, prompts, image size and
checkpoint, and the command that reproduces it.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from xlip.config import ConfigError, load_config
from xlip.files import write_atomic
from xlip.hashing import file_sha256

#: evaluation kind → the JSON file its command writes
RESULT_FILES = {"zeroshot": "zeroshot.json", "probe": "probe.json", "finetune": "finetune.json",
                "retrieval": "retrieval.json", "benchmark": "benchmark.json"}
LIST_OPTIONS = {"findings"}  # options that take several values (never expanded into a grid)
RESERVED = {"model", "out"}  # set by the suite
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class SuiteEntry:
    """One evaluation: ``xlip eval KIND [positional] --model M OPTIONS --out OUT/NAME``."""

    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def result_file(self) -> str:
        """The JSON its command writes (``--prompts all``: the sensitivity table's)."""
        if self.kind == "zeroshot" and self.options.get("prompts") == "all":
            return "zeroshot_prompts.json"
        return RESULT_FILES[self.kind]

    def argv(self, model: str | Path, out_dir: str | Path) -> list[str]:
        args = ["eval", self.kind]
        opts = dict(self.options)
        if self.kind == "benchmark" and "name" in opts:
            args.append(str(opts.pop("name")))
        args += ["--model", str(model)]
        for key, value in opts.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, list):
                args += [flag, *map(str, value)]
            else:
                args += [flag, str(value)]
        return args + ["--out", str(Path(out_dir) / self.name)]


def load_suite(path: str | Path) -> list[SuiteEntry]:
    """The entries of a suite file, list values expanded; errors name the file and entry."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such suite file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("evaluations"), list) \
            or not data["evaluations"]:
        raise ConfigError(f"{path}: give a list under `evaluations:` (each entry with a `kind`: "
                          f"{', '.join(RESULT_FILES)})")
    unknown = sorted(set(data) - {"evaluations"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; only "
                          "`evaluations` is read")
    entries: list[SuiteEntry] = []
    for i, raw in enumerate(data["evaluations"], 1):
        where = f"{path}: evaluation {i}"
        if not isinstance(raw, dict) or raw.get("kind") not in RESULT_FILES:
            raise ConfigError(f"{where}: `kind` must be one of {', '.join(RESULT_FILES)}")
        raw = {str(k): v for k, v in raw.items()}
        kind, name = raw.pop("kind"), raw.pop("id", None)
        bad = sorted(set(raw) & RESERVED)
        if bad:
            raise ConfigError(f"{where}: {', '.join(bad)} is set by the suite (--model, "
                              "OUT/<entry>); remove it")
        for key, value in raw.items():
            scalars = value if isinstance(value, list) else [value]
            if not scalars or not all(isinstance(v, (str, int, float, bool)) or v is None
                                      for v in scalars):
                raise ConfigError(f"{where}: {key}: give a value or a list of values")
        grid = [k for k, v in raw.items() if isinstance(v, list) and k not in LIST_OPTIONS]
        for values in itertools.product(*(raw[k] for k in grid)):
            opts = {**raw, **dict(zip(grid, values))}
            entries.append(SuiteEntry(name or default_name(kind, opts, grid), kind, opts))
    names = [e.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: two evaluations would write to {', '.join(twice)}; give "
                          "one of them `id: NAME`")
    for n in names:
        if not _NAME.match(n):
            raise ConfigError(f"{path}: entry name {n!r} is not a plain folder name")
    return entries


def default_name(kind: str, opts: dict[str, Any], grid: Sequence[str]) -> str:
    """``probe_pretrained_f0.1``: the kind, a benchmark's name, and the expanded values."""
    parts = [kind]
    if kind == "benchmark":
        parts += [str(opts.get("name", "")), str(opts.get("protocol", "zeroshot"))]
    for k in grid:
        v = opts[k]
        parts.append(f"f{v:g}" if k == "fraction" and isinstance(v, (int, float)) else str(v))
    return "_".join(p for p in parts if p).replace("/", "-")


def model_card(model: str | Path) -> dict[str, Any]:
    """What the page says about the model: folder, weights hash, image size, steps."""
    model = Path(model)
    cfg = load_config(model / "config.yaml", saved=True)
    weights = model / "model.safetensors"
    step = model.name.removeprefix("step_") if model.name.startswith("step_") else None
    return {"model": str(model), "weights_sha256": file_sha256(weights) if weights.is_file()
            else None, "image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size,
            "vision_preset": cfg.vision.preset, "text_preset": cfg.text.preset,
            "text_max_length": cfg.text.max_length, "text_policy": cfg.data.text_policy,
            "train_steps": int(step) if step and step.isdigit() else cfg.train.steps}


def run_suite(model: str | Path, entries: Sequence[SuiteEntry], out_dir: Path,
              run: Callable[[list[str]], None], check: Callable[[list[str]], None],
              force: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Check every entry's command (``check``), run those without a result (``run``), and write
    ``suite.json`` and ``README.md``; returns the suite result."""
    log = log or (lambda s: print(s, file=sys.stderr))
    for e in entries:  # every command's options are checked before the first one runs
        check(e.argv(model, out_dir))
    card = model_card(model)
    results = []
    for i, e in enumerate(entries, 1):
        argv = e.argv(model, out_dir)
        js = out_dir / e.name / e.result_file
        done = out_dir / e.name / "suite_command.json"
        same = (js.is_file() and done.is_file() and
                json.loads(done.read_text()).get("argv") == argv)
        if same and not force:
            log(f"[{i}/{len(entries)}] {e.name}: result exists for this command; kept")
        else:
            log(f"[{i}/{len(entries)}] {e.name}: xlip {' '.join(argv)}")
            done.unlink(missing_ok=True)
            run(argv)
            write_atomic(done, json.dumps({"argv": argv}) + "\n")
        results.append(summarise(e, json.loads(js.read_text()), argv))
    suite = {"model": card, "evaluations": results,
             "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_atomic(out_dir / "suite.json", json.dumps(suite, indent=2) + "\n")
    write_atomic(out_dir / "README.md", readme(suite, out_dir))
    return suite


def _data_hashes(result: dict[str, Any]) -> dict[str, str]:
    """The sha256 of every manifest or list the result was computed on."""
    if "coverage" in result:  # a benchmark: the published lists' hashes
        return {f"list {n}": c["sha256"] for n, c in result["coverage"].items()}
    out = {}
    for key in ("split_sha256", "test_split_sha256"):
        if result.get(key):
            out[key.replace("_sha256", "")] = result[key]
    for key in ("manifest", "test_manifest"):
        path = result.get(key)
        if path and Path(path).is_file() and not out:
            out.setdefault(key, file_sha256(path))
    return out


def summarise(entry: SuiteEntry, result: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """One row of the page: the headline figure and everything needed to read it."""
    row = {"name": entry.name, "kind": entry.kind, "result_file": entry.result_file,
           "protocol": result.get("protocol", entry.kind), "command": "xlip " + " ".join(argv),
           "data": result.get("benchmark") or result.get("test_manifest") or
           result.get("manifest"), "split": ("test list" if "coverage" in result else
                                             result.get("test_split") or result.get("split")),
           "data_sha256": _data_hashes(result), "partial": result.get("partial"),
           "fraction": result.get("fraction"),
           "init": None if result.get("protocol") == "zeroshot" else result.get("init"),
           "prompts": result.get("prompt_set"), "mode": result.get("mode"),
           "n_test": result.get("n_test") or result.get("n_images")}
    if "mean_auc_by_set" in result:  # zeroshot --prompts all: one mean AUC per prompt set
        row["prompts"] = "all (" + ", ".join(result["mean_auc_by_set"]) + ")"
        row["mean_auc_by_set"] = result["mean_auc_by_set"]
        row["threshold"] = result.get("threshold_source")
    elif entry.kind == "retrieval":
        row["figures"] = {f"{d} R@{k}": result[d][f"R@{k}"]
                          for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    else:
        row["mean_auc"] = result.get("mean_auc")
        row["mean_auc_ci95"] = result.get("mean_auc_ci95")
        row["per_finding"] = {f: (v["auc"] if isinstance(v, dict) else v)
                              for f, v in (result.get("per_finding") or {}).items()}
        if "accuracy" in result:
            row["accuracy"] = result["accuracy"]
        if "threshold" in result and isinstance(result["threshold"], dict):
            row["threshold"] = result["threshold"].get("source")
    return row


def _figure(row: dict[str, Any]) -> str:
    if "mean_auc_by_set" in row:
        return "; ".join(f"{k} **{v:.3f}**" for k, v in row["mean_auc_by_set"].items())
    if "figures" in row:
        f = row["figures"]
        return (f"R@1/5/10 i→t {f['image_to_text R@1']:.3f} / {f['image_to_text R@5']:.3f} / "
                f"{f['image_to_text R@10']:.3f}; t→i {f['text_to_image R@1']:.3f} / "
                f"{f['text_to_image R@5']:.3f} / {f['text_to_image R@10']:.3f}")
    if row.get("mean_auc") is None:
        return "–"
    ci = row.get("mean_auc_ci95") or []
    text = f"**{row['mean_auc']:.3f}**"
    if len(ci) == 2 and all(isinstance(c, (int, float)) and c == c for c in ci):
        text += f" ({ci[0]:.3f}–{ci[1]:.3f})"
    if row.get("accuracy") is not None:
        text += f", ACC {row['accuracy']:.3f}"
    return text


def _setting(row: dict[str, Any]) -> str:
    bits = []
    if row.get("mode"):
        bits.append(row["mode"])
    if row.get("prompts"):
        bits.append(f"prompts {row['prompts']}")
    if row.get("fraction") is not None:
        bits.append(f"{100 * float(row['fraction']):g} % of training labels")
    if row.get("init"):
        bits.append(f"{row['init']} init")
    if row.get("threshold"):
        bits.append(f"threshold: {row['threshold']}")
    if row.get("partial"):
        bits.append("**partial**")
    return "; ".join(bits) or "–"


def readme(suite: dict[str, Any], out_dir: Path) -> str:
    """The model-card page."""
    m = suite["model"]
    lines = [f"# Evaluation of `{m['model']}`", "",
             f"Written by `xlip eval suite` on {suite['written']}. Model: weights sha256 "
             f"`{(m['weights_sha256'] or 'missing')[:16]}`, {m['train_steps']} pre-training steps, "
             f"image {m['image_size']} px (patch {m['patch_size']}), vision {m['vision_preset']}, "
             f"text {m['text_preset']} (max {m['text_max_length']} tokens, "
             f"{m['text_policy']}).", "",
             "Every figure is on the test rows named in its line, never used to choose anything: "
             "probe regularisation, fine-tuning's early stopping and zero-shot thresholds are "
             "chosen on validation rows. AUC: mean over findings, bootstrap 95 % CI.", "",
             "| evaluation | protocol | setting | data (split) | data sha256 | test images | "
             "result |", "|---|---|---|---|---|---|---|"]
    for r in suite["evaluations"]:
        hashes = ", ".join(f"{k} `{v[:12]}`" for k, v in r["data_sha256"].items()) or "–"
        lines.append(f"| [{r['name']}]({r['name']}/) | {r['protocol']} | {_setting(r)} | "
                     f"{r['data']} ({r['split']}) | {hashes} | {r['n_test'] or '–'} | "
                     f"{_figure(r)} |")
    for r in suite["evaluations"]:
        lines += ["", f"## {r['name']}", "", f"`{r['command']}`", ""]
        md = out_dir / r["name"] / r["result_file"].replace(".json", ".md")
        if md.is_file():  # the command's own page, below the entry's heading
            lines += [re.sub(r"^(#+) ", r"##\1 ", line) for line in
                      md.read_text().rstrip().splitlines()]
    return "\n".join(lines) + "\n"

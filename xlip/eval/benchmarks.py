"""Published benchmark splits: evaluate on exactly the images of BenchX's lists.

``xlip/benchmarks/benchx.json`` names each benchmark (dataset, task, classes, where its labels
come from, where to download it, which ``xlip data prepare`` adapter reads it) and, per list
(``test``, ``val``, ``train``, ``train_10``, ``train_1``), the shipped file, its number of ids and
the sha256 of its uncompressed text. A list whose hash differs is refused.

:func:`select_rows` reads the dataset as downloaded through its adapter, keeps the rows whose id
is in a list and counts **coverage**: K of the N listed images found. A result on fewer images than
listed is ``partial``. The zero-shot protocol scores the ``test`` rows (:func:`score_records`);
the linear probe trains on ``train`` / ``train_10`` / ``train_1`` (``fraction`` 100 / 10 / 1),
chooses its regularisation on ``val`` and tests on ``test`` (:func:`fit_probe`); fine-tuning
trains on the same list, stops early on ``val`` and tests on ``test`` (:func:`fit_finetune`).
Labels: a row is positive for a class when its ``labels`` hold it, else negative.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from xlip.config import Config
from xlip.data.adapters import PrepareOptions, prepare
from xlip.data.adapters.common import IMAGE_SUFFIXES, read_csv
from xlip.data.manifest import COLUMNS, Record, load_manifest
from xlip.errors import XlipError
from xlip.eval.finetune import FinetuneOptions, fit_finetune
from xlip.eval.finetune import markdown as finetune_markdown
from xlip.eval.probe import ProbeOptions, check_disjoint, fit_probe, pooled_features
from xlip.eval.probe import markdown as probe_markdown
from xlip.eval.zeroshot import markdown_table, score_records

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
MANIFEST = "benchx.json"
PROTOCOLS = ("zeroshot", "probe", "finetune")
TRAIN_LISTS = {100: "train", 10: "train_10", 1: "train_1"}  # --fraction → list
LIST_SPLITS = {"test": "test", "val": "valid", "train": "train", "train_10": "train",
               "train_1": "train"}  # list → manifest split


class BenchmarkError(XlipError, ValueError):
    """An unknown or unsupported benchmark, a changed list file, or a bad benchmark option."""


@dataclass(frozen=True)
class ListSpec:
    """One shipped id list: ``file`` relative to the benchmarks folder."""

    name: str
    file: str
    ids: int  # distinct ids
    sha256: str  # of the uncompressed text


@dataclass(frozen=True)
class Benchmark:
    """A benchmark definition of ``benchx.json``."""

    name: str
    dataset: str
    task: str  # multi-label | binary | multi-class | detection
    classes: tuple[str, ...]
    ids: str  # what an id is
    labels: str  # where the labels come from
    download: str
    adapter: str | None  # the ``xlip data prepare`` adapter; None: not evaluable yet
    unsupported: str  # why not, when adapter is None
    lists: dict[str, ListSpec]
    root: Path  # the folder holding benchx.json
    note: str = ""  # how BenchX uses the lists, where xlip evaluates them differently

    def describe(self) -> dict[str, Any]:
        """What ``xlip eval benchmarks --json`` prints for this benchmark."""
        return {"name": self.name, "dataset": self.dataset, "task": self.task,
                "classes": list(self.classes), "ids": self.ids, "labels": self.labels,
                "download": self.download, "adapter": self.adapter,
                "evaluable": self.adapter is not None, "unsupported": self.unsupported,
                "note": self.note,
                "lists": {n: {"file": s.file, "ids": s.ids, "sha256": s.sha256,
                              "hash_ok": list_hash(self.root / s.file) == s.sha256}
                          for n, s in self.lists.items()}}


def load_benchmarks(root: Path = BENCHMARKS_DIR) -> dict[str, Benchmark]:
    """Every benchmark of ``root/benchx.json``, by name."""
    path = root / MANIFEST
    if not path.is_file():
        raise BenchmarkError(f"{path}: the benchmark manifest is missing; reinstall xlip "
                             "(pip install -e .) or restore it with git checkout")
    data = json.loads(path.read_text())
    out = {}
    for name, d in data["benchmarks"].items():
        lists = {n: ListSpec(n, s["file"], int(s["ids"]), s["sha256"])
                 for n, s in d["lists"].items()}
        out[name] = Benchmark(name, d["dataset"], d["task"], tuple(d["classes"]), d["ids"],
                              d["labels"], d["download"], d.get("adapter"),
                              d.get("unsupported", ""), lists, root, d.get("note", ""))
    return out


def get_benchmark(name: str, root: Path = BENCHMARKS_DIR) -> Benchmark:
    benchmarks = load_benchmarks(root)
    if name not in benchmarks:
        raise BenchmarkError(f"unknown benchmark {name!r}; `xlip eval benchmarks` lists them: "
                             f"{', '.join(benchmarks)}")
    return benchmarks[name]


def _unzip(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise BenchmarkError(f"{path}: damaged list file ({type(err).__name__}: {err}); restore "
                             "it (git checkout, or reinstall xlip)") from None


def list_hash(path: Path) -> str:
    """sha256 of the uncompressed text of a ``.txt.gz`` list ('' when the file is missing)."""
    return hashlib.sha256(_unzip(path)).hexdigest() if path.is_file() else ""


def read_list(bench: Benchmark, name: str) -> list[str]:
    """The distinct ids of list ``name``, in file order, after checking its sha256."""
    if name not in bench.lists:
        raise BenchmarkError(f"{bench.name}: no list {name!r}; its lists are "
                             f"{', '.join(bench.lists)}")
    spec = bench.lists[name]
    path = bench.root / spec.file
    if not path.is_file():
        raise BenchmarkError(f"{path}: list file missing; reinstall xlip or restore it with "
                             "git checkout")
    text = _unzip(path)
    digest = hashlib.sha256(text).hexdigest()
    if digest != spec.sha256:
        raise BenchmarkError(f"{path}: sha256 {digest[:12]}… differs from {spec.sha256[:12]}… "
                             f"in {bench.root / MANIFEST}: the published list was changed; "
                             "restore it (git checkout, or reinstall xlip)")
    return list(dict.fromkeys(text.decode().split()))


def id_key(image_id: str) -> str:
    """An id as rows are matched: without an image suffix (``00011997_000.png`` → its stem)."""
    stem, dot, suffix = image_id.rpartition(".")
    return stem if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES else image_id


@dataclass(frozen=True)
class BenchmarkOptions:
    """What :func:`run_benchmark` evaluates."""

    name: str
    data_root: str | Path  # the dataset as downloaded (what ``xlip data prepare`` reads)
    protocol: str = "zeroshot"  # zeroshot | probe | finetune
    fraction: int = 100  # probe, finetune: train list 100 → train, 10 → train_10, 1 → train_1
    init: str = "pretrained"  # probe, finetune: pretrained | random
    seed: int = 0  # probe, finetune: as their --seed
    training: tuple[tuple[str, Any], ...] = ()  # finetune: FinetuneOptions fields (steps, lr..)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise BenchmarkError(f"--protocol {self.protocol!r}: use zeroshot, probe or "
                                 "finetune")
        if self.fraction not in TRAIN_LISTS:
            raise BenchmarkError(f"--fraction {self.fraction}: use 100, 10 or 1 (the "
                                 "published train, train_10 and train_1 lists)")

    def lists(self) -> tuple[str, ...]:
        """The lists this protocol reads, test first."""
        if self.protocol == "zeroshot":
            return ("test",)
        return ("test", "val", TRAIN_LISTS[self.fraction])


def evaluable(bench: Benchmark) -> Benchmark:
    """``bench``, or a BenchmarkError saying what is missing to evaluate it."""
    if bench.adapter is None:
        raise BenchmarkError(f"benchmark {bench.name} is listed but cannot be evaluated yet: "
                             f"{bench.unsupported}")
    if bench.task not in ("multi-label", "binary"):
        raise BenchmarkError(f"benchmark {bench.name}: a {bench.task} task; only multi-label "
                             "and binary benchmarks are evaluated yet")
    return bench


def select_rows(bench: Benchmark, data_root: str | Path, lists: Sequence[str]
                ) -> tuple[dict[str, list[Record]], dict[str, dict[str, Any]]]:
    """The adapter's rows of each list (in list order) and each list's coverage.

    Coverage per list: ``listed`` ids, ``found`` rows, and for the ids not found how many of
    each reason (the adapter's reject reason, 'not in the label file', or an id that several of
    the adapter's rows share: which image the list means is unknown).
    """
    ids = {name: read_list(bench, name) for name in lists}  # hashes first, before the data
    with tempfile.TemporaryDirectory(prefix="xlip-benchmark-") as tmp:
        opt = PrepareOptions(views="all", verify="exists", workers=1)
        summary = prepare(evaluable(bench).adapter, data_root, tmp, opt)
        records = load_manifest(Path(tmp) / "manifest.csv", verify_images=False) \
            if summary.kept else []
        why = {id_key(r["id"]): r["reason"] for _, r in read_csv(Path(tmp) / "rejects.csv")}
    shared = Counter(r.study_id for r in records)
    by_key = {r.study_id: r for r in records if shared[r.study_id] == 1}
    why.update({k: f"ambiguous id ({n} images share it)" for k, n in shared.items() if n > 1})
    rows, coverage = {}, {}
    for name, listed in ids.items():
        keys = [id_key(i) for i in listed]
        split = LIST_SPLITS[name]
        rows[name] = [_with_split(by_key[k], split) for k in keys if k in by_key]
        missing = [i for i, k in zip(listed, keys) if k not in by_key]
        reasons = Counter(why.get(id_key(i), "not in the label file") for i in missing)
        coverage[name] = {"listed": len(listed), "found": len(rows[name]),
                          "sha256": bench.lists[name].sha256,
                          "missing_reasons": dict(reasons.most_common()),
                          "missing_examples": missing[:5]}
    return rows, coverage


def _with_split(r: Record, split: str) -> Record:
    return Record(r.row, r.image, r.text, r.labels, split, r.patient_id, r.study_id, r.view,
                  r.source, r.negatives)


def write_rows(path: Path, rows: Sequence[Record]) -> None:
    """The evaluated rows as a manifest (absolute image paths), for the record."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS + ("negative_labels",))
        for r in rows:
            w.writerow([r.image, r.text, ";".join(r.labels), r.split, r.patient_id, r.study_id,
                        r.view, r.source, ";".join(r.negatives)])


def usable_classes(bench: Benchmark, groups: Sequence[Sequence[Record]]
                   ) -> tuple[list[str], dict[str, str]]:
    """Classes with positive and negative rows in every group, and why the others are left out."""
    keep, skipped = [], {}
    for c in bench.classes:
        counts = [(sum(c in r.labels for r in g), len(g)) for g in groups]
        if all(0 < pos < n for pos, n in counts):
            keep.append(c)
        else:
            skipped[c] = "one class only (" + ", ".join(f"{p} of {n} positive"
                                                        for p, n in counts) + ")"
    return keep, skipped


def run_benchmark(model, tokenizer, cfg: Config, opt: BenchmarkOptions, out_dir: Path,
                  model_path: str = "", root: Path = BENCHMARKS_DIR) -> dict[str, Any]:
    """Select the listed rows, evaluate, and write ``out_dir/benchmark.json`` / ``.md`` and
    ``benchmark_manifest.csv`` (the rows evaluated); returns the result dict. ``model_path``:
    where the model came from, for the record."""
    bench = evaluable(get_benchmark(opt.name, root))
    rows, coverage = select_rows(bench, opt.data_root, opt.lists())
    empty = [n for n in opt.lists() if not rows[n]]
    if empty:
        raise BenchmarkError(f"{opt.data_root}: none of the images of list(s) "
                             f"{', '.join(empty)} of {bench.name} found by the {bench.adapter} "
                             f"adapter ({_reasons(coverage[empty[0]])}); pass the folder "
                             f"{bench.dataset} was downloaded to ({bench.download})")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rows(out_dir / "benchmark_manifest.csv", [r for n in opt.lists() for r in rows[n]])
    groups = [rows[n] for n in opt.lists()]
    classes, skipped = usable_classes(bench, groups)
    if not classes:
        why = "; ".join(f"{c}: {w}" for c, w in skipped.items())
        raise BenchmarkError(f"{bench.name}: no class has positive and negative images in "
                             f"{' and '.join(opt.lists())} ({why}); more of the dataset is "
                             "needed under --data-root")
    if opt.protocol == "zeroshot":
        result = score_records(model, tokenizer, cfg, rows["test"], classes)
    else:
        result = _trained(model, cfg, opt, rows, classes, out_dir)
    result.update({
        "benchmark": bench.name, "dataset": bench.dataset, "task": bench.task,
        "protocol": {"probe": "linear_probe"}.get(opt.protocol, opt.protocol),
        "data_root": str(opt.data_root), "coverage": coverage,
        "partial": any(c["found"] < c["listed"] for c in coverage.values()),
        "skipped_classes": skipped, "model": model_path, "init": opt.init,
        "source": "BenchX (github.com/yangzhou12/BenchX, b874fa6)"})
    (out_dir / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "benchmark.md").write_text(markdown(result))
    return result


def _trained(model, cfg: Config, opt: BenchmarkOptions, rows: dict[str, list[Record]],
             classes: list[str], out_dir: Path) -> dict[str, Any]:
    """The linear probe or fine-tuning on the published train / val / test lists."""
    train_list, manifest = TRAIN_LISTS[opt.fraction], out_dir / "benchmark_manifest.csv"
    kind = FinetuneOptions if opt.protocol == "finetune" else ProbeOptions
    popt = kind(manifest, manifest, train_list, "val", "test", opt.fraction / 100, opt.init,
                tuple(classes), opt.seed, **dict(opt.training))
    train, val, test = rows[train_list], rows["val"], rows["test"]
    check_disjoint({"training": train, "validation": val, "test": test})
    if isinstance(popt, FinetuneOptions):
        return fit_finetune(model, cfg, popt, train, val, test, "the published val list",
                            cfg.eval.bootstrap, out_dir / "finetune.safetensors", progress=True)
    feats = [pooled_features(model, [r.image for r in g], cfg, progress=f"features {name}")
             for name, g in ((train_list, train), ("val", val), ("test", test))]
    return fit_probe(popt, train, val, test, *feats, "the published val list",
                     cfg.eval.bootstrap)


def _reasons(cov: dict[str, Any]) -> str:
    return ", ".join(f"{n:,} {why}" for why, n in cov["missing_reasons"].items()) or "none listed"


def title(result: dict[str, Any]) -> str:
    """``Benchmark nih-cxr14, zeroshot (partial: 493 of 22,433 test images)``."""
    test = result["coverage"]["test"]
    what = (f"partial: {test['found']:,} of {test['listed']:,} test images" if result["partial"]
            else f"complete: {test['listed']:,} test images")
    return f"Benchmark {result['benchmark']}, {result['protocol']} ({what})"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# {title(result)}", "",
             f"{result['dataset']} ({result['task']}) from {result['data_root']}; lists of "
             f"{result['source']}.", "",
             "| list | found | listed | missing (why) | sha256 |", "|---|---|---|---|---|"]
    for name, c in result["coverage"].items():
        lines.append(f"| {name} | {c['found']:,} | {c['listed']:,} | {_reasons(c)} | "
                     f"`{c['sha256'][:12]}` |")
    lines.append("")
    if result["protocol"] == "zeroshot":
        lines.append(markdown_table(result))
    elif result["protocol"] == "finetune":
        lines.append(finetune_markdown(result).replace("# ", "## ", 1))
    else:
        lines.append(probe_markdown(result).replace("# ", "## ", 1))
    if result["skipped_classes"]:
        lines.append("Left out: " + "; ".join(f"{c}: {w}" for c, w in
                                              result["skipped_classes"].items()))
    return "\n".join(lines).rstrip() + "\n"


def listing(root: Path = BENCHMARKS_DIR) -> str:
    """What ``xlip eval benchmarks`` prints."""
    out = []
    for b in load_benchmarks(root).values():
        d = b.describe()
        lists = ", ".join(f"{n} {s['ids']:,}" + ("" if s["hash_ok"] else " (CHANGED)")
                          for n, s in d["lists"].items())
        state = (f"adapter {b.adapter}" if b.adapter else f"not evaluable yet: {b.unsupported}")
        out += [f"{b.name}: {b.dataset}, {b.task}, {len(b.classes)} classes ({state})",
                f"  classes:  {', '.join(b.classes)}",
                f"  lists:    {lists}",
                "  sha256:   " + ", ".join(f"{n} {s['sha256'][:12]}" for n, s in
                                            d["lists"].items()),
                f"  ids:      {b.ids}", f"  labels:   {b.labels}", f"  download: {b.download}"]
        out += [f"  note:     {b.note}"] if b.note else []
    src = json.loads((root / MANIFEST).read_text())["source"]
    out.append(f"lists of {src['name']} ({src['repo']}, commit {src['commit']}, "
               f"{src['licence']} licence: {root / src['licence_file']})")
    return "\n".join(out)

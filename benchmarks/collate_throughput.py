"""Samples/s of the training collator (:class:`xlip.data.collate.Collator`) at batch 256.

Samples are drawn as training draws them (``MixedBatchSampler`` over a paired and an
image-only source of one manifest, demo weights 0.65 / 0.35, 4 negative prompt findings) and
built once, images included, before any timing: only ``Collator.__call__`` is timed. One
collator collates ``--batches`` batches of distinct draws ("first pass": nearly every text is
new to it), then the same rows again with other seeds ("second pass": as in a later epoch, the
reports come again, the prompts are drawn anew). ``--rev REV`` also times the collator of a git
revision (``git archive REV`` into a temporary folder, the same script run there) in the same
run, the two alternating ``--repeat`` times; the medians are reported. ``--profile N`` prints
the top N functions of a cProfile of the first pass instead.

    python benchmarks/collate_throughput.py MANIFEST TOKENIZER_DIR --rev main \
        --out benchmarks/results/collate_cpu.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(manifest: str, tokenizer: str, batch: int, image_size: int):
    from xlip.config import from_dict
    from xlip.data.collate import Collator
    from xlip.data.dataset import MixedDataset
    from xlip.text.tokenizer import load_tokenizer

    cfg = from_dict({
        "data": {"sources": [{"manifest": manifest, "kind": "paired", "weight": 0.65},
                             {"manifest": manifest, "kind": "image_only", "weight": 0.35}],
                 "batch_size": batch, "num_workers": 0, "verify_images": False,
                 "prompt_negatives": 4},
        "text": {"tokenizer": tokenizer, "max_length": 128},
        "vision": {"image_size": image_size}})
    dataset = MixedDataset(cfg, train=True)
    return cfg, dataset, lambda: Collator(cfg, load_tokenizer(tokenizer), train=True,
                                          findings=dataset.findings())


def draws(cfg, dataset, start: int, n: int) -> list[list]:
    from xlip.data.sampler import MixedBatchSampler

    sampler = MixedBatchSampler([len(r) for r in dataset.records],
                                [s.weight for s in cfg.data.sources], cfg.data.batch_size,
                                seed=0, start_step=start, steps=start + n)
    return [[dataset[i] for i in items] for items in sampler]


def timed(collate, batches) -> float:
    """Samples/s over ``batches``."""
    t = time.perf_counter()
    for b in batches:
        collate(b)
    return sum(map(len, batches)) / (time.perf_counter() - t)


def measure(args) -> dict:
    cfg, dataset, make = build(args.manifest, args.tokenizer, args.batch, args.image_size)
    first = draws(cfg, dataset, 0, args.batches)
    second = [[replace(s, seed=s.seed + 1) for s in b] for b in first]
    make()(first[0][:8])  # imports, tokenizer and lexicon loaded before timing
    if args.profile:
        prof = cProfile.Profile()
        collate = make()
        prof.runcall(lambda: [collate(b) for b in first])
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(args.profile)
    out = {"first_pass": [], "second_pass": []}
    for _ in range(args.repeat):
        collate = make()
        out["first_pass"].append(timed(collate, first))
        out["second_pass"].append(timed(collate, second))
    return out


def run_rev(rev: str, argv: list[str]) -> dict:
    """This script's ``measure`` on the code of git revision ``rev``, in a subprocess."""
    with tempfile.TemporaryDirectory(prefix="xlip_rev_") as tmp:
        archive = Path(tmp) / "src.tar"
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "xlip"],
                       check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp)
        env = dict(os.environ, PYTHONPATH=tmp)
        res = subprocess.run([sys.executable, __file__, *argv, "--repeat", "1", "--json"],
                             env=env, check=True, capture_output=True, text=True)
        return json.loads(res.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("manifest")
    p.add_argument("tokenizer", help="folder of tokenizer.json")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=4, help="batches per pass")
    p.add_argument("--image-size", type=int, default=224, help="the base preset's")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rev", default="", help="also time this git revision's collator")
    p.add_argument("--profile", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the raw figures (internal)")
    p.add_argument("--out", default="", help="JSON file; a .md beside it")
    args = p.parse_args()
    base = [args.manifest, args.tokenizer, "--batch", str(args.batch),
            "--batches", str(args.batches), "--image-size", str(args.image_size)]
    if args.json or args.profile:
        print(json.dumps(measure(args)))
        return
    runs: dict[str, dict] = {"this tree": {"first_pass": [], "second_pass": []}}
    if args.rev:
        runs[args.rev] = {"first_pass": [], "second_pass": []}
    for _ in range(args.repeat):  # alternate, so that load on the machine hits both alike
        for name in runs:
            r = run_rev(name, base) if name == args.rev else measure(
                argparse.Namespace(**{**vars(args), "repeat": 1, "profile": 0}))
            for k in r:
                runs[name][k] += r[k]
    rows = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in runs.items()}
    result = {"batch_size": args.batch, "batches_per_pass": args.batches,
              "image_size": args.image_size,
              "repeat": args.repeat, "manifest": args.manifest,
              "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
              "samples_per_s": rows, "raw": runs}
    if args.rev:  # ratios of runs made side by side, then their median
        mine, theirs = runs["this tree"], runs[args.rev]
        result["speedup_over_rev"] = {
            k: statistics.median(a / b for a, b in zip(mine[k], theirs[k])) for k in mine}
    lines = [f"batch {args.batch}, {args.image_size} px images, {args.batches} batches per pass, "
             f"median of {args.repeat} runs", "",
             "| code | first pass samples/s | second pass samples/s |", "|---|---|---|"]
    lines += [f"| {n} | {r['first_pass']:.0f} | {r['second_pass']:.0f} |"
              for n, r in rows.items()]
    if args.rev:
        sp = result["speedup_over_rev"]
        lines += ["", f"this tree / {args.rev} (median of the side-by-side ratios): first pass "
                  f"**{sp['first_pass']:.2f}x**, second pass **{sp['second_pass']:.2f}x**"]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

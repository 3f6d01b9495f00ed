"""The report labeller (``xlip text label``) on real reports: Indiana University chest X-ray.

Reference: the ``labels`` column of ``../shared/data/iu_reports/reports.csv`` (the MeSH "problem"
terms that IU's indexers assigned to each report), mapped to canonical findings with
:func:`xlip.text.labels.canonical_label`. MeSH terms that are not a finding (anatomy such as
``Lung`` or ``Spine``, ``Calcinosis``, ``Cicatrix``, ``Technical Quality of Image
Unsatisfactory``, ...) have no canonical name and are left out of the reference; the script lists
them with their counts. Prediction: the labeller's ``labels`` (present) column; uncertain
mentions count as negative unless ``--uncertain-positive``.

Reports per-finding precision / recall / F1 for every finding with at least ``--min-count``
reference positives, and their macro mean.

    python benchmarks/iu_labeller.py [--reports PATH] [--min-count 20] [--out results.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xlip.text.labeller import label_csv  # noqa: E402
from xlip.text.labels import CANONICAL_FINDINGS, UnknownLabelError, canonical_label  # noqa: E402

SHARED_DATA = Path(os.environ.get("XLIP_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_REPORTS = SHARED_DATA / "iu_reports" / "reports.csv"


def reference(field: str, ignored: Counter) -> set[str]:
    out = set()
    for term in filter(None, (t.strip() for t in field.split(";"))):
        try:
            out.add(canonical_label(term))
        except UnknownLabelError:
            ignored[term] += 1
    return out - {"No Finding"}


def prf(gold: list[set[str]], pred: list[set[str]], finding: str) -> dict:
    tp = sum(finding in g and finding in p for g, p in zip(gold, pred))
    fp = sum(finding not in g and finding in p for g, p in zip(gold, pred))
    fn = sum(finding in g and finding not in p for g, p in zip(gold, pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": tp + fn, "tp": tp, "fp": fp, "fn": fn,
            "precision": precision, "recall": recall, "f1": f1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reports", default=str(DEFAULT_REPORTS))
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--min-count", type=int, default=20)
    ap.add_argument("--uncertain-positive", action="store_true")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if not Path(args.reports).is_file():
        print(f"{args.reports} not found (the shared IU reports)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "labelled.csv"
        start = time.perf_counter()
        summary = label_csv(args.reports, out, args.text_column, prefix="ner_")
        seconds = time.perf_counter() - start
        with out.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))

    ignored: Counter = Counter()
    gold = [reference(r["labels"], ignored) for r in rows]
    pred = []
    for r in rows:
        p = set(filter(None, r["ner_labels"].split(";")))
        if args.uncertain_positive:
            p |= set(filter(None, r["ner_uncertain_labels"].split(";")))
        pred.append(p - {"No Finding"})
    counts = Counter(f for g in gold for f in g)
    findings = [f for f in CANONICAL_FINDINGS if counts[f] >= args.min_count]
    per = {f: prf(gold, pred, f) for f in findings}
    macro = sum(d["f1"] for d in per.values()) / len(per)

    print(f"{len(rows)} reports ({summary.empty} with empty text), labelled in {seconds:.1f} s\n")
    print("| finding | n | precision | recall | F1 |\n|---|---|---|---|---|")
    for f, d in sorted(per.items(), key=lambda kv: -kv[1]["n"]):
        print(f"| {f} | {d['n']} | {d['precision']:.3f} | {d['recall']:.3f} | {d['f1']:.3f} |")
    print(f"| **macro** | | | | **{macro:.3f}** |\n")
    rare = {f: counts[f] for f in CANONICAL_FINDINGS if 0 < counts[f] < args.min_count}
    print(f"findings under {args.min_count} reference positives (not scored): {rare}")
    print(f"MeSH terms without a canonical finding (left out of the reference): "
          f"{len(ignored)} terms, most common {ignored.most_common(8)}")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"reports": len(rows), "macro_f1": macro, "per_finding": per,
             "min_count": args.min_count, "uncertain_positive": args.uncertain_positive,
             "seconds": seconds, "ignored_terms": dict(ignored)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

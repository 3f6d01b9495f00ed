"""Zero-shot mean AUC against training compute: CLIP (with the label prompts) and the demo
config's XLIP step (the lean step), from the ablation results committed under
``benchmarks/results/``; plain CLIP (image–report pairs only) as one point.

Every run: the demo corpus and config, one thread, two runs side by side on a 2-core AMD EPYC
with AVX512-BF16 (bf16), seeds 4–8 (plain CLIP: 4–6). Compute is steps × the FLOPs
of one step as ``xlip.flops`` counts them today on the demo's batches (XLIP 36.4 G, CLIP
26.0 G, plain CLIP 23.5 G). ``ablation_demo_lean_cpu.json``'s runs (code of fc2ea07) came before
the clean texts ran in length groups, which cut 3.6 GFLOP of padding from both steps; its
points are placed by today's count too, so its CLIP at 758 steps, matched to XLIP's 560 by the
count of its day, stands at 19.7 TFLOP against XLIP's 20.4.

    python benchmarks/compute_curve.py --out benchmarks/results/figures/compute_curve.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# (file, run key, curve): per-seed zero-shot AUCs of one run kind
SOURCES = [
    ("ablation_demo_lean_cpu.json", "clip@560", "clip"),
    ("ablation_demo_lean_cpu.json", "clip@758", "clip"),
    ("ablation_demo_lean_cpu.json", "xlip_tok_w64@560", "xlip"),
    ("ablation_demo_budget_5seeds.json", "clip", "clip"),
    ("ablation_demo_budget_5seeds.json", "xlip_lean", "xlip"),
    ("ablation_demo_budget2x.json", "clip", "clip"),
    ("ablation_demo_budget2x.json", "xlip", "xlip"),
    ("ablation_demo_plain_clip.json", "clip-no_prompts", "plain"),
]
GFLOP = {"clip": 25.97, "xlip": 36.41, "plain": 23.54}  # per step, today's count
LABEL = {"clip": "CLIP with the label prompts", "xlip": "XLIP (the demo config's step)",
         "plain": "plain CLIP (pairs only)"}


def seed_aucs(data: dict, key: str) -> tuple[int, list[float]]:
    """(steps, per-seed zero-shot AUCs) of run ``key`` in an ablation's JSON: its ``runs``
    rows (gathered tables) or its ``variants`` (``xlip ablate``'s own file)."""
    if "runs" in data and isinstance(data["runs"], list):
        rows = [r for r in data["runs"] if r["run"] == key]
        return int(key.split("@")[1]), [r["zeroshot"] for r in rows]
    v = data["variants"][key]
    return int(v["steps"]), [s["mean_auc"] for s in v["seeds"]]


def points(results: Path = RESULTS) -> list[dict]:
    out = []
    for name, key, curve in SOURCES:
        steps, aucs = seed_aucs(json.loads((results / name).read_text()), key)
        out.append({"curve": curve, "steps": steps, "tflop": steps * GFLOP[curve] / 1000,
                    "mean": statistics.fmean(aucs), "sd": statistics.stdev(aucs),
                    "seeds": len(aucs), "aucs": aucs, "source": name})
    return sorted(out, key=lambda p: (p["curve"], p["tflop"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for curve, color, marker in (("clip", "tab:blue", "o"), ("xlip", "tab:red", "s"),
                                 ("plain", "tab:gray", "^")):
        mine = [p for p in pts if p["curve"] == curve]
        xs = [p["tflop"] for p in mine]
        ax.errorbar(xs, [p["mean"] for p in mine], yerr=[p["sd"] for p in mine], color=color,
                    marker=marker, capsize=3, label=LABEL[curve])
        for p in mine:
            ax.scatter([p["tflop"]] * len(p["aucs"]), p["aucs"], color=color, s=8, alpha=0.35)
    ax.axvline(34.1, color="0.6", lw=0.8, ls=":")
    ax.text(34.6, 0.955, "the demo's compute", fontsize=8, color="0.4")
    ax.set_xlabel("training compute (TFLOP, forward and backward)")
    ax.set_ylabel("zero-shot mean AUC (9 findings)")
    ax.set_title("Demo corpus: XLIP against CLIP at equal compute (mean ± sd over seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    for p in pts:
        print(f"{LABEL[p['curve']]:32s} {p['steps']:5d} steps {p['tflop']:5.1f} TFLOP "
              f"{p['mean']:.3f} ± {p['sd']:.3f} ({p['seeds']} seeds; {p['source']})")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()

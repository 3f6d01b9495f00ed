"""``xlip eval ...``: the evaluation commands' arguments and handlers (the rest of the ``xlip``
command is xlip.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xlip.config import ConfigError
from xlip.eval import FINETUNE_STEPS
from xlip.files import writable_dir


def _model_and_manifest(args: argparse.Namespace):
    """The model of ``--model`` and the manifest to evaluate on: ``--manifest``, else the
    model's ``data.eval_manifest``."""
    from xlip.api import XLIP

    m = XLIP.from_pretrained(args.model)
    manifest = args.manifest or m.cfg.data.eval_manifest
    if not manifest:
        raise ConfigError("no manifest to evaluate on: pass --manifest or set the model's "
                          "data.eval_manifest")
    return m, manifest


def _encoder(m, args: argparse.Namespace):
    """The model whose image encoder is evaluated: the pre-trained one, or with ``--init
    random`` the same architecture untrained (seeded by ``--seed``)."""
    return m.model if args.init == "pretrained" else m.untrained(args.seed).model


def _zeroshot(args: argparse.Namespace) -> int:
    from xlip.eval.zeroshot import ZeroShotOptions, run_zeroshot, write_zeroshot

    m, manifest = _model_and_manifest(args)
    cfg = m.cfg
    options = ZeroShotOptions.from_config(cfg, manifest, args.split, args.findings,
                                          prompt_set=args.prompts, mode=args.mode,
                                          val_split=args.val_split)  # refused before any work
    out = writable_dir(args.out or args.model, "--out")  # before the encoding, not after
    scored = run_zeroshot(m.model, m.tokenizer, cfg, options, progress=True)
    for s in scored:
        s.result["model"], s.result["text_policy"] = str(args.model), cfg.data.text_policy
    js, md, *png = write_zeroshot(scored, out, plots=not args.no_plots)
    print(md.read_text())
    print("written: " + " ".join(map(str, [js, md, *png])))
    return 0


def _on_benchmark(args: argparse.Namespace, protocol: str, training: dict) -> int | None:
    """``xlip eval probe|finetune --benchmark NAME --data-root DIR``: the published lists, as
    ``xlip eval benchmark NAME --protocol P`` (None when no --benchmark is given)."""
    if not args.benchmark:
        if args.data_root:
            raise ConfigError("--data-root goes with --benchmark NAME; for a manifest give "
                              "--manifest")
        return None
    flag = f"--benchmark {args.benchmark}"
    clash = [f for f, given in (("--manifest", args.manifest),
                                ("--test-manifest", args.test_manifest),
                                ("--findings", args.findings),
                                ("--split", args.split != "train"),
                                ("--val-split", args.val_split != "valid"),
                                ("--test-split", args.test_split != "test")) if given]
    if clash:
        raise ConfigError(f"{flag} reads the published lists and classes: drop "
                          f"{', '.join(clash)}")
    if not args.data_root:
        raise ConfigError(f"{flag} needs --data-root DIR (the dataset as downloaded)")
    percent = {0.01: 1, 0.1: 10, 1.0: 100}.get(args.fraction)
    if percent is None:
        raise ConfigError(f"--fraction {args.fraction:g} with {flag}: the published lists "
                          "are 0.01, 0.1 and 1 (train_1, train_10, train)")
    out = args.out or Path(args.model) / f"{protocol}_{args.benchmark}_{args.init}_{percent}"
    return _benchmark(argparse.Namespace(
        name=args.benchmark, model=args.model, data_root=args.data_root, protocol=protocol,
        fraction=percent, init=args.init, seed=args.seed, out=out, training=training))


def _probe(args: argparse.Namespace) -> int:
    from xlip.eval.probe import ProbeOptions, linear_probe, markdown, write_probe

    done = _on_benchmark(args, "probe", {})
    if done is not None:
        return done
    m, manifest = _model_and_manifest(args)
    opt = ProbeOptions(manifest, args.test_manifest, args.split, args.val_split,
                       args.test_split, args.fraction, args.init,
                       tuple(args.findings or ()), args.seed)
    out = writable_dir(args.out or Path(args.model) / f"probe_{args.init}_{args.fraction:g}",
                       "--out")
    model = _encoder(m, args)
    result = linear_probe(model, m.cfg, opt, progress=True)
    result["model"] = str(args.model)
    js, md = write_probe(result, out)
    print(markdown(result))
    print(f"written: {js} {md}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from xlip.eval.finetune import FinetuneOptions, finetune, markdown, write_finetune

    training = dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                    eval_every=args.eval_every, patience=args.patience,
                    head_lr_scale=args.head_lr_scale)
    done = _on_benchmark(args, "finetune", training)
    if done is not None:
        return done
    m, manifest = _model_and_manifest(args)
    opt = FinetuneOptions(manifest, args.test_manifest, args.split, args.val_split,
                          args.test_split, args.fraction, args.init, tuple(args.findings or ()),
                          args.seed, **training)
    out = writable_dir(args.out, "--out")
    model = _encoder(m, args)
    result = finetune(model, m.cfg, opt, out / "finetune.safetensors", progress=not args.quiet)
    result["model"] = str(args.model)
    js, md = write_finetune(result, out)
    print(markdown(result))
    print(f"written: {js} {md} {out / 'finetune.safetensors'}")
    return 0


def _benchmarks(args: argparse.Namespace) -> int:
    from xlip.eval.benchmarks import listing, load_benchmarks

    if args.json:
        print(json.dumps([b.describe() for b in load_benchmarks().values()], indent=2))
    else:
        print(listing())
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from xlip.api import XLIP
    from xlip.eval.benchmarks import (BenchmarkOptions, evaluable, get_benchmark, markdown,
                                      run_benchmark)

    if args.fraction is not None and args.protocol == "zeroshot":
        raise ConfigError("--fraction applies to --protocol probe and finetune only (zero-shot "
                          "uses no training labels)")
    if args.init == "random" and args.protocol == "zeroshot":
        raise ConfigError("--init random applies to --protocol probe and finetune: an "
                          "untrained model's zero-shot scores are chance by construction")
    opt = BenchmarkOptions(args.name, args.data_root, args.protocol, args.fraction or 100,
                           args.init, args.seed, tuple(getattr(args, "training", {}).items())
                           )  # a bad protocol or fraction is refused here, first
    evaluable(get_benchmark(args.name))  # and an unsupported benchmark before loading the model
    out = writable_dir(args.out, "--out")
    m = XLIP.from_pretrained(args.model)
    model = _encoder(m, args)
    result = run_benchmark(model, m.tokenizer, m.cfg, opt, out, str(args.model))
    print(markdown(result))
    print(f"written: {out / 'benchmark.json'} {out / 'benchmark.md'} "
          f"{out / 'benchmark_manifest.csv'}"
          + (f" {out / 'finetune.safetensors'}" if args.protocol == "finetune" else ""))
    return 0


def _retrieval(args: argparse.Namespace) -> int:
    from xlip.eval.retrieval import evaluate_retrieval, markdown, write_retrieval

    m, manifest = _model_and_manifest(args)
    out = writable_dir(args.out or args.model, "--out")
    result = evaluate_retrieval(m.model, m.tokenizer, m.cfg, manifest,
                                args.split or m.cfg.data.eval_split, progress=True)
    result["model"] = str(args.model)
    js, md = write_retrieval(result, out)
    print(markdown(result))
    print(f"written: {js} {md}")
    return 0


def add_eval_commands(sub: argparse._SubParsersAction, suite) -> None:
    """``xlip eval zeroshot|probe|finetune|benchmarks|benchmark|retrieval|suite``; ``suite``:
    the suite's handler, which runs entries through the whole ``xlip`` parser (xlip.cli)."""
    from xlip.text.prompts import DEFAULT_PROMPT_SET, PROMPT_SETS

    ev = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_cmd", required=True)
    z = ev.add_parser("zeroshot", help="zero-shot classification with disease prompts")
    z.add_argument("--model", required=True, help="model folder (a pre-training run)")
    z.add_argument("--manifest", help="default: data.eval_manifest of the model's config")
    z.add_argument("--split", help="default: data.eval_split")
    z.add_argument("--findings", nargs="*", help="default: every label in the split; "
                   "--mode multiclass: the classes (at least two, 'No Finding' allowed)")
    z.add_argument("--prompts", default=DEFAULT_PROMPT_SET, help=f"prompt set: "
                   f"{' | '.join(PROMPT_SETS)} | all (every set, and the sensitivity table "
                   "zeroshot_prompts.json/.md)")
    z.add_argument("--mode", choices=["multilabel", "multiclass"], default="multilabel",
                   help="multiclass: softmax over the --findings classes, on the rows whose "
                        "labels hold exactly one of them")
    z.add_argument("--val-split", help="choose each finding's F1 threshold on this split's rows "
                   "(default: the fixed 0.5); never the tested --split")
    z.add_argument("--no-plots", action="store_true", help="no ROC curves PNG")
    z.add_argument("--out", help="folder for zeroshot.json/.md and zeroshot_roc.png (default: "
                                 "the model folder)")
    z.set_defaults(func=_zeroshot)
    pb = ev.add_parser("probe", help="linear probe: frozen image features, one logistic "
                                     "regression per finding, weight decay chosen on validation")
    pb.add_argument("--model", required=True, help="model folder (a run or a checkpoint)")
    pb.add_argument("--manifest", help="training and validation rows (default: the model's "
                                       "data.eval_manifest)")
    pb.add_argument("--test-manifest", help="test rows (default: --manifest)")
    pb.add_argument("--benchmark", metavar="NAME", help="instead of manifests: a shipped "
                    "benchmark's published lists (`xlip eval benchmarks`), read from "
                    "--data-root; --fraction 0.01 / 0.1 / 1 picks train_1 / train_10 / train")
    pb.add_argument("--data-root", help="--benchmark: the dataset as downloaded")
    pb.add_argument("--split", default="train", help="training split")
    pb.add_argument("--val-split", default="valid", help="validation split; without such "
                    "rows, 10%% of the training patients are held out")
    pb.add_argument("--test-split", default="test", help="test split")
    pb.add_argument("--fraction", type=float, default=1.0,
                    help="share of the training patients whose labels are used (0.01, 0.1, 1)")
    pb.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                    help="random: the same encoder untrained (the no-pre-training baseline)")
    pb.add_argument("--findings", nargs="*", help="default: every finding with positive and "
                                                 "negative test images")
    pb.add_argument("--seed", type=int, default=0, help="seed of the fraction, the held-out "
                    "validation patients and the random initialisation")
    pb.add_argument("--out", help="folder for probe.json/.md (default: MODEL/probe_INIT_FRAC)")
    pb.set_defaults(func=_probe)
    ft = ev.add_parser("finetune", help="fine-tuning: the whole image encoder and a linear "
                                        "head trained on the labels, early stopping on the "
                                        "validation mean AUC, tested once")
    for a in pb._actions:  # the probe's rows: the same flags and defaults
        if a.dest not in ("help", "out", "seed"):
            ft._add_action(a)
    ft.add_argument("--seed", type=int, default=0, help="seed of the fraction, the held-out "
                    "validation patients, the random initialisation, the head, the batch "
                    "order and the augmentation")
    ft.add_argument("--steps", type=int, default=FINETUNE_STEPS, help="most optimisation steps")
    ft.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW; "
                    "10%% of the steps warm-up, then cosine decay)")
    ft.add_argument("--head-lr-scale", type=float, default=10.0,
                    help="the new linear head's learning rate as a multiple of --lr")
    ft.add_argument("--batch-size", type=int, default=32, help="training images per step")
    ft.add_argument("--eval-every", type=int, default=25,
                    help="steps between validation measurements")
    ft.add_argument("--patience", type=int, default=4, help="stop after this many validation "
                    "measurements without improvement (the best weights are tested)")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    ft.add_argument("--out", required=True, help="folder for finetune.json/.md and "
                    "finetune.safetensors (the best image encoder + head)")
    ft.set_defaults(func=_finetune)
    bl = ev.add_parser("benchmarks", help="list the shipped benchmark definitions (BenchX "
                                          "splits): task, classes, list sizes and hashes, "
                                          "where to download the data")
    bl.add_argument("--json", action="store_true", help="print JSON")
    bl.set_defaults(func=_benchmarks)
    bm = ev.add_parser("benchmark", help="evaluate on exactly the images of a shipped "
                                         "benchmark's lists; reports coverage (found K of N)")
    bm.add_argument("name", help="a benchmark of `xlip eval benchmarks`, e.g. nih-cxr14")
    bm.add_argument("--model", required=True, help="model folder (a run or a checkpoint)")
    bm.add_argument("--data-root", required=True,
                    help="the dataset as downloaded (what `xlip data prepare` reads)")
    bm.add_argument("--protocol", choices=["zeroshot", "probe", "finetune"], default="zeroshot",
                    help="finetune: as `xlip eval finetune` with its defaults, on the lists")
    bm.add_argument("--fraction", type=int, choices=[1, 10, 100],
                    help="probe, finetune: the train_1, train_10 or train list (default: 100)")
    bm.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                    help="probe, finetune: random is the same encoder untrained (the "
                         "baseline)")
    bm.add_argument("--seed", type=int, default=0, help="seed of --init random")
    bm.add_argument("--out", required=True,
                    help="folder for benchmark.json/.md and benchmark_manifest.csv")
    bm.set_defaults(func=_benchmark)
    rt = ev.add_parser("retrieval", help="image-report retrieval: Recall@1/5/10 and median "
                                         "rank, both directions (identical reports: one target)")
    rt.add_argument("--model", required=True, help="model folder (a run or a checkpoint)")
    rt.add_argument("--manifest", help="default: data.eval_manifest of the model's config")
    rt.add_argument("--split", help="default: data.eval_split")
    rt.add_argument("--out", help="folder for retrieval.json/.md (default: the model folder)")
    rt.set_defaults(func=_retrieval)
    su = ev.add_parser("suite", help="run the evaluations a YAML file lists and write one "
                                     "model-card page (RUN/eval/README.md)")
    su.add_argument("--model", required=True, help="model folder (a run or a checkpoint)")
    su.add_argument("--config", required=True, help="suite file: `evaluations:`, a list of "
                    "{kind: zeroshot|probe|finetune|retrieval|benchmark, OPTION: VALUE, ...}; a "
                    "list value runs once per value (see docs in xlip/suite.py)")
    su.add_argument("--out", help="folder for the results, suite.json and README.md (default: "
                                  "MODEL/eval)")
    su.add_argument("--force", action="store_true", help="rerun entries whose result exists")
    su.set_defaults(func=suite)

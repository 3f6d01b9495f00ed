"""The ``xlip`` command: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from xlip import __version__
from xlip.config import ConfigError
from xlip.errors import XlipError
from xlip.eval import FINETUNE_STEPS
from xlip.cli_eval import add_eval_commands
from xlip.files import writable_dir, writable_file

OVERRIDES_HELP = "dotted config overrides, e.g. train.steps=100 mim.policy=random"


def _pretrain(args: argparse.Namespace) -> int:
    from xlip.config import load_config
    from xlip.train.checkpoint import resolve_checkpoint
    from xlip.train.distributed import shutdown_distributed
    from xlip.train.loop import pretrain

    config = args.config
    if args.resume and not config:  # the checkpoint's own config, plus the overrides
        if args.resume == "latest":
            raise ConfigError("--resume latest needs --config (the run's config.yaml) to know "
                              "the run folder; or give the checkpoint folder: --resume "
                              "RUN/checkpoints/step_XXXXXXX")
        config = resolve_checkpoint(Path("."), args.resume) / "config.yaml"
    if args.resume_override and not args.resume:
        raise ConfigError("--resume-override only applies together with --resume")
    cfg = load_config(config, args.overrides, saved=config != args.config)
    try:
        out = pretrain(cfg, resume=args.resume, progress=not args.quiet,
                       resume_override=args.resume_override)
    except BaseException:
        shutdown_distributed(meet=False)  # the other ranks stop too (or have stopped)
        raise
    shutdown_distributed()
    print(f"model written to {out}")
    return 0


class _CheckingParser(argparse.ArgumentParser):
    """A parser whose errors raise ConfigError instead of exiting (a suite entry's command)."""

    def error(self, message: str):
        raise ConfigError(message)


def _suite(args: argparse.Namespace) -> int:
    from xlip.suite import load_suite, run_suite

    model = Path(args.model)
    if not (model / "config.yaml").is_file():
        raise ConfigError(f"--model {model}: not a model folder (no config.yaml); give a "
                          "pre-training run or one of its checkpoints")
    entries = load_suite(args.config)
    out = writable_dir(Path(args.out) if args.out else model / "eval", "--out")
    parser = build_parser(_CheckingParser)

    def check(argv: list[str]) -> None:
        try:
            parser.parse_args(argv)
        except ConfigError as err:
            raise ConfigError(f"{args.config}: `xlip {' '.join(argv)}`: {err}") from None

    def run(argv: list[str]) -> None:
        sub = parser.parse_args(argv)
        sub.func(sub)

    suite = run_suite(model, entries, out, run=run, check=check, force=args.force)
    print(f"{len(suite['evaluations'])} evaluations → {out / 'README.md'}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from xlip.eval.plot import plot_run

    if args.out:
        writable_file(args.out, "--out")
    print(f"written: {plot_run(args.run, args.out)}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from xlip.data.synthetic import SynthConfig, montage, synthesize

    cfg = SynthConfig(size=args.size)
    if args.montage:
        writable_file(args.montage, "--montage")
        print(f"montage written to {montage(args.montage, seed=args.seed, cfg=cfg)}")
        if not args.out:
            return 0
    if not args.out:
        raise ConfigError("xlip data synth needs --out DIR (or only --montage FILE.png)")
    writable_dir(args.out, "--out")
    path = synthesize(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                      cfg=cfg, image_only_fraction=args.image_only,
                      text_only_fraction=args.text_only, workers=args.workers, progress=True)
    print(f"manifest written to {path}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from xlip.data.adapters import PrepareOptions, prepare

    opts = PrepareOptions(
        views=args.views,
        split_fractions=args.split_fractions, seed=args.seed, uncertain=args.uncertain,
        reports=args.reports or "", reports_only=args.reports_only, labels=args.labels,
        text_policy=args.text_policy,
        rad_vote=args.rad_vote, csv=args.csv or "", map=args.map or "",
        label_sep=args.label_sep, verify=args.verify, workers=args.workers,
        absolute_paths=args.absolute_paths, progress=not args.quiet)
    writable_dir(args.out, "--out")
    summary = prepare(args.dataset, args.raw_dir, args.out, opts)
    print(summary.describe())
    out = Path(args.out)
    print(f"written: {out / 'manifest.csv'} {out / 'rejects.csv'} {out / 'summary.json'}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from xlip.data.validate import exit_code, validate

    if args.report:
        writable_file(args.report, "--report")
    report = validate(args.manifests, args.eval, check_images=not args.no_images,
                      workers=args.workers, min_side=args.min_side, text_policy=args.text_policy)
    if args.report:
        report.write_json(args.report)
    print(report.describe(full_list=args.report))
    return exit_code(report, args.warn_only)


def _shard(args: argparse.Namespace) -> int:
    from xlip.data.shards import write_shards

    writable_dir(args.out, "--out")
    try:
        summary = write_shards(args.manifest, args.out, size=args.size,
                               shard_rows=args.shard_rows, workers=args.workers,
                               progress=not args.quiet, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the complete shards in {args.out} are kept; run the same command "
              "again to resume", file=sys.stderr)
        return 130
    print(summary.describe())
    print(f"manifest written to {summary.manifest}")
    return 0


def _split(args: argparse.Namespace) -> int:
    from xlip.data.splits import SplitOptions, markdown, write_splits

    try:
        fractions = tuple(float(x) for x in args.fractions.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--fractions {args.fractions!r}: give shares separated by commas, "
                          "e.g. 0.01,0.1,1") from None
    opt = SplitOptions(fractions, args.seed, args.split, args.val_split, args.force,
                       progress=not args.quiet)
    out = writable_dir(args.out, "--out")
    meta = write_splits(args.manifest, out, opt)
    print(markdown(meta), end="")
    print("written: " + " ".join(str(out / e["file"]) for e in meta["fractions"])
          + f" {out / 'splits.json'} {out / 'splits.md'}")
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from xlip.data.manifest import load_manifest
    from xlip.text.sections import select_text
    from xlip.text.tokenizer import train_wordpiece

    writable_dir(args.out, "--out")
    texts = []
    for m in args.manifests:
        texts += [select_text(r.text, args.text_policy) for r in
                  load_manifest(m, verify_images=False) if r.text and r.split == args.split]
    tok = train_wordpiece(texts, args.out, vocab_size=args.vocab_size)
    print(f"WordPiece vocabulary of {len(tok)} tokens from {len(texts)} reports → {args.out}")
    if len(tok) < args.vocab_size:
        print(f"note: --vocab-size {args.vocab_size} asked for more tokens than these reports "
              f"yield; the vocabulary has {len(tok)} (every word piece seen at least twice)",
              file=sys.stderr)
    return 0


def _text_label(args: argparse.Namespace) -> int:
    from xlip.text.labeller import label_csv

    writable_file(args.out, "--out")
    summary = label_csv(args.input, args.out, args.text_column, args.text_policy, args.prefix)
    print(summary.describe())
    print(f"written: {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from xlip.demo import run_demo

    writable_dir(args.out, "--out")
    result = run_demo(Path(args.out), args.overrides, quick=args.quick)
    print(json.dumps({"mean_auc": result["mean_auc"]}))
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from xlip.ablate import (DEFAULT_VARIANTS, AblationSpec, distinct_variants, run_ablation,
                             variant_overrides)
    from xlip.config import load_config

    out = writable_dir(args.out, "--out")
    overrides = list(args.overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("xlip ablate runs its variants one after another in one process: start "
                          "it without torchrun (use xlip pretrain under torchrun for one run)")
    if args.demo == bool(args.config):
        raise ConfigError("xlip ablate needs exactly one of --config FILE and --demo")
    if args.demo:
        from xlip.demo import demo_config, prepare_demo_data

        base = demo_config(out, overrides).to_dict()
        base["train"]["out_dir"] = str(out / "runs")
    else:
        base = load_config(args.config, overrides).to_dict()
    seeds = _seeds(args.seeds, base["train"]["seed"])
    names = [n for n in args.variants.split(",") if n] if args.variants else DEFAULT_VARIANTS
    evaluations = ((["zeroshot", "attmim"] if args.demo else ["zeroshot"])
                   + (["probe"] if args.probe else [])
                   + (["finetune"] if args.finetune else [])
                   + (["retrieval"] if args.retrieval else []))
    # with --variants, exactly the listed ones run; without, the defaults and your own
    variants = variant_overrides(names, args.define, add_defined=not args.variants)
    if not args.variants:  # the default list: a variant this config already is runs once
        variants, same = distinct_variants(base, variants)
        for name, like in same.items():
            print(f"{name}: the same config as {like} here, not run (name it in --variants to "
                  "run it anyway)", file=sys.stderr)
    spec = AblationSpec(base=base, out=out, variants=variants,
                        seeds=seeds, equal=args.equal,
                        reference=args.reference, budget_s=args.budget_s,
                        steps=args.steps or 0,
                        evaluations=evaluations, finetune_steps=args.finetune_steps)
    if args.demo:
        prepare_demo_data(out)
    summary = run_ablation(spec, progress=not args.quiet)
    print((out / "ablation.md").read_text())
    print(f"written: {out / 'ablation.json'} {out / 'ablation.md'}")
    return 0 if summary["variants"] else 1


def _seeds(arg: str | None, config_seed: int) -> list[int]:
    """--seeds as a list of distinct seeds; without it, the config's ``train.seed``."""
    if arg is None:
        return [config_seed]
    try:
        seeds = list(dict.fromkeys(int(x) for x in arg.split(",") if x.strip()))
    except ValueError:
        raise ConfigError(f"--seeds {arg!r}: give whole numbers, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise ConfigError("--seeds is empty: give at least one, e.g. --seeds 0")
    return seeds


def _visualize(args: argparse.Namespace) -> int:
    from xlip.api import XLIP
    from xlip.eval.visualize import visualize

    m = XLIP.from_pretrained(args.model)
    writable_dir(args.out, "--out")
    manifest = args.manifest
    if manifest and not Path(manifest).is_file():
        raise ConfigError(f"--manifest {manifest}: no such file")
    if not manifest and m.cfg.data.eval_manifest:  # the model's own evaluation rows, if present
        manifest = m.cfg.data.eval_manifest if Path(m.cfg.data.eval_manifest).is_file() else None
        if manifest is None:
            print(f"note: {m.cfg.data.eval_manifest} (the model's data.eval_manifest) is gone; "
                  "images are shown without their reports (pass --manifest)", file=sys.stderr)
    paths = visualize(m.model, m.tokenizer, m.cfg, args.images, Path(args.out), manifest,
                      args.text or "", args.seed)
    print("written: " + " ".join(map(str, paths)))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import yaml

    from xlip.bench import BenchOptions, bench_command

    base = yaml.safe_load(Path(args.config).read_text()) if args.config else None
    opts = BenchOptions(tuple(args.preset.split(",")), args.group, args.batch_size, args.steps,
                        tuple(args.overrides), base, args.device, not args.no_loader)
    print(bench_command(opts, args.out, "xlip bench " + " ".join(sys.argv[2:])))
    return 0


def _config_show(args: argparse.Namespace) -> int:
    import yaml

    from xlip.config import BERT_PRESETS, VIT_PRESETS, load_config

    if args.preset and args.config:
        raise ConfigError("xlip config show takes --preset NAME or --config FILE, not both")
    if args.preset:
        from xlip.demo import demo_config

        if args.preset != "demo":
            raise ConfigError(f"--preset {args.preset}: unknown; the presets are: demo")
        cfg = demo_config(Path(args.out), args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    vit = ", ".join(f"{k} ({w}/{d}/{h})" for k, (w, d, h) in VIT_PRESETS.items())
    bert = ", ".join(f"{k} ({h}/{n}/{a})" for k, (h, n, a, _) in BERT_PRESETS.items())
    print(f"# config presets (--preset): demo (the `xlip demo` run, paths under --out)\n"
          f"# vision.preset (width/depth/heads): {vit}, custom\n"
          f"# text.preset (hidden/layers/heads): {bert}, custom", file=sys.stderr)
    return 0


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help text plus "(default: X)" where X says something (not None, False or [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in
                text and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _explain_defaults(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's --help shows the options' defaults."""
    parser.formatter_class = _DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _explain_defaults(sub)


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
                 ) -> argparse.ArgumentParser:
    p = parser_class(prog="xlip", description="XLIP pre-training of chest X-ray "
                                "image and report encoders, and their evaluation. Start with "
                                "`xlip demo`; `xlip COMMAND --help` explains each command.")
    p.add_argument("--version", action="version", version=f"xlip {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="synthetic corpus → tokenizer → pre-train → zero-shot")
    d.add_argument("--out", default="runs/demo", help="folder for the corpus, tokenizer, run "
                                                      "and results")
    d.add_argument("--quick", action="store_true", help="a smoke version: 30 steps on a 1,800-image "
                   "corpus, zero-shot AUC well below the full demo's (1.7 min on 2 cores)")
    d.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    d.set_defaults(func=_demo)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_cmd", required=True)
    s = data.add_parser("synth", help="write the synthetic chest X-ray corpus")
    s.add_argument("--out", help="folder for the PNGs, manifest.csv and synth.json")
    s.add_argument("--n-train", type=int, default=20000, help="training studies")
    s.add_argument("--n-test", type=int, default=1000, help="held-out test studies")
    s.add_argument("--seed", type=int, default=0, help="seed of the whole corpus")
    s.add_argument("--size", type=int, default=128, help="image side in pixels (at least 32)")
    s.add_argument("--image-only", type=float, default=0.25,
                   help="share of training rows without their report (labels only)")
    s.add_argument("--text-only", type=float, default=0.1,
                   help="share of training rows without their image (report only)")
    s.add_argument("--workers", type=int, default=2, help="worker processes")
    s.add_argument("--montage", help="also write a labelled contact sheet to this PNG")
    s.set_defaults(func=_synth)

    from xlip.data.adapters import ADAPTERS

    pr = data.add_parser("prepare", help="a dataset as downloaded → manifest.csv + rejects.csv")
    pr.add_argument("dataset", choices=list(ADAPTERS))
    pr.add_argument("raw_dir", help="the folder the dataset was downloaded / extracted to")
    pr.add_argument("--out", required=True, help="folder for manifest.csv, rejects.csv, "
                                                 "summary.json")
    pr.add_argument("--views", default="frontal",
                    help="comma list of frontal (PA and AP), PA, AP, LATERAL, unknown, all")
    pr.add_argument("--split-fractions", default="valid=0.1,test=0.1",
                    help="patient-level split for datasets without an official one")
    pr.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    pr.add_argument("--uncertain", default="ignore", help="CheXpert/MIMIC -1 labels: ignore "
                    "(kept in uncertain_labels) | positive (U-Ones) | negative (U-Zeros)")
    pr.add_argument("--reports", help="mimic-cxr: folder with the files/pXX/... report .txt "
                                      "files (default: RAW_DIR)")
    pr.add_argument("--reports-only", action="store_true",
                    help="iu-xray: one text-only row per report, no images")
    pr.add_argument("--labels", default="mesh", help="iu-xray: mesh | ner")
    pr.add_argument("--text-policy", default="findings_impression",
                    help="mimic-cxr, iu-xray: reject reports with no text in these sections "
                         "(the data.text_policy you will train with)")
    pr.add_argument("--rad-vote", default="majority", help="vindr-cxr: majority | any")
    pr.add_argument("--csv", help="generic: the CSV (relative to RAW_DIR or absolute)")
    pr.add_argument("--map", help="generic: FIELD=COLUMN,... for image, text, labels, split, "
                                  "patient_id, study_id, view")
    pr.add_argument("--label-sep", default=";", help="generic: separator of the labels column")
    pr.add_argument("--verify", default="decode", choices=["decode", "exists", "none"],
                    help="decode every kept image (default), only check it exists, or neither")
    pr.add_argument("--workers", type=int, default=0, help="image checks in parallel "
                                                           "(0: one per CPU)")
    pr.add_argument("--absolute-paths", action="store_true",
                    help="write absolute image paths (default: relative to --out)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=_prepare)

    v = data.add_parser("validate", help="check manifests before training: images, duplicates, "
                        "texts, labels, patient overlap with held-out data")
    v.add_argument("manifests", nargs="+", metavar="MANIFEST", help="training manifests")
    v.add_argument("--eval", nargs="+", action="extend", default=[], metavar="MANIFEST",
                   help="evaluation manifests: no patient or image may also be in training rows")
    v.add_argument("--warn-only", action="store_true", help="exit 0 even when there are problems")
    v.add_argument("--no-images", action="store_true", help="only check that image files exist "
                   "(no decoding, sizes or identical-content duplicates)")
    v.add_argument("--report", metavar="FILE.json", help="write every issue to this JSON file")
    v.add_argument("--workers", type=int, default=0,
                   help="image checks in parallel (0: one per CPU, at most 8)")
    v.add_argument("--min-side", type=int, default=224,
                   help="warn about images whose shorter side is below this (pixels)")
    v.add_argument("--text-policy", default="findings_impression",
                   help="the report sections training reads (data.text_policy)")
    v.set_defaults(func=_validate)

    sh = data.add_parser("shard", help="decode, resize and store a manifest's images as uint8 "
                                       "PNG in WebDataset-style tar shards (resumable)")
    sh.add_argument("manifest", help="CSV/JSONL manifest; image paths relative to it")
    sh.add_argument("--out", required=True,
                    help="folder for shard-*.tar, manifest.csv (image = shard-K.tar#KEY.png), "
                         "rejects.csv, shards.json")
    sh.add_argument("--size", type=int, default=256,
                    help="shorter side in pixels, aspect kept (smaller images are not upscaled)")
    sh.add_argument("--shard-rows", type=int, default=1000, help="manifest rows per shard")
    sh.add_argument("--workers", type=int, default=2, help="worker processes")
    sh.add_argument("--overwrite", action="store_true",
                    help="delete this command's files in --out first instead of resuming")
    sh.add_argument("--quiet", action="store_true", help="no progress bar")
    sh.set_defaults(func=_shard)

    sp = data.add_parser("split", help="label-fraction subsets of the training patients "
                         "(patient-disjoint, stratified per finding, nested), written once "
                         "with their sha256")
    sp.add_argument("manifest", help="CSV/JSONL manifest; image paths relative to it")
    sp.add_argument("--fractions", default="0.01,0.1,1",
                    help="shares of the training patients, comma-separated; one file each")
    sp.add_argument("--seed", type=int, default=0,
                    help="seed of the selection and of the held-out validation patients")
    sp.add_argument("--split", default="train", help="the split the fractions are drawn from")
    sp.add_argument("--val-split", default="valid", help="validation split; without such rows, "
                    "10%% of the training patients are held out and written as this split")
    sp.add_argument("--out", required=True, help="folder for SPLIT_<percent>pct.csv, "
                                                 "splits.json, splits.md")
    sp.add_argument("--force", action="store_true",
                    help="replace the files of an earlier, different split in --out")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=_split)

    tk = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tok_cmd",
                                                                        required=True)
    t = tk.add_parser("train", help="train a WordPiece vocabulary on manifest reports")
    t.add_argument("manifests", nargs="+", help="manifests whose reports are read")
    t.add_argument("--out", required=True, help="folder for tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=4000,
                   help="most tokens (fewer when the reports hold fewer word pieces)")
    t.add_argument("--split", default="train", help="only reports of this split")
    t.add_argument("--text-policy", default="findings_impression",
                   help="report sections read (the data.text_policy you will train with)")
    t.set_defaults(func=_tokenizer_train)

    txt = sub.add_parser("text", help="report text").add_subparsers(dest="text_cmd",
                                                                     required=True)
    lb = txt.add_parser("label", help="add NER labels (present / negative / uncertain) to a "
                                      "CSV of reports")
    lb.add_argument("input", help="CSV with a header row")
    lb.add_argument("--out", required=True, help="CSV to write: every input row + 3 columns")
    lb.add_argument("--text-column", default="text")
    lb.add_argument("--text-policy", default="findings_impression",
                    help="report sections the NER reads: findings_impression | impression | "
                         "findings | longest")
    lb.add_argument("--prefix", default="", help="prefix for the added column names")
    lb.set_defaults(func=_text_label)

    pt = sub.add_parser("pretrain", help="pre-train XLIP")
    pt.add_argument("--config", help="YAML config file")
    pt.add_argument("--resume", help="'latest' (with --config) or a checkpoint folder (its "
                    "config.yaml is the default config); overrides that differ from the "
                    "checkpoint's config are refused unless --resume-override")
    pt.add_argument("--resume-override", action="store_true",
                    help="apply overrides that differ from the checkpoint's config from the "
                         "resumed step on (not those that change the model's shape)")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    pt.set_defaults(func=_pretrain)

    add_eval_commands(sub, suite=_suite)
    ab = sub.add_parser("ablate", help="pre-train and evaluate variants side by side (same "
                                       "data, seeds, and steps or wall-clock time)")
    ab.add_argument("--config", help="YAML config all variants start from")
    ab.add_argument("--demo", action="store_true",
                    help="the demo's config and synthetic corpus (built in --out if missing)")
    from xlip.ablate import DEFAULT_VARIANTS  # no torch: the parser stays quick to build

    ab.add_argument("--variants", help="comma list (default: all of "
                    f"{', '.join(DEFAULT_VARIANTS)})")
    ab.add_argument("--define", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                    help="a custom variant, e.g. lr3=train.lr=3e-3,mim.ratio=0.6")
    ab.add_argument("--seeds", help="comma list of train.seed values, one run of each "
                    "variant per seed (default: the config's train.seed)")
    ab.add_argument("--equal", choices=["steps", "time", "flops"], default="steps",
                    help="same steps for every variant, the same wall-clock budget, or the "
                    "same FLOPs (counted, not timed: the same on any machine)")
    ab.add_argument("--reference", default="xlip",
                    help="--equal time|flops: the variant whose steps set the budget")
    ab.add_argument("--budget-s", type=float, default=0.0,
                    help="--equal time: seconds per run instead of the reference's")
    ab.add_argument("--steps", type=int, help="train.steps for every variant")
    ab.add_argument("--out", required=True, help="folder for runs/, ablation.json/.md")
    ab.add_argument("--probe", action="store_true", help="also a linear probe of each run's "
                    "frozen image features (xlip eval probe; added to finished runs without "
                    "training them again)")
    ab.add_argument("--finetune", action="store_true", help="also fine-tuning of each run's "
                    "image encoder with a linear head (xlip eval finetune) at 100, 10 and 1 %% "
                    "of the training patients, added to finished runs alike")
    ab.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS,
                    help="--finetune: steps per fine-tuning (at most: it stops early on the "
                    "validation AUC)")
    ab.add_argument("--retrieval", action="store_true", help="also image-report retrieval "
                    "(xlip eval retrieval) of each run, added to finished runs alike")
    ab.add_argument("--quiet", action="store_true", help="no progress bars")
    ab.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + " (every variant)")
    ab.set_defaults(func=_ablate)

    vz = sub.add_parser("visualize", help="per image a PNG: AttMIM scores, mask, MAE "
                                          "reconstruction, text-to-patch attention of a phrase")
    vz.add_argument("--model", required=True, help="model folder (a pre-training run)")
    vz.add_argument("images", nargs="+", metavar="IMAGE")
    vz.add_argument("--text", help='a phrase whose attention over the patches is drawn, e.g. '
                                   '"left pleural effusion"')
    vz.add_argument("--manifest", help="where an image's report or labels are looked up "
                                       "(default: the model's data.eval_manifest)")
    vz.add_argument("--seed", type=int, default=0, help="seed of the drawn mask")
    vz.add_argument("--out", required=True, help="folder for the PNGs")
    vz.set_defaults(func=_visualize)

    pl = sub.add_parser("plot", help="training curves of a run (every loss term, per source; "
                                     "lr, grad norm, logit scale) as a PNG")
    pl.add_argument("run", help="a pre-training run folder (its metrics.jsonl)")
    pl.add_argument("--out", help="PNG to write (default: RUN/curves.png)")
    pl.set_defaults(func=_plot)

    b = sub.add_parser("bench", help="step cost side by side: CLIP, XLIP, XLIP fast (time, "
                                     "FLOPs, MFU, peak memory, loader samples/s)")
    b.add_argument("--preset", default="tiny", help="tiny | base (ViT-B/16, BERT-base) | tiny,base")
    b.add_argument("--config", help="config YAML under the preset (which fills what it leaves out)")
    b.add_argument("--group", choices=["steps", "attention", "precision", "tasks"], default="steps")
    b.add_argument("--batch-size", type=int, default=0, help="default: the preset's")
    b.add_argument("--steps", type=int, default=0, help="timed steps; default: the preset's")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--no-loader", action="store_true", help="skip the loader's samples/s")
    b.add_argument("--out", help="F.json (+ F.md), or a folder for bench_<machine kind>.json/.md")
    b.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    b.set_defaults(func=_bench)

    cf = sub.add_parser("config", help="configs").add_subparsers(dest="config_cmd",
                                                                 required=True)
    cs = cf.add_parser("show", help="print the resolved config as YAML (the defaults, a file "
                                    "or a preset, with overrides) and list the presets")
    cs.add_argument("--config", help="YAML config file")
    cs.add_argument("--preset", help="a built-in config: demo")
    cs.add_argument("--out", default="runs/demo", help="--preset demo: its run folder")
    cs.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    cs.set_defaults(func=_config_show)
    _explain_defaults(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `xlip ... | head`: the reader has gone, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except XlipError as err:  # a fault the user can fix: one line, no traceback
        print(f"xlip: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or folder the system refused (permission, disk full, ...)
        if err.filename is None:
            raise
        print(f"xlip: error: {err.filename}: {err.strerror or err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

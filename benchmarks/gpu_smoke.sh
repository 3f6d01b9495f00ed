#!/usr/bin/env bash
# GPU smoke test of xlip, in a few minutes on a GPU machine. From the repository root:
#
#   bash benchmarks/gpu_smoke.sh
#
# 1. install: the machine's own torch stays; `pip install -e .` without dependencies, then the
#    other requirements (torch left out; where pip cannot reach an index, the installed versions
#    are used if xlip imports, with a note)
# 2. `pytest -m gpu`: the CUDA tests (bf16 step with the hybrid stem, SyncBatchNorm under NCCL,
#    pinned batches, metrics reduced on the GPU)
# 3. a synthetic corpus (64 px) and its tokenizer
# 4. a 20-step `torchrun` pre-training of the demo model (hybrid stem): 2 processes over NCCL
#    where there are 2 GPUs (SyncBatchNorm then syncs), else 1
# 5. `xlip bench --preset tiny,base --batch-size 64 --steps 10 --out $RESULTS/bench_gpu.json`
#    (a note if it fails)
# 6. the same 20 steps as step 4 in one process with train.compile=true (a note if it fails);
#    last, since compiling can take minutes: on an H200 (torch 2.11) the 20 steps had not
#    finished after 225 s
#
# Writes $RESULTS/gpu_smoke_<UTC date>.json (machine), .md (people) and .log (every step's
# output), where RESULTS is $OUT if set, else benchmarks/results. Exit status: 0 when steps 1-4
# passed, 1 otherwise (a missing GPU or a failed install stops at once, with the reason).
#
# Environment:
#   XLIP_SMOKE_LIMIT=900   seconds for the whole script; each step gets at most what is left
#   XLIP_SMOKE_CPU=1       check the script's plumbing without a GPU: no install, `pytest -m gpu`
#                          (every test skips), a tiny 2-process gloo run, `xlip bench --preset
#                          tiny` (a note if it fails), no compile step; files named
#                          gpu_smoke_cpu_<date>.*
#   XLIP_SMOKE_INSTALL=0   skip step 1 (the environment is ready)
#   XLIP_SMOKE_WHEELS=DIR  install the requirements from wheels in DIR (a machine with no index)
#   PYTHON=python3         the interpreter
set -uo pipefail

ROOT=$(pwd)
if [[ ! -f "$ROOT/pyproject.toml" || ! -f "$ROOT/xlip/__init__.py" ]]; then
    echo "gpu_smoke: run from the xlip repository root: bash benchmarks/gpu_smoke.sh" >&2
    exit 1
fi
PY=${PYTHON:-python3}
CPU_MODE=${XLIP_SMOKE_CPU:-0}
LIMIT=${XLIP_SMOKE_LIMIT:-900}
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
RESULTS=${OUT:-$ROOT/benchmarks/results}
NAME=gpu_smoke_$([[ $CPU_MODE == 1 ]] && echo cpu_)$STAMP
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xlip_gpu_smoke.XXXXXX")
STEPS=$WORK/steps.tsv  # name, status (ok | failed | note | skipped), seconds, detail
LOG=$RESULTS/$NAME.log
START=$(date +%s)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$RESULTS" || { echo "gpu_smoke: cannot create $RESULTS" >&2; exit 1; }
: >"$STEPS"
: >"$LOG"

die() {  # a precondition failed: say why and stop
    echo "gpu_smoke: $*" >&2
    echo "FATAL: $*" >>"$LOG"
    exit 1
}

left() { echo $((LIMIT - ($(date +%s) - START))); }

# step NAME MAX_SECONDS ON_FAIL(failed|note) COMMAND...: runs COMMAND (a program, or a function
# of this script exported with export -f) with a time limit of min(MAX_SECONDS, seconds left),
# appends its output to the log and its row to $STEPS; the detail of a failure is its output's
# last line that mentions an error (else its last line)
step() {
    local name=$1 max=$2 on_fail=$3
    shift 3
    local budget
    budget=$(left)
    ((budget > max)) && budget=$max
    if ((budget < 10)); then
        printf '%s\tskipped\t0\tthe %ss time limit (XLIP_SMOKE_LIMIT) was used up\n' \
            "$name" "$LIMIT" >>"$STEPS"
        echo "[$name] skipped: time limit" | tee -a "$LOG" >&2
        return 1
    fi
    echo "[$name] $* (limit ${budget}s)" | tee -a "$LOG" >&2
    local t0 rc from
    t0=$(date +%s)
    from=$(($(wc -l <"$LOG") + 1))
    if declare -F "$1" >/dev/null; then
        timeout --kill-after=10 "$budget" bash -c "$*" >>"$LOG" 2>&1
    else
        timeout --kill-after=10 "$budget" "$@" >>"$LOG" 2>&1
    fi
    rc=$?
    local took=$(($(date +%s) - t0)) status=ok detail=""
    if ((rc != 0)); then
        status=$on_fail
        detail="exit $rc"
        ((rc == 124 || rc == 137)) && detail="stopped at its ${budget}s limit"
        local out last
        out=$(tail -n +"$from" "$LOG" | grep -v '^\s*$')
        last=$(grep -iE 'error|failed|assert' <<<"$out" | tail -n 1)
        [[ -z $last ]] && last=$(tail -n 1 <<<"$out")
        detail="$detail: $(tr '\t' ' ' <<<"$last" | cut -c1-240)"
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$detail" >>"$STEPS"
    echo "[$name] $status (${took}s)" >&2
    return $rc
}

# --- preconditions ------------------------------------------------------------------------------
command -v "$PY" >/dev/null || die "no $PY on PATH: set PYTHON=/path/to/python"
TORCH=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() \
else 0, torch.__version__, torch.version.cuda)" 2>>"$LOG") || die "torch does not import in $PY: \
install the machine's CUDA build of torch >= 2.6 first (https://pytorch.org/get-started), then rerun"
read -r NGPU TORCH_VERSION TORCH_CUDA <<<"$TORCH"
if [[ $CPU_MODE != 1 && $NGPU == 0 ]]; then
    die "no CUDA GPU visible to torch ($TORCH_VERSION, CUDA $TORCH_CUDA): run on a GPU machine, \
or set XLIP_SMOKE_CPU=1 to check this script's plumbing on a CPU"
fi
NPROC=2
[[ $CPU_MODE != 1 ]] && NPROC=$((NGPU >= 2 ? 2 : 1))

# --- 1. install ---------------------------------------------------------------------------------
install() {
    local index=()
    [[ -n ${XLIP_SMOKE_WHEELS:-} ]] && index=(--no-index --find-links "$XLIP_SMOKE_WHEELS")
    grep -vE '^\s*(#|$)' requirements.txt | grep -viE '^torch\s*([=<>!~]|$)' >"$WORK/req.txt"
    "$PY" -m pip install --no-deps --no-build-isolation -e . || return 1
    if ! "$PY" -m pip install "${index[@]}" -r "$WORK/req.txt" pytest; then
        echo "pip could not install requirements.txt (no index reachable?); checking the" \
             "installed packages instead"
        "$PY" -c "import transformers, tokenizers, safetensors, pandas, sklearn, matplotlib, \
yaml, tqdm, pytest, xlip.train.loop" || return 1
        "$PY" -c "import pydicom, pylibjpeg" 2>/dev/null ||
            echo "NOTE: pydicom / pylibjpeg missing: DICOM images cannot be read (the smoke" \
                 "test uses PNGs)"
        echo "NOTE: using the installed versions of the requirements"
    fi
}
export -f install
export PY WORK XLIP_SMOKE_WHEELS=${XLIP_SMOKE_WHEELS:-}
if [[ $CPU_MODE == 1 || ${XLIP_SMOKE_INSTALL:-1} == 0 ]]; then
    printf 'install\tskipped\t0\t%s\n' "$([[ $CPU_MODE == 1 ]] && echo 'CPU mode' || echo 'XLIP_SMOKE_INSTALL=0')" >>"$STEPS"
else
    step install 300 failed install || die "installation failed; see $LOG"
fi
"$PY" -c "import xlip.train.loop, pytest" 2>>"$LOG" || die "xlip or pytest does not import \
after installation; see $LOG"

# --- 2. the tests marked gpu --------------------------------------------------------------------
step gpu_tests 300 failed "$PY" -m pytest -m gpu -q -p no:cacheprovider \
    --junitxml="$WORK/gpu_tests.xml" tests/test_gpu.py

# --- 3. corpus ----------------------------------------------------------------------------------
if [[ $CPU_MODE == 1 ]]; then
    N_TRAIN=96; N_TEST=16; SIZE=32; BATCH=8; SYNTH_WORKERS=1; LOADERS=0
    MODEL=(vision.image_size=32 vision.width=32 vision.heads=2 text.max_length=64)
else
    N_TRAIN=1024; N_TEST=64; SIZE=64; BATCH=32; SYNTH_WORKERS=8; LOADERS=4; MODEL=()
fi
RUN=$WORK/run
corpus() {
    "$PY" -m xlip data synth --out "$RUN/data" --n-train $N_TRAIN --n-test $N_TEST \
        --size $SIZE --workers $SYNTH_WORKERS &&
    "$PY" -m xlip tokenizer train "$RUN/data/manifest.csv" --out "$RUN/tokenizer" \
        --vocab-size 2000
}
export -f corpus
export RUN N_TRAIN N_TEST SIZE SYNTH_WORKERS
HAVE_CORPUS=1
step corpus 240 failed corpus || HAVE_CORPUS=0

# --- 4. torchrun pre-training -------------------------------------------------------------------
# the demo model (hybrid stem, AttMIM, EntMLM); data.batch_size is per process
SETTINGS=(train.steps=20 train.warmup_steps=5 train.log_every=5 train.ckpt_every=20
          data.batch_size=$BATCH data.num_workers=$LOADERS "${MODEL[@]}")
pretrain_config() {  # pretrain_config RUN_DIR FILE EXTRA...: the demo preset with the settings
    local dir=$1 file=$2
    shift 2
    "$PY" -m xlip config show --preset demo --out "$dir" "${SETTINGS[@]}" "$@" >"$file"
}
mkdir -p "$RUN"
if [[ $HAVE_CORPUS == 0 ]]; then
    printf 'pretrain_%sproc\tskipped\t0\tno corpus (the corpus step did not finish)\n' $NPROC >>"$STEPS"
elif pretrain_config "$RUN" "$WORK/pretrain.yaml" 2>>"$LOG"; then
    step "pretrain_${NPROC}proc" 420 failed "$PY" -m torch.distributed.run --standalone \
        --nproc_per_node $NPROC -m xlip.cli pretrain --config "$WORK/pretrain.yaml" --quiet
else
    printf 'pretrain_%sproc\tfailed\t0\tthe config did not resolve; see the log\n' $NPROC >>"$STEPS"
fi

# --- 5. bench -----------------------------------------------------------------------------------
# an earlier run's file must not pass for this run's (the summary names it when it exists)
rm -f "$RESULTS/bench_cpu.json" "$RESULTS/bench_gpu.json"
if [[ $CPU_MODE == 1 ]]; then
    step bench 120 note "$PY" -m xlip bench --preset tiny --out "$RESULTS/bench_cpu.json"
else
    # batch 64, 10 timed steps: the base preset's batch of 8 and 2 steps (sized for a 2-core
    # CPU) leave a GPU mostly idle
    step bench 420 note "$PY" -m xlip bench --preset tiny,base --batch-size 64 --steps 10 \
        --out "$RESULTS/bench_gpu.json"
fi

# --- 6. torch.compile ---------------------------------------------------------------------------
if [[ $HAVE_CORPUS == 0 ]]; then
    printf 'pretrain_compiled\tskipped\t0\tno corpus\n' >>"$STEPS"
elif [[ $CPU_MODE == 1 ]]; then
    printf 'pretrain_compiled\tskipped\t0\tCPU mode (inductor compiles C++ for minutes)\n' >>"$STEPS"
else
    COMPILED=$WORK/compiled
    mkdir -p "$COMPILED" && ln -s "$RUN/data" "$COMPILED/data" &&
        ln -s "$RUN/tokenizer" "$COMPILED/tokenizer" &&
        pretrain_config "$COMPILED" "$WORK/compiled.yaml" train.compile=true 2>>"$LOG" &&
        step pretrain_compiled 300 note "$PY" -m xlip pretrain --config "$WORK/compiled.yaml" --quiet
fi

# --- results ------------------------------------------------------------------------------------
"$PY" - "$WORK" "$RESULTS" "$NAME" "$CPU_MODE" "$NPROC" "$LIMIT" "$(($(date +%s) - START))" \
    <<'PYEOF' 2>>"$LOG"
import json, math, platform, subprocess, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

work, results, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cpu_mode, nproc, limit, wall = sys.argv[4] == "1", int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    n, status, secs, detail = (line.split("\t") + [""] * 4)[:4]
    steps.append({"step": n, "status": status, "seconds": int(secs), "detail": detail})


def run_summary(run: Path):
    """The last logged row of a run and whether it reached step 20 with finite losses."""
    m = run / "metrics.jsonl"
    rows = [json.loads(x) for x in m.read_text().splitlines() if x.strip()] if m.is_file() else []
    if not rows:
        return None
    last = rows[-1]
    losses = {k: v for k, v in last.items() if k.endswith("_loss") and "/" not in k}
    return {"steps": last["step"], "losses": losses, "samples_per_s": last.get("samples_per_s"),
            "elapsed_s": last.get("elapsed_s"),
            "finite": all(math.isfinite(v) for r in rows for k, v in r.items()
                          if k.endswith("_loss")),
            "model_written": (run / "model.safetensors").is_file()}


tests = None
if (work / "gpu_tests.xml").is_file():
    suite = ET.parse(work / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["passed"] = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
pre = run_summary(work / "run")
compiled = run_summary(work / "compiled")
for s in steps:  # a run that exits 0 must also have reached step 20 with finite losses
    r = pre if s["step"].startswith("pretrain_") and "compiled" not in s["step"] else \
        compiled if s["step"] == "pretrain_compiled" else None
    if s["status"] == "ok" and s["step"].startswith("pretrain") and not (
            r and r["steps"] == 20 and r["finite"] and r["model_written"]):
        s["status"] = "failed" if s["step"] != "pretrain_compiled" else "note"
        s["detail"] = "exited 0 but metrics.jsonl does not end at step 20 with finite losses"

try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
except OSError:
    commit = None
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
    if torch.cuda.is_available() else []
bench = results / ("bench_cpu.json" if cpu_mode else "bench_gpu.json")
required = {"install", "gpu_tests", "corpus", f"pretrain_{nproc}proc"}
status = {s["step"]: s["status"] for s in steps}
ok = all(status.get(n) == "ok" or (n == "install" and status.get(n) == "skipped")
         for n in required)
summary = {
    "name": name, "mode": "cpu-plumbing" if cpu_mode else "gpu", "ok": ok, "commit": commit,
    "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus,
    "python": platform.python_version(), "processes": nproc,
    "backend": "gloo" if cpu_mode else "nccl", "limit_s": limit, "wall_s": wall,
    "steps": steps, "gpu_tests": tests, "pretrain": pre, "pretrain_compiled": compiled,
    "bench_json": str(bench) if bench.is_file() else None,
}
(results / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")

md = [f"# xlip GPU smoke test: {name}", "",
      f"{'CPU plumbing check (XLIP_SMOKE_CPU=1): no GPU used; figures are not GPU figures' if cpu_mode else 'GPU run'}"
      f" · torch {torch.__version__} (CUDA {torch.version.cuda}) · "
      f"GPUs: {', '.join(gpus) or 'none'} · commit {commit} · {wall} s of {limit} s · "
      f"**{'passed' if ok else 'FAILED'}**", "",
      "| step | status | seconds | detail |", "|---|---|---:|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail'].replace('|', '/')} |"
       for s in steps]
if tests:
    md += ["", f"`pytest -m gpu`: {tests['passed']} passed, {tests['failures']} failed, "
               f"{tests['errors']} errors, {tests['skipped']} skipped"]
for title, r in ((f"{nproc}-process pre-training", pre), ("compiled (1 process)", compiled)):
    if r:
        loss = ", ".join(f"{k} {v:.3f}" for k, v in r["losses"].items())
        md += ["", f"{title}: {r['steps']} steps, last logged {loss}; "
                   f"{r['samples_per_s']:.0f} samples/s (all processes), {r['elapsed_s']:.1f} s "
                   f"of steps; model written: {r['model_written']}"]
if bench.is_file():
    md += ["", f"`xlip bench` results: {bench.name}"]
(results / f"{name}.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if ok else 1)
PYEOF
rc=$?
echo "gpu_smoke: results in $RESULTS/$NAME.json, $NAME.md, $NAME.log" >&2
rm -rf "$WORK"
exit $rc

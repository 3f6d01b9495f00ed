#!/usr/bin/env bash
# `xlip ablate --demo` with one lane per seed, all lanes side by side on one machine (one GPU:
# at the demo's 64 px and batch 64 one run leaves most of an H200 idle). From the repository
# root:
#
#   SEEDS="0 1 2 3" bash benchmarks/gpu_ablate.sh --variants clip,xlip_lean --equal flops \
#       --reference xlip_lean
#
# The arguments after the script's name go to every lane's `xlip ablate --demo --seeds S
# --out $WORK/sS --quiet ...` (with data.verify_images=false data.num_workers=$WORKERS). The
# demo corpus is built once (with many workers) and linked into every lane's folder; a second
# call with the same WORK reuses it and the finished runs (xlip ablate resumes). Each lane gets
# OMP_NUM_THREADS = cores / lanes: with torch's default (every core) per process, four lanes'
# evaluations on 16 cores took 5 min each instead of 10 s. At the end every run's
# result.json, metrics.jsonl and config.yaml and each lane's ablation.md are packed into
# $OUT/gpu_ablate.tgz (OUT: this folder's benchmarks/results unless set) and the lanes' logs
# are copied there.
#
# Environment: SEEDS ("0"), LIMIT (seconds for the whole script, 540; lanes still running
# then are stopped, and what finished is packed), WORK (/tmp/xlip_gpu_ablate), WORKERS (loader
# workers per lane, 3), PYTHON (python3).
set -uo pipefail

ROOT=$(pwd)
[[ -f "$ROOT/xlip/__init__.py" ]] || { echo "gpu_ablate: run from the xlip repository root" >&2; exit 1; }
T0=$(date +%s)
SEEDS=${SEEDS:-0}; LIMIT=${LIMIT:-540}; WORK=${WORK:-/tmp/xlip_gpu_ablate}; WORKERS=${WORKERS:-3}
PY=${PYTHON:-python3}; RESULTS=${OUT:-$ROOT/benchmarks/results}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
read -ra LANES <<<"$SEEDS"
THREADS=$(( $(nproc) / ${#LANES[@]} )); ((THREADS < 1)) && THREADS=1
export OMP_NUM_THREADS=$THREADS
mkdir -p "$WORK/base" "$RESULTS" || { echo "gpu_ablate: cannot create $WORK or $RESULTS" >&2; exit 1; }

# the demo corpus and tokenizer, once, with every core
WORK=$WORK $PY - <<'PYEOF' || { echo "gpu_ablate: building the demo corpus failed" >&2; exit 1; }
import json, os
from pathlib import Path
from xlip.data.synthetic.corpus import synthesize
from xlip.demo import DEMO_SIZES, prepare_demo_data
out = Path(os.environ["WORK"]) / "base"
n_train, n_test = DEMO_SIZES["full"]
want = {"n_train": n_train, "n_test": n_test, "seed": 0}
stamp = out / "data" / "demo.json"
if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
    synthesize(out / "data", n_train=n_train, n_test=n_test, seed=0, workers=os.cpu_count())
    stamp.write_text(json.dumps(want))  # what prepare_demo_data checks
prepare_demo_data(out)
PYEOF
echo "gpu_ablate: corpus ready after $(( $(date +%s) - T0 )) s; lanes: ${LANES[*]}, $THREADS threads each"

LEFT=$(( LIMIT - ($(date +%s) - T0) - 15 ))
for s in "${LANES[@]}"; do
    lane=$WORK/s$s
    mkdir -p "$lane"
    ln -sfn "$WORK/base/data" "$lane/data"
    ln -sfn "$WORK/base/tokenizer" "$lane/tokenizer"
    timeout --kill-after=5 "$LEFT" "$PY" -m xlip ablate --demo --out "$lane" --seeds "$s" --quiet \
        "$@" data.verify_images=false "data.num_workers=$WORKERS" >"$WORK/lane$s.log" 2>&1 &
done
wait
(cd "$WORK" && find . -path ./base -prune -o \( -name result.json -o -name metrics.jsonl \
    -o -name config.yaml -o -name ablation.md \) -print | grep -v /checkpoints/ \
    | tar czf "$RESULTS/gpu_ablate.tgz" -T -)
cp "$WORK"/lane*.log "$RESULTS/" 2>/dev/null
echo "gpu_ablate: $(( $(date +%s) - T0 )) s; results in $RESULTS/gpu_ablate.tgz"
grep -h "zero-shot\|failed\|rror" "$WORK"/lane*.log

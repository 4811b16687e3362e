#!/usr/bin/env bash
# The GPU check: every GPU path tested (pytest -m gpu), then the throughput figures, in ONE call on one GPU, in
# under 9 minutes of wall time. Progress is printed as it goes and the summary is rewritten after every step, so a
# timeout still leaves what was done.
#
# With the device tool (an offline GPU machine that receives only the working tree and the paths named in carry):
#   once, here:  echo /.whl/ >> .git/info/exclude && python benchmarks/device_wheels.py --out .whl
#                (what the GPU image lacks: jsonargparse, wandb, datasets, sacremoses and their needs, ~26 MiB)
#   one call:    run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   It writes $OUT/gpu-<device>.json, $OUT/gpu-<device>.md and $OUT/gpu_check.log; copy the first two into
#   benchmarks/results/ and the headline figures into the README's speed section.
# On any CUDA machine with the project installed:  bash benchmarks/gpu_check.sh
#   (writes benchmarks/results/gpu-<device>.{json,md}).
# On a CPU, to check this script itself at tiny sizes (proves nothing about GPUs):
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh
# A rerun of some steps only (names as in the summary's step table; pytest -k expression for the tests):
#   GPU_CHECK_ONLY="pytest sae" GPU_CHECK_PYTEST_K="sae_trains or bf16_fit" bash benchmarks/gpu_check.sh
#
# No pretrained weights travel (they exceed the size limit): throughput and MFU run on a randomly initialised
# BERT-base (benchmarks/common.py write_random_bert) written here; sentences are the project's synthetic sample.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
export TOKENIZERS_PARALLELISM=false
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-530}  # steps that would start later than this are skipped
SMOKE=${GPU_CHECK_SMOKE:-0}
ONLY=${GPU_CHECK_ONLY:-}  # space-separated step names; empty: every step
PYTEST_K=${GPU_CHECK_PYTEST_K:-}

if [ -d .whl ] && ! python3 -c "import jsonargparse, wandb, datasets, sacremoses" 2>/dev/null; then
    echo "== installing the carried wheels (.whl) into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "error: installing the carried wheels in .whl failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
missing=$(python3 -c "
import importlib.util as u
mods = ['torch', 'pytorch_lightning', 'jsonargparse', 'transformers', 'sentence_transformers', 'datasets', 'wandb',
        'torchmetrics', 'safetensors', 'scipy', 'sacremoses', 'pytest', 'yaml', 'accelerate']
print(' '.join(m for m in mods if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    echo "error: missing Python packages: $missing (carry them as wheels: python benchmarks/device_wheels.py)"
    exit 1
fi
if [ "$SMOKE" != 1 ] && ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: benchmarks/gpu_check.sh needs a CUDA device (GPU_CHECK_SMOKE=1 checks the script on a CPU)"
    exit 2
fi

DEST=${OUT:-benchmarks/results}
PARTS=$(mktemp -d)
LOG=$PARTS/gpu_check.log
[ -z "${OUT:-}" ] || LOG=$OUT/gpu_check.log  # comes back with the summary
mkdir -p "$DEST"
: > "$LOG"
python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu-smoke')" \
    > "$PARTS/device.txt"
echo "== $(cat "$PARTS/device.txt"); torch $(python3 -c 'import torch; print(torch.__version__)'); parts in $PARTS" \
    | tee -a "$LOG"

# Steady state: 100 timed steps after 20 warm-up steps, 3 rounds in rotated order, fixed-length batches (every text
# is cut at max length 32); one inductor cache for every compiled run, so each shape is compiled once per check.
export TORCHINDUCTOR_CACHE_DIR=$PARTS/inductor TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
if [ "$SMOKE" = 1 ]; then  # tiny sizes: every step runs, in a few minutes on a CPU
    BERT_SHAPE="2 64"; B_SMALL=8; B_LARGE=16; STEPS=3; WARMUP=2; ROUNDS=2; SAE_ARGS="--quick"; EXTRA_ROUNDS=1
else
    BERT_SHAPE="0 0"; B_SMALL=64; B_LARGE=512; STEPS=100; WARMUP=20; ROUNDS=3; EXTRA_ROUNDS=3
    SAE_ARGS="--d_in 1024 --configs 16x32 --batch 4096 --steps 20 --rounds 3 --sentences 2048"
fi
BERT=$PARTS/random-bert
python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from common import write_random_bert
layers, hidden = map(int, sys.argv[2:4])
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
c = write_random_bert(Path(sys.argv[1]), layers or None, hidden or None)
print(f'random BERT: {c.num_hidden_layers} layers, hidden {c.hidden_size}')" "$BERT" $BERT_SHAPE | tee -a "$LOG"

summarise() { python3 benchmarks/gpu_summary.py "$PARTS" "$DEST" > "$PARTS/summary.out" 2>&1 \
    || { echo "error: the summary failed:"; cat "$PARTS/summary.out"; }; }

step() {  # step NAME TIMEOUT_S COMMAND...: run it, log it, record its status, rewrite the summary
    local name=$1 limit=$2; shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local elapsed=$(( $(date +%s) - START ))
    if [ "$elapsed" -gt "$BUDGET_S" ]; then
        echo "== [$elapsed s] $name: skipped (past the ${BUDGET_S} s budget)" | tee -a "$LOG"
        printf '%s\tskipped (budget)\t0\n' "$name" >> "$PARTS/status.tsv"
        return
    fi
    echo "== [$elapsed s] $name: $*" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local state=ok
    [ "$rc" = 0 ] || state="failed (exit $rc)"
    [ "$rc" = 124 ] && state="timed out (${limit} s)"
    printf '%s\t%s\t%s\n' "$name" "$state" "$(( $(date +%s) - t0 ))" >> "$PARTS/status.tsv"
    summarise
}

PY=python3
step pytest 150 $PY -m pytest -m gpu -q -p no:cacheprovider -rs -o addopts="--strict-markers" \
    --junitxml "$PARTS/pytest.xml" ${PYTEST_K:+-k "$PYTEST_K"} tests/test_gpu.py
COMMON="--model $BERT --steps $STEPS --warmup $WARMUP --rounds $ROUNDS"
# batch 64 first (the unsupervised recipe's batch, where framework overhead shows), with the minimal Lightning loop
step contrastive-small 150 $PY benchmarks/contrastive_throughput.py $COMMON --batch_size $B_SMALL \
    --out "$PARTS/contrastive-small.json"
step contrastive-small-fast 180 $PY benchmarks/contrastive_throughput.py $COMMON --batch_size $B_SMALL --gpu_fast \
    --sides embedlab sentence-transformers --out "$PARTS/contrastive-small-fast.json"
step contrastive-large-fast 200 $PY benchmarks/contrastive_throughput.py $COMMON --batch_size $B_LARGE --gpu_fast \
    --sides embedlab sentence-transformers --out "$PARTS/contrastive-large-fast.json"
step encode 50 $PY benchmarks/eval_throughput.py --model $BERT --rounds $EXTRA_ROUNDS --batch_size 256 \
    --out "$PARTS/encode.json"
step sae 90 $PY benchmarks/sae_throughput.py $SAE_ARGS --model $BERT --out "$PARTS/sae.json"
step mfu 60 $PY benchmarks/mfu.py --batch_sizes $B_SMALL $B_LARGE --steps 30 --warmup 10 --profile \
    $([ "$SMOKE" = 1 ] && echo "--layers 2 --hidden 64") --out "$PARTS/mfu.json"
step contrastive-large 120 $PY benchmarks/contrastive_throughput.py $COMMON --batch_size $B_LARGE \
    --sides embedlab sentence-transformers --out "$PARTS/contrastive-large.json"
step switches 120 $PY benchmarks/switches.py --model $BERT --batch_size $B_LARGE --steps 30 --warmup 10 \
    --rounds 1 $([ "$SMOKE" = 1 ] && echo "--switches sdpa pad8 group workers") --out "$PARTS/switches.json"

summarise
cat "$PARTS/summary.out" | tee -a "$LOG"
echo "== done in $(( $(date +%s) - START )) s; summary in $DEST/gpu-$(python3 -c "
import re; print(re.sub(r'[^a-z0-9]+', '-', open('$PARTS/device.txt').read().strip().lower()).strip('-'))").{json,md}, \
log in $LOG"
grep -q "failed\|timed out" "$PARTS/status.tsv" && exit 1
exit 0

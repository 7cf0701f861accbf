#!/usr/bin/env bash
# Every `--full` benchmark (published sizes, every layer, bf16) and the CUDA tests, in one run on one GPU.
#
#   benchmarks/full.sh [LOGS]
#
# Each step's output goes to LOGS/<step>.log (default LOGS: full-logs) and one line per step, with its exit
# status and seconds, to LOGS/summary.txt; a failing step does not stop the others. Narrow the run with
# FAMILIES (VLM families, default every one of vlmtools.testing.published.FAMILIES), ATTN (the implementations
# seam.py and pruning.py load, default "sdpa flash_attention_2"; flash_attention_2 needs flash_attn), and
# LIMIT (seconds per step, default 300). PYTHON names the interpreter (default python).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the packages of this checkout, installed or not
logs=${1:-full-logs}
python=${PYTHON:-python}
mkdir -p "$logs"
: >"$logs/summary.txt"

step() {
    local name=$1 start=$SECONDS status
    shift
    timeout "${LIMIT:-300}" "$@" >"$logs/$name.log" 2>&1
    status=$?
    echo "$name: exit $status, $((SECONDS - start)) s" | tee -a "$logs/summary.txt"
}

families=${FAMILIES:-$("$python" -c 'from vlmtools.testing.published import FAMILIES; print(*FAMILIES)')}
step cuda_tests "$python" -m pytest -q tests/test_kernels.py -k on_cuda -rs
for attn in ${ATTN:-sdpa flash_attention_2}; do
    for family in $families; do
        step "seam_${family}_${attn}" "$python" benchmarks/seam.py --full --family "$family" --attn "$attn" --repeats 5
        step "pruning_${family}_${attn}" "$python" benchmarks/pruning.py --full --family "$family" --attn "$attn"
    done
done
step sinks "$python" benchmarks/sinks.py --full
step hallucination "$python" benchmarks/hallucination.py --full
step dit_memory "$python" benchmarks/dit_memory.py --family all --full

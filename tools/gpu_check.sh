#!/usr/bin/env bash
# The first CUDA run on one H100/H200, in two calls that each end within 8 minutes:
#   tests  test_gpu.py (the FlexAttention tree mask and its compile bound, the bf16 FSDP2 step against
#          fp32 on the CPU, NCCL, --cpu_offload, decoding on the GPU), each test stopped at 150 s, the
#          stage at 450 s -> $OUT/gpu-test.txt, env.txt
#   bench  bench.py at full size, stopped at 420 s (rows already measured stay in bench.json) -> bench.json, bench.log
# Its first output line says whether the Python imports the code needs are there: the GPU image has
# torch, transformers, numpy, scipy, matplotlib, pyarrow, pytest and pytest-timeout, not math-verify
# (score.py, imported by infer.py); its pure-Python wheels are fetched here beforehand and carried.
#
#   bash tools/gpu_check.sh wheels                          # on a machine with PyPI: -> gpu_wheels/ (carry it)
#   OUT=out/gpu_check bash tools/gpu_check.sh tests         # GPU, call 1
#   OUT=out/gpu_check bash tools/gpu_check.sh bench         # GPU, call 2
#   OUT=/tmp/dry QUICK=1 bash tools/gpu_check.sh tests; OUT=/tmp/dry QUICK=1 bash tools/gpu_check.sh bench   # dry run, CPU
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root
STAGE=${1:-tests}
if [ "$STAGE" = wheels ]; then
    exec pip download -q --no-deps -d gpu_wheels math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
        antlr4-python3-runtime==4.13.2
fi
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if python -c "import math_verify" 2>/dev/null; then
    echo "imports: math-verify is installed"
elif ls gpu_wheels/*.whl >/dev/null 2>&1 && pip install -q --no-index --no-deps --target .gpu_deps gpu_wheels/*.whl \
        && PYTHONPATH=$PWD/.gpu_deps python -c "import math_verify"; then
    export PYTHONPATH=$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}
    echo "imports: math-verify installed from the carried gpu_wheels/ into .gpu_deps"
else
    echo "imports: math-verify MISSING and no gpu_wheels/ carried: infer.py, test_gpu.py and bench.py cannot import"
    exit 2
fi
case "$STAGE" in
tests)
    { nvidia-smi 2>&1 | head -15; python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, '| transformers', transformers.__version__)"; } > "$OUT/env.txt" 2>&1
    per_test=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout 150")
    timeout 450 python -m pytest -q -rs $per_test tests/test_gpu.py 2>&1 | tee "$OUT/gpu-test.txt" ;;
bench)
    if [ -n "${QUICK:-}" ]; then
        timeout 420 python tools/bench.py --quick --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
    else
        timeout 420 python -m torch.distributed.run --standalone --nproc_per_node 1 tools/bench.py --out "$OUT/bench.json" \
            2>&1 | tee "$OUT/bench.log"
    fi ;;
*)
    echo "usage: bash tools/gpu_check.sh wheels|tests|bench"; exit 2 ;;
esac

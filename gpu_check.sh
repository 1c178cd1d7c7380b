#!/usr/bin/env bash
# The first CUDA run, in one call on one GPU (about 8 minutes): the CUDA tests (test_gpu.py: the
# FlexAttention tree mask, the bf16 FSDP2 step against fp32, NCCL, --cpu_offload, decoding on the
# GPU), then bench.py at full size. Everything lands in $OUT: gpu-test.txt, bench.json, bench.log,
# env.txt. A failing test does not stop the benchmark: the log names it.
#
#   OUT=out/gpu_check bash gpu_check.sh             # on a GPU machine
#   OUT=/tmp/dry QUICK=1 bash gpu_check.sh          # dry run on the CPU: tiny shapes, the CUDA tests skip
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi 2>&1 | head -15; python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, '| transformers', transformers.__version__)"; } > "$OUT/env.txt" 2>&1
python -m pytest -q -rs test_gpu.py 2>&1 | tee "$OUT/gpu-test.txt"
if [ -n "${QUICK:-}" ]; then
    python bench.py --quick --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
else
    python -m torch.distributed.run --standalone --nproc_per_node 1 bench.py --out "$OUT/bench.json" 2>&1 \
        | tee "$OUT/bench.log"
fi

#!/usr/bin/env bash
# The GPU checks of one session with a lent GPU, in one script that finishes in under 8 minutes:
# the CUDA tests (tests/test_gpu.py), then the aggregation and training-step benchmark with bf16 autocast on
# the paper's shapes (8 bags of 13 patches of 3x512x512). Each part has its own time limit, so a slow part
# cannot eat the others' time. Without CUDA it runs the same benchmark on the CPU on small shapes (a check
# that the script works), and the CUDA tests skip.
#
#   bash benchmarks/gpu_check.sh [out_dir]      # default out_dir: benchmarks/out/gpu
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/out/gpu}"
mkdir -p "$out"
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    device=(--device cuda --amp bf16 --bags 8 --per-bag 13 --image-size 512 --repeats 5)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
else
    device=(--device cpu --bags 2 --per-bag 4 --image-size 64 --repeats 1 --skip-merge-order)
fi
status=0
timeout 240 python -m pytest -p no:cacheprovider -n 0 -q tests/test_gpu.py > "$out/test_gpu.txt" 2>&1
echo "tests/test_gpu.py: exit $? (see $out/test_gpu.txt)"
tail -3 "$out/test_gpu.txt"
timeout 200 python benchmarks/bench_aggregation.py "${device[@]}" > "$out/bench_aggregation.txt" 2>&1 || status=1
echo "bench_aggregation.py ${device[*]}: exit ${status}"
cat "$out/bench_aggregation.txt"
exit "$status"

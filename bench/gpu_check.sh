#!/usr/bin/env bash
# GPU checks for the scoring path and the energy meter (issue 13). Run on a machine with an NVIDIA GPU:
#   bash bench/gpu_check.sh            # from the repository root; writes bench/results/gpu_check/
# 1. the GPU-marked tests (real NVML meter; skipped without CUDA, so here they must RUN, not skip);
# 2. default scoring call ÷ training epoch on CUDA, with quality vs exact, at 1x, 4x, 8x seed widths;
# 3. a scoring call on CUDA equals the CPU one (same model, same batches) within float32 noise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT_DIR:-bench/results/gpu_check}
mkdir -p "$OUT"
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

# 1. GPU-marked tests; -rs lists skips, and a skip here is a failure of the check
$PY -m pytest -m gpu -rs -q tests 2>&1 | tee "$OUT/pytest_gpu.txt"
if grep -q "SKIPPED" "$OUT/pytest_gpu.txt"; then echo "gpu tests were skipped on a GPU machine" >&2; exit 1; fi

# 2. scoring vs training on CUDA (the NVML meter is exercised by the tests above)
$PY bench/bench_scoring.py --device cuda --images 1280 --widths 1,4,8 --threads 1 --repeats 3 \
    --exact-batches 0 --quality --out "$OUT/scoring_cuda.json" 2>&1 | tee "$OUT/scoring_cuda.txt"

# 3. CUDA and CPU give the same splitting indices (no CPU-only maths, no silent host fallbacks)
$PY - <<'PYEOF' 2>&1 | tee "$OUT/cuda_vs_cpu.txt"
import copy, sys
sys.path.insert(0, "tests")
import torch
from conftest import batches, synthetic_data, tiny_mobilenet, train_briefly
from hwsplit import splitting_indices
x, y = synthetic_data(512, resolution=12)
data = batches(x, y, 64)
model = train_briefly(tiny_mobilenet(), data, epochs=5)
for method in ("rayleigh", "exact"):
    cpu = splitting_indices(model, data, method=method)
    gpu = splitting_indices(copy.deepcopy(model).cuda(), data, method=method)
    for name in cpu:
        err = (cpu[name].eigenvalues - gpu[name].eigenvalues).abs().max() / cpu[name].eigenvalues.abs().max()
        print(f"{method} {name}: max relative difference {err:.2e}")
        assert err < 1e-3, (method, name, float(err))
print("cuda == cpu: ok")
PYEOF
echo "gpu_check: all passed; results in $OUT"

#!/bin/bash
# One lease of a lent GPU machine, in one call: install the carried wheels, run the GPU-marked
# tests, then time `kneebatch run` on the GPU against the per-study baseline (run_throughput.py),
# clinical studies first, the OAI's after, each step under its own time limit so that a slow
# step still leaves the earlier records. Records and logs go to $OUT.
#
# Sized from the first lease (2026-12-04, H200, 16 cores): 12 clinical studies through synth,
# convert, the baseline and two settings (one compiled) took 165 s with OMP_NUM_THREADS=2;
# 32 clinical studies did not finish synth + convert + baseline inside 200 s.
#
#   here:   the wheels into .whl: the command at the top of benchmarks/gpu-wheels.txt
#   device: bash benchmarks/gpu_session.sh          (carry .whl)
#   dry run on a CPU: DEVICE=cpu N=2 bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/kneebatch-gpu-session}
DEVICE=${DEVICE:-cuda}
N=${N:-16}
N_OAI=${N_OAI:-6}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ -d .whl ] && [ "$DEVICE" = cuda ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
$PY - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("cupy", "dask", "distributed", "dask_cuda", "zarr", "monai", "onnxruntime"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # a missing package is a finding, not a stop
        print(name, "not importable:", type(e).__name__, e)
EOF

SETTINGS=${SETTINGS:-"torch:1 torch:1:half torch:1:half:batch1 torch-compile:1:half"}
if [ "$DEVICE" = cuda ]; then
  timeout 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_array_path.py tests/test_compiled.py tests/test_train.py \
    tests/test_gpu_cluster.py 2>&1 | tee "$OUT/pytest-gpu.log" | tail -20
fi
timeout ${T_CLINICAL:-230} $PY benchmarks/run_throughput.py --n "$N" --device "$DEVICE" --repeat 1 \
  --synth-workers "$(nproc)" --settings $SETTINGS --out "$OUT" 2>&1 | tee "$OUT/run-clinical.log" | grep -v Warning
timeout ${T_OAI:-140} $PY benchmarks/run_throughput.py --n "$N_OAI" --protocol oai --engines engines/dess-pdfs \
  --device "$DEVICE" --repeat 1 --synth-workers "$(nproc)" --settings torch:1:half torch-compile:1:half \
  --out "$OUT" 2>&1 | tee "$OUT/run-oai.log" | grep -v Warning
# last, on its own: a dask-cuda cluster that hangs must not cost the records above
if [ "$DEVICE" = cuda ]; then
  timeout ${T_DASK_CUDA:-110} $PY benchmarks/run_throughput.py --n 8 --device cuda --repeat 1 \
    --synth-workers "$(nproc)" --settings torch:1:half torch:1:half:dask-cuda --out "$OUT" 2>&1 \
    | tee "$OUT/run-dask-cuda.log" | grep -v Warning
fi
ls "$OUT"

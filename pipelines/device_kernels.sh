#!/usr/bin/env bash
# One device call for issues 3 and 5: the kernel table (bench_kernels.py), the 7B-shape generation
# benchmark (bench_generate.py) and the stall counters of the M = 1 kernel under Nsight Compute.
# Needs no carried files: the benchmarks use random weights and the image's torch/triton.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
export EFFICIENTQAT_CACHE_DIR=$out/cache   # tuned configs: fresh, and returned with the results
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
start=$(date +%s)
timeout "${KERNELS_S:-360}" python3 pipelines/bench_kernels.py --out "$out" > "$out/bench_kernels.log" 2>&1
echo "bench_kernels rc=$? in $(( $(date +%s) - start )) s"
grep -E "^\||^device" "$out/bench_kernels.log" | tail -60
timeout "${GENERATE_S:-200}" python3 pipelines/bench_generate.py --out "$out" > "$out/bench_generate.log" 2>&1
echo "bench_generate rc=$? in $(( $(date +%s) - start )) s"
grep -v -i warn "$out/bench_generate.log" | tail -12
# Where the M = 1 kernel's warps wait (8192 x 8192, w4g128, the tuned config): hardware counters.
cat > /tmp/m1.py <<'PY'
import sys; sys.path.insert(0, "pipelines")
from bench_kernels import make_layer
import torch
from efficientqat.quantizer import QuantSpec
layer = make_layer(8192, 8192, QuantSpec(4, 128), "cuda")
x = torch.randn(1, 8192, device="cuda", dtype=torch.float16)
for _ in range(3):
    layer(x)
torch.cuda.synchronize()
PY
timeout 90 ncu --clock-control none -k regex:gemv1 -s 2 -c 1 --section SpeedOfLight --section Occupancy \
  --section WarpStateStats --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
  python3 /tmp/m1.py > "$out/ncu_m1.txt" 2>&1
grep -E "Duration|DRAM Throughput|Compute \(SM\)|Registers|Achieved Occ|Warp Cycles Per Issued|stalled_(long_scoreboard|short_scoreboard|wait|math_pipe_throttle|not_selected|lg_throttle|mio_throttle|no_instruction|dispatch|barrier|selected)_per" "$out/ncu_m1.txt"

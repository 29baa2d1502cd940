#!/usr/bin/env bash
# One device call: Block-AP quality sweep on ref-llama-11m, then the 7B-shape speed benchmark.
# Expects .whl/ (hydra-core, omegaconf, antlr4, datasets, dill, multiprocess) and .devdata/ carried.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
python3 -c "import torch, transformers, datasets, pyarrow, hydra, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
out=${OUT:-/tmp/out}
start=$(date +%s)
bash pipelines/blockap_ref_quality.sh .devdata/ref-llama-11m .devdata hydra.sweep.dir=/tmp/sweep wandb.mode=disabled "$@" > $out/quality.log 2>&1
echo "quality sweep rc=$? in $(( $(date +%s) - start )) s"
grep -v "it/s\]" $out/quality.log | grep -E "block [0-9]|error|Error" | tail -30
cp /tmp/sweep/summary.md $out/ 2>/dev/null; cp /tmp/sweep/summary.json $out/ 2>/dev/null
for d in /tmp/sweep/*/; do cp "$d/metrics.json" "$out/metrics-$(basename $d).json" 2>/dev/null; done
for p in fp16 bf16; do python3 pipelines/bench_blockap_speed.py --precision $p --out $out/speed-$p.json 2>&1 | grep -v Warning | tail -6; done
cat $out/summary.md 2>/dev/null

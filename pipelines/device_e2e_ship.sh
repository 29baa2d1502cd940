#!/usr/bin/env bash
# One device call for issues 4 and 5: Block-AP sweep on ref-llama-11m, E2E-QP from each result
# (pretraining text: C4-val-2k docs 0-1499, 1024-token windows), then the E2E-QP throughput
# benchmark (Triton vs dequantize-then-matmul) and the generation benchmark (7B shape).
# Expects .whl/ and .devdata/ carried (see pipelines/device_blockap.sh).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
out=${OUT:-/tmp/out}; mkdir -p $out
start=$(date +%s)
bash pipelines/blockap_ref_quality.sh .devdata/ref-llama-11m .devdata hydra.sweep.dir=/tmp/sweep wandb.mode=disabled > $out/blockap.log 2>&1
echo "block-ap sweep rc=$? $(( $(date +%s) - start )) s"
for run in /tmp/sweep/*/; do
  q=$(basename $run)
  python3 -m efficientqat.e2eqp init_from=$run hydra.run.dir=/tmp/e2e/$q wandb.mode=disabled \
    eval=local_ref eval.baselines=[] eval.sets.wikitext2.source=.devdata/wikitext2-raw-test.jsonl.gz \
    eval.sets.c4.source=.devdata/c4-validation-2k.jsonl.gz e2e_data.name=c4-val-2k \
    e2e_data.source=.devdata/c4-validation-2k.jsonl.gz "e2e_data.docs='0:1500'" e2e_data.context=1024 \
    e2e_data.max_samples=null e2e_data.n_val=32 e2e_train.epochs=2 e2e_train.micro_batch=8 "$@" >> $out/e2e.log 2>&1
  echo "e2e $q rc=$? $(( $(date +%s) - start )) s"
  python3 -c "import json,sys; m=json.load(open('/tmp/e2e/$q/metrics.json')); print(m['table'])" 2>/dev/null
done
python3 -c "
import json, glob
rows = {}
for f in sorted(glob.glob('/tmp/e2e/*/metrics.json')):
    m = json.load(open(f)); rows[f.split('/')[3]] = m
json.dump(rows, open('$out/e2e_metrics.json', 'w'), indent=1)"
timeout 150 python3 pipelines/bench_e2eqp_speed.py --out $out/e2e_speed.json 2>&1 | grep -v Warning | tail -8
timeout 200 python3 pipelines/bench_generate.py --out $out/gen 2>&1 | grep -v Warning | tail -14

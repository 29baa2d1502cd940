#!/usr/bin/env bash
# Block-AP quality on the reference model, the setting of ../shared/models/README.md:
# calibrate on C4-val-2k documents 0-1499 (512 x 1024 tokens, 32 validation windows, batch 2,
# 2 epochs), evaluate WikiText-2 test and C4-val-2k documents 1500+ at 1024 tokens, beside FP16
# and round-to-nearest, for w2g64, w3g128 and w4g128 in one Hydra sweep.
#
#   pipelines/blockap_ref_quality.sh MODEL_DIR DATA_DIR [more hydra overrides]
#   e.g. pipelines/blockap_ref_quality.sh ../shared/models/ref-llama-11m ../shared/data
set -euo pipefail
model=${1:?model folder}; data=${2:?folder with c4-validation-2k.jsonl.gz and wikitext2-raw-test.jsonl.gz}
shift 2
exec python3 -m efficientqat.blockap -m \
  model=ref_llama_11m "model.path=$model" \
  data=c4_local "data.source=$data/c4-validation-2k.jsonl.gz" \
  eval=local_ref "eval.sets.wikitext2.source=$data/wikitext2-raw-test.jsonl.gz" \
  "eval.sets.c4.source=$data/c4-validation-2k.jsonl.gz" \
  quant=w2g64,w3g128,w4g128 "$@"

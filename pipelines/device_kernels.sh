#!/usr/bin/env bash
# Device calls for issues 3 and 5 (kernels, generation), one stage per call so that each fits the
# 10-minute command limit:
#
#   bash pipelines/device_kernels.sh tests              # GPU kernel tests (paired fp16, its K lanes and SiLU epilogue, tensor cores, graphs)
#   bash pipelines/device_kernels.sh decoder            # GPU tests of the fused decoder layer and decode attention
#   bash pipelines/device_kernels.sh generate w4g128 8  # bench_generate --compile --profile at batch 8 (default 1;
#                                                     # with a fresh cache one batch size per call; further
#                                                     # arguments go to bench_generate, e.g. --no-pdl)
#   bash pipelines/device_kernels.sh attention          # bench_decode_attention: fused decode attention's launch
#                                                     # shapes against the unfused rotary + cache update + SDPA
#   bash pipelines/device_kernels.sh sweep              # sweep_decode: M = 1 paired / float32, M = 16 tensor cores
#   bash pipelines/device_kernels.sh kmajor             # sweep_decode N-major vs K-major codes, M = 1 / 4 / 16
#   bash pipelines/device_kernels.sh layout             # layout_study: M = 16 / 4 prototype over N-major vs
#                                                     # micro-tile codes, against cuBLAS (8192^2, w4g128); further
#                                                     # arguments go to layout_study, e.g. --production --split 8 --stages 1
#   bash pipelines/device_kernels.sh table w4g128,w3g128 [SHAPES [LAYOUT]]  # bench_kernels --no-train, M = 1, 4, 16
#                                                     # (SHAPES e.g. "8192,8192", "" for the issue's five; LAYOUT
#                                                     # fragments or k-major: bench_kernels --fragments / --k-major,
#                                                     # with fragments its GPU float64 tests first)
#   bash pipelines/device_kernels.sh layers w4g128,w2g64  # bench_kernels at M = 1 on a 7B model's four fused
#                                                     # layer shapes, with the fixed-cost / streaming-rate fit
#                                                     # and each layer again with the RMSNorm prologue
#   bash pipelines/device_kernels.sh large [QUANT]    # forward + backward at M = 2048 on the issue's five layer shapes
#                                                     # (bf16, against cuBLAS and dequantize-then-matmul)
#   bash pipelines/device_kernels.sh tuning [QUANT]   # first-start tuning time of the 4096^2 layer at M = 1,
#                                                     # candidate tiles compiled one by one vs by 8 threads
#   bash pipelines/device_kernels.sh ab [QUANTS [TILES [REVS]]]  # fragments_ab: the fragment kernel's tiles
#                                                     # (cols:warps:ahead:vectors, default one step ahead against
#                                                     # none) side by side, M = 16 and 1, then its GPU tests
#   bash pipelines/device_kernels.sh profile ["N,K:QUANT:M[:LAYOUT] ..."]  # ncu counters and per-instruction
#                                                     # stalls (LAYOUT: profile_kernel.py --layout)
#                                                     # (default: M = 16 tensor cores, M = 1 w2g64 and 4096^2)
#
# Tuned configs go to $EFFICIENTQAT_CACHE_DIR (default .lab/tc, git-ignored): carry that folder from
# one call to the next (device tool `carry`) so no call re-tunes what an earlier one tuned; each call
# copies it to $OUT/tc. Needs nothing else: the benchmarks use random weights and the image's packages.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export EFFICIENTQAT_CACHE_DIR=${EFFICIENTQAT_CACHE_DIR:-$PWD/.lab/tc}
out=${OUT:-/tmp/out}; mkdir -p "$out" "$EFFICIENTQAT_CACHE_DIR"
stage=${1:-tests}
start=$(date +%s)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
case $stage in
  tests)
    timeout 560 python3 -m pytest -q tests/test_kernels.py -k "gpu_half2 or gpu_tc or chained or capture or silu or lane" 2>&1 | tail -15 ;;
  decoder)
    # the fused decoder layer (norm prologue, residual epilogue) and the fused attention, on the GPU
    timeout 300 python3 -m pytest -q tests/test_fused_decoder.py tests/test_fused_attention.py \
      tests/test_kernels.py::test_row_ops_dispatch_in_the_kernels_and_around_the_gemm \
      "tests/test_kernels.py::test_decode_kernels_normalise_their_input_and_add_the_residual" 2>&1 | tail -15 ;;
  generate)
    timeout 560 python3 pipelines/bench_generate.py --out "$out/generate" --settings "${2:-w4g128}" --batches "${3:-1}" \
      --compile --profile --prefill 128 --iters 5 "${@:4}" 2>&1 | grep -v -i warn | tail -110 ;;
  attention)
    timeout 560 python3 pipelines/bench_decode_attention.py --out "$out/attention" "${@:2}" 2>&1 | grep -v -i warn | tail -70 ;;
  sweep)
    timeout 270 python3 pipelines/sweep_decode.py --shape 8192,8192 --quants w3g128,w2g64,w4g128 --m 1 \
      --kernels half2 --variants fixup,pdl --budget-s 60 --out "$out/sweep_m1" 2>&1 | grep "^|" | head -12
    timeout 270 python3 pipelines/sweep_decode.py --shape 8192,8192 --quants w4g128 --m 4,16 \
      --kernels tc,tcp --variants fixup --budget-s 150 --out "$out/sweep_m16" 2>&1 | grep "^|" | head -12 ;;
  kmajor)
    # session 7: K-major codes took the M = 16 tensor-core kernel from 32.2 to 28.3 us; one layout has
    # to serve every M, so the M = 1 kernels are timed on both too (same process per layout, cuBLAS alongside)
    for layout in "" "--k-major"; do
      timeout 140 python3 pipelines/sweep_decode.py --shape 8192,8192 --quants w4g128,w2g64 --m 1 --kernels half2,gemv1 \
        --variants fixup --budget-s 30 $layout --out "$out/kmajor_m1$layout" 2>&1 | grep "^|" | head -8
      timeout 120 python3 pipelines/sweep_decode.py --shape 8192,8192 --quants w4g128 --m 16,4 --kernels tcp \
        --variants fixup --budget-s 25 $layout --out "$out/kmajor_m16$layout" 2>&1 | grep "^|" | head -8
    done ;;
  layout)
    timeout 560 python3 pipelines/layout_study.py --sass --time --m 16,4 --out "$out/layout_study.json" "${@:2}" 2>&1 \
      | grep -E "^\||^\{\"layout" | tail -20 ;;
  table)
    layout=${4:-}
    case $layout in
      ""|n-major) layout_flag=() ;;
      fragments) layout_flag=(--fragments)
        timeout 200 python3 -m pytest -q tests/test_kernels.py -k "fragment_kernel or three_bit" 2>&1 | tail -3 ;;
      k-major) layout_flag=(--k-major) ;;
      *) echo "table: unknown layout '$layout' (n-major, fragments or k-major)" >&2; exit 2 ;;
    esac
    timeout 560 python3 pipelines/bench_kernels.py --out "$out/table" --no-train --ms 1,4,16 --small-quants-ms 1,4,16 \
      --quants "${2:-w4g128,w3g128}" ${3:+--shapes "$3"} "${layout_flag[@]}" 2>&1 | grep -E "^\||^device" | tail -40 ;;
  layers)
    timeout 560 python3 pipelines/bench_kernels.py --out "$out/layers" --no-train --ms 1 --small-quants-ms 1 --row-ops \
      --quants "${2:-w4g128,w3g128,w2g64}" --shapes "4096,4096;12288,4096;22016,4096;4096,11008" 2>&1 \
      | grep -E "^\||^device" | tail -20 ;;
  large)
    timeout 560 python3 pipelines/bench_kernels.py --out "$out/large" --quants "${2:-w4g128}" --ms 2048 \
      --shapes "4096,4096;11008,4096;4096,11008;8192,8192;28672,8192" 2>&1 | grep -E "^\||^device" | tail -12 ;;
  tuning)
    timeout 560 python3 pipelines/bench_tuning.py --shape 4096,4096 --quant "${2:-w3g128}" --m 1 --threads 0,8 \
      --out "$out/tuning" 2>&1 | tail -8 ;;
  ab)
    # session 23: tiles with no step ahead hold fewer registers and instructions (sm_90 SASS) but were not
    # timed; each tile of each revision in one process, checked against float64
    timeout 380 python3 pipelines/fragments_ab.py --revs "${4:-tree}" --quants "${2:-w4g128,w2g64}" --tokens 16,1 \
      --tiles "${3:-32:8:1:2,32:8:0:2,16:8:1:2,16:8:0:2,32:8:1:1,32:8:0:1}" --out "$out/ab.json" 2>&1 \
      | grep -v -i warn | tail -40
    timeout 180 python3 -m pytest -q tests/test_kernels.py -k fragment_kernel 2>&1 | tail -3 ;;
  profile)
    # hardware counters of the tuned kernel (session 7: M = 16 at 12.5% occupancy, 221 registers, 0.23 IPC,
    # long-scoreboard stalls first): the sections, the stall and L2-atomic metrics by name (retried without
    # them if this ncu does not know the names), and the per-SASS-instruction stall samples (source page, CSV)
    # that say which load the warps wait on; the sectors L2 serves to the SMs against the bytes DRAM reads
    # (an M = 16 program reads all of x, 256 KB at K = 8192, from L1 or L2)
    stalls="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:lts__t_(sectors|requests)_op_(red|atom)\.sum,lts__t_sectors_srcunit_tex_op_read.sum,dram__bytes_read.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld_lookup_hit.sum"
    for case in ${2:-"8192,8192:w4g128:16 8192,8192:w2g64:1 4096,4096:w4g128:1"}; do
      IFS=: read -r shape quant m layout <<< "$case"
      layout=${layout:-n-major}
      base="$out/ncu_${quant}_m${m}_${shape/,/x}_${layout}"
      # tune outside ncu first: timed under the profiler the tuner chooses other tiles (session 22: the
      # tensor-core tile over the fragment-order kernel that wins by 8 us without it)
      timeout 200 python3 pipelines/profile_kernel.py --shape "$shape" --quant "$quant" --m "$m" --layout "$layout" \
        --calls 1 > "$base.tune.log" 2>&1
      for with_metrics in 1 0; do
        metrics=(); [ "$with_metrics" = 1 ] && metrics=(--metrics "$stalls")  # an array: the regexes stay unglobbed
        timeout 200 ncu --clock-control none --profile-from-start off --kernel-name regex:_dq_ --launch-count 1 \
          --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
          --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats \
          --section SourceCounters --import-source no "${metrics[@]}" -f -o "$base" \
          python3 pipelines/profile_kernel.py --shape "$shape" --quant "$quant" --m "$m" --layout "$layout" > "$base.log" 2>&1 && break
      done
      ncu -i "$base.ncu-rep" > "$base.txt" 2>&1
      ncu -i "$base.ncu-rep" --page source --csv --print-source sass > "$base.sass.csv" 2>&1
      echo "ncu $case:"; grep chosen "$base.log"
      grep -E "Duration|Achieved Occupancy|Theoretical Occupancy|Memory Throughput|Throughput|Hit Rate|Registers Per|Issued Warp|stalled_(long|short|barrier|wait|mio|lg_thr|math|not_sel)|srcunit_tex|dram__bytes|global_op_ld" \
        "$base.txt" | head -40
    done ;;
  *)
    echo "unknown stage '$stage': tests, generate SETTING, attention, sweep, kmajor, layout, table QUANTS, layers QUANTS, large [QUANT], tuning [QUANT], ab [QUANTS [TILES [REVS]]] or profile [CASES]" >&2; exit 2 ;;
esac
echo "$stage done in $(( $(date +%s) - start )) s"
mkdir -p "$out/tc" && cp -r "$EFFICIENTQAT_CACHE_DIR"/. "$out/tc"/  # a second stage in one command overwrites, not nests

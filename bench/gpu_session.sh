#!/usr/bin/env bash
# GPU-host session steps (DESIGN.md): kernel tests and benchmarks, logs and JSON to $OUT.
# Usage on the host, after the .gpu bundle is installed:
#   bash bench/gpu_session.sh STEP...   (in order; steps: tests tests-matvec profile kernels
#     kernels-big kernels-sweep ncu-prefill-q4k ncu-kernels ncu-matvec ncu-decode ncu-decode-q4k
#     ncu-detail ncu-detail-decode scan ncu-scan mlx mlx-1.5b graph-size q4k webgpu-kernel
#     webgpu-kernel-sweep webgpu-q4k-decode webgpu-profile webgpu
#     layer-kernel llama-peer decode-profile bench-batch bench-sync bench-context bench-sizes bench-sync-2.9b bench-serve bench-plots)
# Each step has its own time limit so one 10-minute device call can hold several; bench/gpu_call.sh
# wraps a device call around them (install, this commit, results tarred into $OUT as they come).
# The full `mlx-rwkv bench` matrix (issue 15) in two device calls of <= 9 minutes:
#   call 1: bash bench/gpu_session.sh bench-sync bench-context               (<= 300 + 200 s)
#   call 2: bash bench/gpu_session.sh bench-sizes bench-sync-2.9b              (<= 240 + 200 s)
# then, on any machine with matplotlib: python -m mlx_rwkv.bench_plots bench/results/<device>-<date>.json
# Each bench step merges its records into bench/results/<device>-<date>.json after every model,
# so a step cut off by its limit keeps the models it finished.
set -uo pipefail
source /root/gpu-env.sh
out="${OUT:-/tmp/out}"; mkdir -p "$out"
run() {  # run NAME LIMIT_S CMD...: tee the filtered log to $out/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$out/session.log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -i warn | tee "$out/$name.log" | tail -40
  echo "== $name done in $((SECONDS - t0)) s" | tee -a "$out/session.log"
  cp bench/results/*.json "$out/" 2>/dev/null  # after every step: a cut-off session keeps its results
}
gpu_tests=(tests/test_wkv_kernel.py tests/test_matvec_kernel.py tests/test_q4k_kernel.py)
pytest_gpu=(python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short --durations=5)
ncu=(/usr/local/cuda/bin/ncu --csv --metrics gpu__time_duration.sum)
# stall analysis (the ncu-matvec / ncu-detail / ncu-detail-decode steps); each adds its kernel filter
ncu_stalls=(/usr/local/cuda/bin/ncu --section SpeedOfLight --section Occupancy --section LaunchStats
            --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis
            --section SourceCounters)
stall_lines="'rwkv_|Duration|Achieved Occupancy|Registers Per|cycles being|Throughput'"
kernel_shapes=(4096x4096 8192x2048 2048x8192 65536x2048)
bench=(python3 -m mlx_rwkv.bench_cli --write --decode-steps 64 --slow-steps 16 --repeats 3)
for step in "$@"; do
  case "$step" in
    tests) run gpu_tests 300 "${pytest_gpu[@]}" "${gpu_tests[@]}" ;;
    tests-matvec) run gpu_tests_matvec 150 "${pytest_gpu[@]}" "${gpu_tests[@]}" -k "matvec or q4k or norm_mix" ;;
    profile) run inspect_graph 60 python3 -m bench.inspect_graph --shape 1.5B --layers 2
             run profile_prefill 120 python3 -m bench.profile_prefill --shape 1.5B ;;
    kernels) run bench_dispatch 60 python3 -m bench.bench_dispatch --write
             run bench_q4k 200 python3 -m bench.bench_q4k --shapes 2048x2048 "${kernel_shapes[@]}" \
               --rows 1 8 --repeats 5 --write ;;
    kernels-big) run bench_q4k 60 python3 -m bench.bench_q4k --shapes 4096x4096 65536x2048 --rows 1 8 \
               --repeats 5 --write ;;
    kernels-sweep) run bench_q4k_sweep 200 python3 -m bench.bench_q4k --shapes "${kernel_shapes[@]}" --rows 1 8 \
               --repeats 5 --rows-per-simdgroup 2 4 --blocks-in-flight 1 2 --write ;;
    ncu-prefill-q4k) run ncu_prefill 90 bash -c "${ncu[*]} python3 -m bench.kernel_times run prefill --precision q4k \
               --layers 4 > $out/prefill_q4k.csv && python3 -m bench.kernel_times summarize $out/prefill_q4k.csv" ;;
    ncu-decode) run ncu_decode 60 bash -c "${ncu[*]} python3 -m bench.kernel_times run decode > $out/decode.csv" ;;
    ncu-kernels) for shape in 8x2048 "${kernel_shapes[@]}"; do
               run ncu_kernels_$shape 90 bash -c "${ncu[*]} python3 -m bench.bench_q4k --shapes $shape --rows 1 8 \
               --calls 4 --repeats 1 > $out/kernels_$shape.csv; python3 -m bench.kernel_times summarize --all \
               $out/kernels_$shape.csv"; done ;;
    ncu-matvec) run ncu_matvec 90 bash -c "${ncu_stalls[*]} -k regex:matvec --launch-count 2 \
               python3 -m bench.bench_q4k --shapes 4096x4096 --rows 1 --calls 1 --repeats 1 > $out/ncu_matvec.txt; \
               grep -E $stall_lines $out/ncu_matvec.txt | head -60" ;;
    # decode with 2 layers: 3 norm_mix + 2 wkv7 launches per pass; the first pass warms up
    ncu-detail-decode) run ncu_detail_decode 120 bash -c "${ncu_stalls[*]} -k 'regex:wkv7|norm_mix' \
               --launch-skip 5 --launch-count 5 python3 -m bench.kernel_times run decode --layers 2 \
               > $out/ncu_detail_decode.txt; grep -E $stall_lines $out/ncu_detail_decode.txt | head -60" ;;
    # where a 1.5B decode step goes: host issue time and wall time per step, then ncu kernel time
    decode-profile) for p in f16 q4k; do
               run wall_$p 90 python3 -m bench.kernel_times wall --precision $p
               run ncu_decode_$p 150 bash -c "${ncu[*]} python3 -m bench.kernel_times run decode --precision $p \
               > $out/decode_$p.csv && python3 -m bench.kernel_times summarize $out/decode_$p.csv"; done ;;
    # the persistent layer kernel (issue 14): GPU correctness, decode with and without it in one run, ncu
    # (the official package's 1.5B rows come from bench-sync, which this step would double in time)
    layer-kernel) run test_layer_kernel 120 python3 -m pytest -q -x -p no:cacheprovider --tb=short tests/test_layer_kernel.py
               MLX_RWKV_LAYER_KERNEL=sm run bench_layer 170 "${bench[@]}" --shapes 1.5B --precisions q4k f16 \
               --strategies compiled webgpu-one-submit
               MLX_RWKV_LAYER_KERNEL=0 run bench_five 90 "${bench[@]}" --shapes 1.5B \
               --precisions q4k f16 --engines mlx --strategies compiled  # records of their own (no layer_kernel field)
               MLX_RWKV_LAYER_KERNEL=sm run ncu_layer_q4k 100 bash -c "${ncu[*]} python3 -m bench.kernel_times run decode --precision q4k \
               > $out/decode_q4k.csv && python3 -m bench.kernel_times summarize $out/decode_q4k.csv" ;;
    # llama.cpp's CUDA build as a peer (issue 14): LLAMA_BENCH names a llama-bench binary built for sm_90
    llama-peer) run llama_peer 240 python3 -m bench.llama_peer --llama-bench "${LLAMA_BENCH:?set LLAMA_BENCH}" \
               --shape 1.5B --precisions q4k f16 --write ;;
    # batched decode: aggregate tok/s of B sequences through the same kernels
    bench-batch) run bench_batch 200 "${bench[@]}" --shapes 1.5B --precisions f16 q4k --engines mlx \
               --strategies compiled --batches 8 32 64 ;;
    ncu-decode-q4k) run ncu_decode_q4k 90 bash -c "${ncu[*]} python3 -m bench.kernel_times run decode --precision q4k \
               > $out/decode_q4k.csv && python3 -m bench.kernel_times summarize $out/decode_q4k.csv" ;;
    # prefill with 2 layers: 3 norm_mix + 2 scans per pass; the first pass warms up
    ncu-detail) run ncu_detail 120 bash -c "${ncu_stalls[*]} -k 'regex:wkv7_scan|norm_mix' --launch-skip 5 \
               --launch-count 5 python3 -m bench.kernel_times run prefill --layers 2 > $out/ncu_detail.txt; \
               grep -E $stall_lines $out/ncu_detail.txt | head -80" ;;
    scan) run bench_scan 120 python3 -m bench.bench_scan --shape 1.5B 0.1B --tokens 1024 --write ;;
    ncu-scan) run ncu_scan 120 bash -c "${ncu[*]} -k regex:wkv7 python3 -m bench.bench_scan --shape 1.5B --calls 2 \
               --repeats 2 > $out/scan.csv; python3 -m bench.kernel_times summarize --all $out/scan.csv" ;;
    mlx) run bench_mlx 540 python3 -m bench.bench_mlx --shape 1.5B 0.1B --precision f16 q4k --decode-steps 64 \
               --official --write ;;
    mlx-1.5b) run bench_mlx 150 python3 -m bench.bench_mlx --shape 1.5B --precision f16 --decode-steps 64 \
               --official --write ;;
    graph-size) for n in 20 60 200; do  # MLX-CUDA nodes per CUDA graph (MLX_MAX_OPS_PER_BUFFER, default 20)
               run bench_mlx_graph$n 150 env MLX_MAX_OPS_PER_BUFFER=$n python3 -m bench.bench_mlx --shape 1.5B --layers 8 \
               --precision f16 q4k --decode-steps 32; done ;;
    q4k) run bench_mlx_q4k 300 python3 -m bench.bench_mlx --shape 1.5B --precision f16 q4k --decode-steps 64 --write ;;
    webgpu-kernel) run bench_webgpu_kernel 120 python3 -m bench.bench_webgpu --mode kernel --shape 1.5B \
               --precision f16 q4k --strategy one-submit --repeats 5 --write ;;
    webgpu-kernel-sweep) run bench_webgpu_kernel_sweep 200 python3 -m bench.bench_webgpu --mode kernel \
               --kernel-shapes 65536x2048 4096x4096 8192x2048 2048x8192 --precision f16 q4k --q4k-variants all \
               --strategy one-submit --repeats 5 --write ;;  # records written after each shape, the head shape first
    webgpu-q4k-decode) run bench_webgpu_q4k 150 python3 -m bench.bench_webgpu --mode decode --shape 1.5B \
               --precision q4k --strategy one-submit --repeats 3 --write ;;
    webgpu-profile) for t in 256 1024 1; do
               run profile_webgpu_$t 120 python3 -m bench.profile_webgpu --shape 1.5B --tokens $t; done ;;
    webgpu) run bench_webgpu 300 python3 -m bench.bench_webgpu --shape 0.1B 1.5B --write ;;
    # the sync experiment: every strategy, same weights and tokens; the official package as baseline
    bench-sync) run bench_sync 300 "${bench[@]}" --shapes 0.1B 1.5B --precisions f16 q4k --prefill-tokens 1k \
               --official ;;
    # decode after 0/4k/16k/64k tokens of context, and the prefill to each with peak memory
    bench-context) run bench_context 200 "${bench[@]}" --shapes 0.1B 1.5B --precisions f16 q4k --engines mlx \
               --strategies compiled --contexts 0 4k 16k 64k ;;
    # how cost grows with size: decode (compiled, uncompiled) and a 64k prefill with peak memory
    bench-sizes) run bench_sizes 240 "${bench[@]}" --shapes 0.4B 7.2B --precisions f16 q4k --engines mlx \
               --strategies compiled whole-pass --prefill-tokens 64k ;;
    # the seed engine's size (2.9B Q4_K) through every strategy, f16 beside it
    bench-sync-2.9b) run bench_sync_29 200 "${bench[@]}" --shapes 2.9B --precisions q4k f16 --prefill-tokens 64k ;;
    # optional (needs matplotlib on the host): the same plots can be drawn anywhere from the JSON with
    # python -m mlx_rwkv.bench_plots bench/results/<device>-<date>.json
    bench-plots) run bench_plots 60 python3 -m mlx_rwkv.bench_plots bench/results --force
               cp bench/results/*.png "$out/" 2>/dev/null ;;
    # issue 16: the server at 1/8/32/64 streams and a cached chat follow-up vs uncached (plot if matplotlib);
    # the host lacks the server's packages: build the bundle with
    # EXTRA_PACKAGES="starlette uvicorn h11 click anyio idna typing_extensions sniffio" ../shared/tools/gpu-bundle
    bench-serve) run bench_serve 300 python3 -m bench.bench_serve --shape 1.5B --precisions f16 q4k --write --force \
               $(python3 -c 'import matplotlib' 2>/dev/null && echo --plot)
               cp bench/results/*-serve.png "$out/" 2>/dev/null ;;
    *) echo "unknown step $step" >&2 ;;
  esac
done
true

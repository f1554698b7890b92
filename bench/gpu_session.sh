#!/usr/bin/env bash
# One GPU-host session (DESIGN.md): kernel tests, then every benchmark, logs and JSON to $OUT.
# Usage on the host, after the .gpu bundle is installed:  bash bench/gpu_session.sh mlx|q4k-webgpu
# (two parts, each within one 10-minute device call).
set -uo pipefail
source /root/gpu-env.sh
out="${OUT:-/tmp/out}"; mkdir -p "$out"
if [ "${1:-mlx}" = mlx ]; then
python3 -m pytest -q -p no:cacheprovider tests/test_wkv_kernel.py tests/test_q4k_kernel.py 2>&1 | tail -25 | tee "$out/gpu_tests.log"
python3 -m bench.bench_mlx --shape 0.1B 1.5B --precision f16 --decode-steps 64 --official --write 2>&1 | grep -v -i warn | tee "$out/bench_mlx.log"
else
python3 -m bench.bench_mlx --shape 1.5B --precision q4k --decode-steps 64 --write 2>&1 | grep -v -i warn | tee "$out/bench_q4k_model.log"
timeout 150 python3 -m bench.bench_q4k --write 2>&1 | grep -v -i warn | tee "$out/bench_q4k.log"
timeout 240 python3 -m bench.bench_webgpu --shape 0.1B 1.5B --write 2>&1 | grep -v -i warn | tee "$out/bench_webgpu.log"
fi
cp bench/results/*.json "$out/" 2>/dev/null

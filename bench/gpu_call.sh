#!/usr/bin/env bash
# A device call after `bash .gpu/base/setup.sh a` (../shared/tools/gpu-bundle): finish the
# install (once), this commit into /tmp/head (once, from .gpu/head.tar.gz, made here with
# `git archive HEAD | gzip`), the llama-bench binary (once, from .gpu/llama/llama-bench.xz if
# carried), then the gpu_session.sh steps given as arguments, e.g.
#   bash bench/gpu_call.sh layer-kernel llama-peer
# Results and logs are tarred into $OUT/res.tar.gz every 15 s (atomically) and at the end, so a
# call cut off at its limit keeps what it finished.
set -uo pipefail
outf="${OUT:-/tmp/out}"; mkdir -p "$outf"; log="$outf/call.log"
test -f /root/gpu-env.sh || bash .gpu/base/setup.sh b >> "$log" 2>&1 || { tail -20 "$log"; exit 1; }
test -d /tmp/head || { mkdir -p /tmp/head && tar -xzf .gpu/head.tar.gz -C /tmp/head; }
if test -f .gpu/llama/llama-bench.xz && ! test -x /tmp/llama-bench; then xz -dc .gpu/llama/llama-bench.xz > /tmp/llama-bench && chmod +x /tmp/llama-bench; fi
test -x /tmp/llama-bench && export LLAMA_BENCH=/tmp/llama-bench
nvidia-smi --query-gpu=name --format=csv,noheader >> "$log"
cd /tmp/head && export OUT=/tmp/sess && mkdir -p $OUT
pack() { tar -czf /tmp/res.tmp.tar.gz -C /tmp sess head/bench/results 2>/dev/null && mv /tmp/res.tmp.tar.gz "$outf/res.tar.gz"; }
( while sleep 15; do pack; done ) & packer=$!
for s in "$@"; do bash bench/gpu_session.sh $s >> "$log" 2>&1; done
kill $packer; pack
grep -E "^== |passed|failed|rc=|tok/s|Error|error" "$log" | tail -60

"""WebGPU reference engine throughput: decode / prefill tok/s and isolated mat-vec GB/s.

    python -m bench.bench_webgpu --shape 0.1B 1.5B --precision f16 q4k [--write]
    python -m bench.bench_webgpu --shape 0.1B --layers 2 --embd 128 --vocab 512   # quick smoke run

Synthetic weights at real shapes (mlx_rwkv.synth, f16; Q4_K through mlx_rwkv.quant). Modes:
  decode   batch 1, greedy (argmax on the host), one forward call = one submit + logits readback
  prefill  T tokens from a zero state, last token's logits; one submit per chunk of the engine
  kernel   one mat-vec (M x K, f16 or Q4_K) dispatched many times in one compute pass, cycling
           through distinct copies of the matrix (>= 256 MiB in all, so the weights come from
           HBM, not from the 50 MB L2 of an H100); gb_s = weight bytes / (wall time of the
           submit / dispatches), dispatch cost included. `--q4k-variants all` (or some labels)
           times each form of the Q4_K mat-vec (webgpu_ref.ops.Q4KMatvec) on the same copies,
           each recorded under its label as precision, e.g. q4k-f16pairs-c64-r8:
               python -m bench.bench_webgpu --mode kernel --kernel-shapes 4096x4096 65536x2048 \
                   --precision f16 q4k --q4k-variants all --strategy one-submit
Strategies: `webgpu-one-submit` (the engine) and `webgpu-per-op` (submit and wait after every op).
Records go to bench/results/<device>-<date>.json with --write (bench/results_io.py).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import wgpu

from bench.results_io import measure_bandwidth_gb_s, record, write_results
from mlx_rwkv.config import ModelConfig, config_for_shape
from mlx_rwkv.quant import Q4KTensor, quantize_model, quantize_q4k
from mlx_rwkv.synth import synthesize
from webgpu_ref import WebGPUModel, get_gpu
from webgpu_ref import ops
from webgpu_ref.device import GPU
from webgpu_ref.weights import Batch, Linear, to_matrix, upload

STRATEGIES = {"one-submit": "webgpu-one-submit", "per-op": "webgpu-per-op"}
KERNEL_BYTES = 2e9  # weight bytes streamed per kernel measurement (sets the dispatch count)
L2_DEFEAT_BYTES = 256 * 2**20  # kernel mode cycles through this many bytes of weight copies at least


def build(weights: dict, config: ModelConfig, precision: str, chunk: int) -> WebGPUModel:
    if precision == "q4k":
        weights = quantize_model(weights, progress=False)
    return WebGPUModel.from_weights(weights, config, dtype="float16", prefill_chunk=chunk)


def time_decode(model: WebGPUModel, steps: int, repeats: int) -> list[float]:
    state, token = model.new_state(), 0
    for _ in range(3):  # warm-up: pipelines, first submits
        logits, state = model.forward([token], state)
        token = int(np.argmax(logits))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, state = model.forward([token], state)
            token = int(np.argmax(logits))
        rates.append(steps / (time.perf_counter() - t0))
    return rates


def time_prefill(model: WebGPUModel, tokens: int, repeats: int) -> list[float]:
    ids = np.random.default_rng(0).integers(1, model.config.vocab_size, tokens)
    model.forward(ids)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.forward(ids)
        rates.append(tokens / (time.perf_counter() - t0))
    return rates


def kernel_copies(gpu: GPU, rows: int, k: int, precision: str) -> tuple[list[list[Batch]], int]:
    """Enough copies of one random [rows, K] matrix in distinct buffers to span L2_DEFEAT_BYTES
    (each in several batches if it exceeds a binding), and the bytes of one copy."""
    w = (np.random.default_rng(0).standard_normal((rows, k), dtype=np.float32) * 0.02).astype(np.float16)
    weight = Q4KTensor(quantize_q4k(w), (rows, k)) if precision == "q4k" else w
    matrix = to_matrix(weight, "f16")
    copies = [upload(gpu, [Linear(f"w{c}", matrix, 0, None, 0)], gpu.max_binding)
              for c in range(-(-L2_DEFEAT_BYTES // matrix.data.nbytes))]
    return copies, matrix.data.nbytes


def kernel_ops(gpu: GPU, copies: list[list[Batch]], rows: int, k: int, q4k: ops.Q4KMatvec) -> list[list[ops.Op]]:
    """The mat-vec op(s) of each copy (Q4_K ones in the form `q4k`), reading x = 1."""
    device, usage = gpu.device, wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC
    x = device.create_buffer_with_data(data=np.ones(k, np.float32), usage=usage)
    vecs = device.create_buffer(size=64, usage=usage)
    out = device.create_buffer(size=4 * rows, usage=usage)
    step = device.create_buffer_with_data(data=np.array([1, 0, 0, 0], np.uint32), usage=wgpu.BufferUsage.UNIFORM)
    return [[ops.linear(gpu, f"w{c}.{i}", b.fmt, b.groups, b.buffer, x, vecs, out, step, False, q4k=q4k)
             for i, b in enumerate(batches)] for c, batches in enumerate(copies)]


class SubmitTimer:
    """`timer(op_list, tokens)`: seconds from submitting `op_list` in one compute pass (none
    when empty) to its completion on the GPU; encoding is not timed."""

    def __init__(self, gpu: GPU) -> None:
        self.device = gpu.device
        self.fence = self.device.create_buffer(size=4, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        self.scratch = self.device.create_buffer(size=4, usage=wgpu.BufferUsage.COPY_SRC)

    def __call__(self, op_list: list[ops.Op], tokens: int) -> float:
        encoder = self.device.create_command_encoder()
        if op_list:
            compute_pass = encoder.begin_compute_pass()
            ops.encode(compute_pass, op_list, tokens)
            compute_pass.end()
        encoder.copy_buffer_to_buffer(self.scratch, 0, self.fence, 0, 4)
        buffers = [encoder.finish()]
        start = time.perf_counter()
        self.device.queue.submit(buffers)
        self.fence.map_sync(wgpu.MapMode.READ)
        self.fence.unmap()
        return time.perf_counter() - start


def time_kernel(gpu: GPU, copies: list[list[ops.Op]], nbytes: int, per_op: bool, repeats: int) -> list[float]:
    """GB/s of weights for one pass over one copy's ops, the copies taken in turn, n passes per
    submit (or one per submit)."""
    n = max(10, min(1000, int(KERNEL_BYTES / nbytes)))
    if per_op:
        n = max(5, n // 10)
    timed = SubmitTimer(gpu)
    turn = itertools.cycle(copies)  # across submits too: a copy comes back after all the others

    def submit_and_wait(passes: int) -> float:
        """Seconds from submit to completion of `passes` passes (encoding excluded)."""
        return timed([op for _ in range(passes) for op in next(turn)], 1)

    submit_and_wait(len(copies))  # warm-up
    rates = []
    for _ in range(repeats):
        seconds = sum(submit_and_wait(1) for _ in range(n)) if per_op else submit_and_wait(n)
        rates.append(n * nbytes / seconds / 1e9)
    return rates


def parse_kernel_shape(text: str) -> tuple[int, int]:
    rows, k = (int(v) for v in text.lower().split("x"))
    return rows, k


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["0.1B"])
    ap.add_argument("--precision", nargs="+", default=["f16", "q4k"], choices=["f16", "q4k"])
    modes = ["kernel", "decode", "prefill"]
    ap.add_argument("--mode", nargs="+", default=modes, choices=modes)
    ap.add_argument("--strategy", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--layers", type=int, help="override the layer count (quick runs)")
    ap.add_argument("--embd", type=int, help="override C (quick runs)")
    ap.add_argument("--vocab", type=int, help="override the vocabulary size (quick runs)")
    ap.add_argument("--kernel-shapes", nargs="+", help="MxK mat-vecs (default 4096x4096 and each shape's head)")
    variants = {form.label: form for form in ops.Q4K_MATVECS}
    ap.add_argument("--q4k-variants", nargs="+", choices=["all", *variants], metavar="LABEL",
                    help=f"kernel mode: time these Q4_K mat-vec forms, or all ({', '.join(variants)}); "
                         "default: the engine's form, recorded as q4k")
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--per-op-steps", type=int, default=16, help="decode steps with a sync per op")
    ap.add_argument("--prefill-tokens", type=int, default=1024)
    ap.add_argument("--prefill-chunk", type=int, default=1024, help="tokens per submit (the engine default is 512)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="merge the records into bench/results/")
    args = ap.parse_args(argv)
    chosen = args.q4k_variants or []
    q4k_forms = list(variants.values()) if "all" in chosen else [variants[label] for label in chosen]

    gpu = get_gpu()
    print(f"adapter: {gpu.name}  shader-f16={gpu.f16} subgroups={gpu.subgroups} "
          f"max binding={gpu.max_binding / 2**20:.0f} MiB")
    bandwidth = measure_bandwidth_gb_s()
    roofline = (lambda gb_s: round(gb_s / bandwidth, 3)) if bandwidth else (lambda gb_s: None)  # noqa: E731
    records = []
    overrides = dict(n_layer=args.layers, n_embd=args.embd, vocab_size=args.vocab)
    custom = any(v is not None for v in overrides.values())
    for shape in args.shape:
        config = config_for_shape(shape, **overrides)
        label = f"{shape}-L{config.n_layer}-C{config.n_embd}-V{config.vocab_size}" if custom else shape
        if "kernel" in args.mode:
            for text in args.kernel_shapes or ["4096x4096", f"{config.vocab_size}x{config.n_embd}"]:
                rows, k = parse_kernel_shape(text)
                for precision in args.precision:
                    if precision == "q4k" and k % 256:
                        print(f"kernel  {rows}x{k}: no Q4_K (K must be a multiple of 256)")
                        continue
                    copies, nbytes = kernel_copies(gpu, rows, k, precision)
                    sweep = precision == "q4k" and bool(q4k_forms)
                    for form in q4k_forms if sweep else [ops.Q4KMatvec()]:
                        name = form.label if sweep else precision
                        matvecs = kernel_ops(gpu, copies, rows, k, form)
                        for strategy in args.strategy:
                            rates = time_kernel(gpu, matvecs, nbytes, strategy == "per-op", args.repeats)
                            records.append(record("webgpu", f"{rows}x{k}", name, "kernel", STRATEGIES[strategy],
                                                  tokens=1, rates=rates, rate_key="gb_s",
                                                  kernels_per_token=len(matvecs[0]),
                                                  roofline_fraction=roofline(statistics.median(rates))))
                            print(f"kernel  {rows}x{k:<6} {name:20} {strategy:10} "
                                  f"{statistics.median(rates):9.1f} GB/s")
                if args.write:  # after each shape: a run cut off by its time limit keeps what it measured
                    write_results(records)
        if not {"decode", "prefill"} & set(args.mode):
            continue
        weights = synthesize(config, seed=0, dtype=np.float16)
        for precision in args.precision:
            if precision == "q4k" and config.n_embd % 256:
                print(f"{label}: no Q4_K (C must be a multiple of 256)")
                continue
            model = build(weights, config, precision, args.prefill_chunk)
            per_token = model.dispatches_per_token
            for strategy in args.strategy:
                model.per_op_sync = strategy == "per-op"
                if "decode" in args.mode:
                    steps = args.per_op_steps if model.per_op_sync else args.decode_steps
                    rates = time_decode(model, steps, args.repeats)
                    gb_s = statistics.median(rates) * model.weight_bytes / 1e9
                    records.append(record("webgpu", label, precision, "decode", STRATEGIES[strategy], tokens=steps,
                                          rates=rates, kernels_per_token=per_token,
                                          syncs_per_token=float(per_token + 1 if model.per_op_sync else 1),
                                          roofline_fraction=roofline(gb_s)))
                    print(f"decode  {label:8} {precision:4} {strategy:10} {statistics.median(rates):9.1f} tok/s "
                          f"({per_token} dispatches/token, {gb_s:.0f} GB/s of weights)")
                if "prefill" in args.mode:
                    T = args.prefill_tokens
                    rates = time_prefill(model, T, args.repeats)
                    chunks = -(-T // model.t_max)
                    dispatches = chunks * len(model.op_list("body", True)) + len(model.op_list("head", False))
                    records.append(record("webgpu", label, precision, "prefill", STRATEGIES[strategy], tokens=T,
                                          rates=rates, kernels_per_token=round(dispatches / T),
                                          syncs_per_token=(dispatches if model.per_op_sync else 1) / T))
                    print(f"prefill {label:8} {precision:4} {strategy:10} {statistics.median(rates):9.1f} tok/s "
                          f"({T} tokens, chunks of {model.t_max})")
            del model
    if args.write:
        print("wrote", write_results(records))


if __name__ == "__main__":
    main()

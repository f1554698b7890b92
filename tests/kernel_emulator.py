"""Run the kernels' Metal instantiation on the CPU, as C++ coroutines.

`emulated_kernels()` patches `mlx_rwkv.kernels` so that every `get_kernel(spec)` returns a
callable with the signature of an `mx.fast` kernel. The call builds, with g++, what
mx.fast.metal_kernel would compile: the Metal prelude (metal_kernels/prelude_metal.h, verbatim)
and the Metal body with its index lines, on top of METAL_ON_CPU, CPU implementations of the Metal
names the prelude uses (simd_sum and simd_shuffle_xor as 32-lane exchanges between barriers,
threadgroup_barrier, as_type, half as IEEE binary16, the SIMD-group attributes, uint4 copies that
check 16-byte alignment, device atomics). Each threadgroup runs with one coroutine (ucontext) per
GPU thread on one OS thread: a barrier yields until every participant has arrived, so the
interleaving is deterministic. Threadgroup memory is filled with NaN bytes before every
threadgroup, so a read before a write shows in the results. A kernel with a grid-wide barrier
(GRID_BARRIER: threadgroups wait for each other) runs all its threadgroups interleaved, each with
its own threadgroup memory and barrier state (swapped in when the scheduler moves to one of its
threads); an atomic load yields, so a thread polling a flag lets the others run. So the
production wrappers (ProjectionGroup, norm_mix, wkv7) run end to end with their kernels in CI,
where no GPU exists; bugs in the kernels' index arithmetic, staging and reductions show up there.
The hardware's own intrinsics only run on the GPU host.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import mlx.core as mx
import numpy as np

from mlx_rwkv import kernels

C_TYPES = {mx.float32: "float", mx.float16: "_Float16", mx.bfloat16: "emu_bf16", mx.int32: "int",
           mx.uint32: "uint"}
NP_TYPES = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.int32: np.int32,
            mx.uint32: np.uint32}  # bfloat16 travels as its bits
BUILD_DIR = Path(tempfile.gettempdir()) / "rwkv_kernel_emulator"
# polls before a grid-barrier wait gives up: a poll is one round of the scheduler over every thread,
# and a phase of the layer kernel at test sizes takes thousands of rounds
GRID_WAIT_POLLS = 1 << 16

# The Metal names that metal_kernels/prelude_metal.h and the Metal index lines use, implemented
# on the CPU; the prelude itself follows verbatim, so SIMD_SUM, SHARED, LOAD_U4, F16_BITS, ...
# run with the meanings Metal gives them.
METAL_ON_CPU = r"""
#include <algorithm>
#include <cmath>
#include <cstring>
#include <ucontext.h>
#include <vector>
typedef unsigned int uint;
typedef unsigned short ushort;
typedef _Float16 half;  // IEEE binary16, round to nearest even: Metal's half
using std::max; using std::min; using std::exp; using std::sqrt; using std::tanh;
template <typename To, typename From> To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: the two types differ in size");
  To to; std::memcpy(&to, &x, sizeof(To)); return to;
}
static int emu_misaligned = 0;  // a 16-byte load or store at an address that is not 16-byte aligned
static inline void emu_check_align(const void* p) { emu_misaligned |= (reinterpret_cast<unsigned long>(p) % 16) != 0; }
struct alignas(16) uint4 {  // copies check 16-byte alignment, as Metal's uint4 loads and stores need
  uint x, y, z, w;
  uint4() = default;
  uint4(uint x_, uint y_, uint z_, uint w_) : x(x_), y(y_), z(z_), w(w_) {}
  uint4(const uint4& o) : x(o.x), y(o.y), z(o.z), w(o.w) { emu_check_align(&o); }
  uint4& operator=(const uint4& o) { emu_check_align(this); x = o.x; y = o.y; z = o.z; w = o.w; return *this; }
};
struct half2 { half x, y; };
struct float2 { float x, y; float2() = default; float2(float x_, float y_) : x(x_), y(y_) {} explicit float2(half2 h) : x(h.x), y(h.y) {} };
struct alignas(16) float4 { float x, y, z, w; float4() = default; float4(float x_, float y_, float z_, float w_) : x(x_), y(y_), z(z_), w(w_) {} };
struct emu_bf16 {  // bfloat16 as the GPU types behave: float in, round to nearest even
  unsigned short bits;
  emu_bf16() = default;
  emu_bf16(float f) {
    uint u; std::memcpy(&u, &f, 4);
    bits = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const { uint u = uint(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
// GPU threads as coroutines on one OS thread: a barrier yields until every participant arrived.
struct EmuFiber { ucontext_t ctx; std::vector<char> stack; bool done; };
static ucontext_t emu_main;
static std::vector<EmuFiber> emu_fibers;
static uint emu_current, emu_gid, emu_fiber;  // thread in its group, group, fiber
static void** emu_args;
static void emu_yield() { swapcontext(&emu_fibers[emu_fiber].ctx, &emu_main); }
struct EmuBarrier {
  uint n = 0, arrived = 0, generation = 0;
  void wait() {
    const uint gen = generation;
    if (++arrived == n) { arrived = 0; ++generation; }
    else while (gen == generation) emu_yield();
  }
};
static EmuBarrier emu_group;
static EmuBarrier emu_warps[32];
static float emu_lanes[32][32];
// Metal's thread attributes: emulated thread t is lane t % 32 of SIMD-group t / 32
#define thread_index_in_simdgroup (emu_current % 32)
#define simdgroup_index_in_threadgroup (emu_current / 32)
struct EmuGroupPosition { uint x, y, z; };
#define threadgroup_position_in_grid (EmuGroupPosition{emu_gid, 0, 0})
#define thread_position_in_threadgroup (EmuGroupPosition{emu_current, 0, 0})
// Metal's address spaces: threadgroup variables live in one section, filled with NaN bytes
// before every threadgroup (a read before any write gives NaN, not the last group's values)
#define device
#define constant
#define thread
#define threadgroup
extern "C" char __start_emu_tg[] __attribute__((weak));
extern "C" char __stop_emu_tg[] __attribute__((weak));
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
static mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
static void threadgroup_barrier(mem_flags) { emu_group.wait(); }
// device atomics (one OS thread: plain operations); a load yields, so a polling thread lets others run
struct atomic_uint { uint value; };
enum memory_order { memory_order_relaxed };
static uint atomic_load_explicit(atomic_uint* a, memory_order) { emu_yield(); return a->value; }
static uint atomic_fetch_add_explicit(atomic_uint* a, uint v, memory_order) { const uint old = a->value; a->value += v; return old; }
static void atomic_store_explicit(atomic_uint* a, uint v, memory_order) { a->value = v; }
static float simd_sum(float v) {
  const uint w = emu_current / 32;
  emu_lanes[w][emu_current % 32] = v;
  emu_warps[w].wait();
  float s = 0.0f;
  for (uint i = 0; i < 32; ++i) s += emu_lanes[w][i];
  emu_warps[w].wait();
  return s;
}
static int emu_bad_shuffle = 0;  // a shuffle from a lane past the end of a partial SIMD-group
static float simd_shuffle_xor(float v, ushort mask) {
  const uint w = emu_current / 32, lane = emu_current % 32, from = lane ^ mask;
  emu_lanes[w][lane] = v;
  emu_warps[w].wait();
  emu_bad_shuffle |= from >= emu_warps[w].n;
  const float got = emu_lanes[w][from % 32];
  emu_warps[w].wait();
  return got;
}
"""

# after the prelude: SHARED (Metal: threadgroup) declares a variable in that section; `threadgroup`
# alone (pointer types into it, SHARED_PTR) is the plain address space
SHARED_ON_CPU = """
#undef SHARED
#define SHARED static __attribute__((section("emu_tg"), aligned(16)))
"""

RUNNER = r"""
static void body({params}) {{
{source}
}}
static void emu_entry() {{
  void** args = emu_args;
  body({call});
  emu_fibers[emu_fiber].done = true;
}}
// Interleaved runs (grid barriers): what each threadgroup keeps while another one's threads run
struct EmuGroupState {{ EmuBarrier group; EmuBarrier warps[32]; float lanes[32][32]; std::vector<char> memory; }};
static std::vector<EmuGroupState> emu_states;
static void emu_switch_group(uint from, uint to) {{  // save group `from`'s state, load group `to`'s
  const size_t size = __start_emu_tg ? size_t(__stop_emu_tg - __start_emu_tg) : 0;
  EmuGroupState& a = emu_states[from];
  a.group = emu_group;
  std::copy(emu_warps, emu_warps + 32, a.warps);
  std::memcpy(a.lanes, emu_lanes, sizeof(emu_lanes));
  if (size) std::memcpy(a.memory.data(), __start_emu_tg, size);
  const EmuGroupState& b = emu_states[to];
  emu_group = b.group;
  std::copy(b.warps, b.warps + 32, emu_warps);
  std::memcpy(emu_lanes, b.lanes, sizeof(emu_lanes));
  if (size) std::memcpy(__start_emu_tg, b.memory.data(), size);
}}
static void emu_start(EmuFiber& f) {{
  f.stack.resize(1 << 16);
  f.done = false;
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.data();
  f.ctx.uc_stack.ss_size = f.stack.size();
  f.ctx.uc_link = &emu_main;
  makecontext(&f.ctx, emu_entry, 0);
}}
// groups threadgroups of `threads` threads, `batch` at a time interleaved (1: one after another)
extern "C" int run(uint groups, uint threads, void** args, uint batch) {{
  emu_misaligned = 0;
  emu_bad_shuffle = 0;
  emu_args = args;
  emu_fibers.resize(batch * threads);
  emu_group.n = threads;
  for (uint w = 0; w < 32; ++w) emu_warps[w].n = std::min(32u, threads - std::min(threads, 32 * w));
  const size_t size = __start_emu_tg ? size_t(__stop_emu_tg - __start_emu_tg) : 0;
  for (uint g0 = 0; g0 < groups; g0 += batch) {{
    // every threadgroup of the batch starts with NaN threadgroup memory and fresh barriers
    emu_states.assign(batch, EmuGroupState());
    for (EmuGroupState& st : emu_states) {{
      st.group = emu_group;
      std::copy(emu_warps, emu_warps + 32, st.warps);
      st.memory.assign(size, char(0xFF));
    }}
    if (size) std::memset(__start_emu_tg, 0xFF, size);  // (group 0's state starts in the globals)
    for (EmuFiber& f : emu_fibers) emu_start(f);
    uint loaded = 0;  // the threadgroup whose state is in the globals
    for (uint left = batch * threads; left > 0;) {{
      for (uint f = 0; f < batch * threads; ++f) {{
        if (emu_fibers[f].done) continue;
        const uint g = f / threads;
        if (g != loaded) {{
          emu_switch_group(loaded, g);
          loaded = g;
        }}
        emu_current = f % threads;
        emu_gid = g0 + g;
        emu_fiber = f;
        swapcontext(&emu_main, &emu_fibers[f].ctx);
        left -= emu_fibers[f].done;
      }}
    }}
  }}
  return emu_misaligned | (emu_bad_shuffle << 1);
}}
"""


@functools.cache
def _library(source: str) -> ctypes.CDLL:
    BUILD_DIR.mkdir(exist_ok=True)
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    lib = BUILD_DIR / f"k_{digest}.so"
    if not lib.exists():  # built under a private name, then renamed: parallel runs share BUILD_DIR
        with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
            src, out = Path(tmp, "k.cpp"), Path(tmp, "k.so")
            src.write_text(source)
            result = subprocess.run(["g++", "-O1", "-std=c++17", "-shared", "-fPIC", "-o", str(out), str(src)],
                                    capture_output=True, text=True)
            assert result.returncode == 0, result.stderr[-4000:]
            out.replace(lib)
    return ctypes.CDLL(str(lib))


class EmulatedKernel:
    """Stands in for `mx.fast.metal_kernel(...)` / `cuda_kernel(...)` of one KernelSpec."""

    def __init__(self, spec: kernels.KernelSpec, max_threads: int, launched: list[str], resident: int | None = None):
        self.spec, self.max_threads, self.launched, self.resident = spec, max_threads, launched, resident

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        threads = threadgroup[0] * threadgroup[1] * threadgroup[2]
        if threads > self.max_threads:  # MLX's message (mlx/backend/metal/custom_kernel.cpp)
            raise ValueError(f"Thread group size ({threads}) is greater than  the maximum allowed "
                             f"threads per threadgroup ({self.max_threads}).")
        self.launched.append(self.spec.name)
        # inputs are copies, except those the kernel writes in place: their MLX memory, as on the GPU
        ins = [np.asarray(a) if name in self.spec.writes_inputs else
               np.ascontiguousarray(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a))
               for name, a in zip(self.spec.inputs, inputs)]
        assert all(ins[self.spec.inputs.index(n)].flags.writeable for n in self.spec.writes_inputs)
        outs = [np.full(shape, np.nan if dt in (mx.float32, mx.float16) else 0xFFC0 if dt == mx.bfloat16 else 0,
                        NP_TYPES[dt]) for shape, dt in zip(output_shapes, output_dtypes)]
        lines = []
        for name, value in template:
            if isinstance(value, mx.Dtype):
                lines.append(f"typedef {C_TYPES[value]} {name};")
            else:
                lines.append(f"constexpr {'bool' if isinstance(value, bool) else 'int'} {name} = {int(value)};")
        params, call = [], []
        for i, (name, a) in enumerate(zip(self.spec.inputs, inputs)):
            params.append(f"const {C_TYPES[a.dtype]}* {name}")
            call.append(f"(const {C_TYPES[a.dtype]}*)args[{i}]")
        for i, (name, dt) in enumerate(zip(self.spec.outputs, output_dtypes)):
            params.append(f"{C_TYPES[dt]}* {name}")
            call.append(f"({C_TYPES[dt]}*)args[{len(inputs) + i}]")
        header, body = kernels.render(self.spec, "metal")
        polls = f"#define GRID_WAIT_POLLS {GRID_WAIT_POLLS}u\n"
        source = (METAL_ON_CPU + polls + header + SHARED_ON_CPU + "\n".join(lines) + RUNNER.format(
            params=", ".join(params), call=", ".join(call), source=body))
        lib = _library(source)
        threads = threadgroup[0]
        assert grid[0] % threads == 0, "grids count threads: a whole number of threadgroups"
        # inputs are copied (numpy aligns them), so a view's offset on the GPU is not mirrored
        # here: ProjectionGroup's kernel takes whole buffers and checks x_base alignment itself
        arrays = ins + outs
        args = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        groups = grid[0] // threads
        # threadgroups that wait for each other run together (all of them, unless `resident` says fewer fit)
        batch = min(groups, self.resident or groups) if "GRID_BARRIER" in body else 1
        assert groups % batch == 0, "the emulator runs whole batches of threadgroups"
        flags = lib.run(ctypes.c_uint(groups), ctypes.c_uint(threads), args, ctypes.c_uint(batch))
        assert not flags & 1, f"{self.spec.name}: a 16-byte load or store at an unaligned address"
        assert not flags & 2, f"{self.spec.name}: a shuffle from a lane past a partial SIMD-group"
        return [mx.array(o).view(mx.bfloat16) if dt == mx.bfloat16 else mx.array(o)
                for o, dt in zip(outs, output_dtypes)]


@contextlib.contextmanager
def emulated_kernels(max_threads: int = 1024, resident: int | None = None):
    """Within the block, `kernels.get_kernel` returns CPU-emulated kernels (needs g++); yields
    the names of the kernels launched, in order. A launch of more than `max_threads` threads per
    threadgroup raises MLX's error, as a Metal pipeline with that maxTotalThreadsPerThreadgroup
    does; threadgroup_fits' answers are forgotten on entry and exit. `resident`: how many
    threadgroups of a grid-barrier kernel run at once (None: all), as on a GPU that holds only
    that many; a grid-barrier wait gives up after GRID_WAIT_POLLS polls."""
    if shutil.which("g++") is None:
        import pytest

        pytest.skip("needs g++ to emulate the kernels")
    launched: list[str] = []
    with mock.patch.object(kernels, "gpu_backend", lambda: "metal"), \
            mock.patch.object(kernels, "_build",
                              lambda spec, backend: EmulatedKernel(spec, max_threads, launched, resident)), \
            mock.patch.object(kernels, "_threadgroup_fits", {}):
        yield launched

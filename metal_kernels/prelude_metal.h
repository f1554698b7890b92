// Metal prelude: maps the portable kernel vocabulary onto Metal (MLX adds <metal_stdlib>).
#define SHARED threadgroup
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define DEVICE_FN inline
#define SIMD_WIDTH 32
// The sum of v over the 32 lanes of a SIMD-group, in every lane (Apple GPUs: 32 lanes).
#define SIMD_SUM(v) simd_sum(v)
// v of lane (this lane ^ mask) of the SIMD-group; every lane of the SIMD-group must take part.
#define SIMD_SHUFFLE_XOR(v, mask) simd_shuffle_xor((v), ushort(mask))
#define MAKE_FLOAT4(x, y, z, w) float4((x), (y), (z), (w))
// Raw 16-byte loads and bit reinterpretations for kernels that read weights as 32-bit words.
#define LOAD_U4(ptr) (*((const device uint4*)(ptr)))
// The same from threadgroup memory, and a pointer type into it (SHARED declares, this points)
#define LOAD_SHARED_U4(ptr) (*((const threadgroup uint4*)(ptr)))
#define SHARED_PTR(T) threadgroup T*
// A writable pointer into device memory (for a kernel that writes words it takes as an input)
#define DEVICE_PTR(T) device T*
#define AS_FLOAT(u) as_type<float>(uint(u))
#define AS_UINT(f) as_type<uint>(float(f))
// Raw 16-byte stores, and the fp16 bits of a float (round to nearest even) in the low half
#define STORE_U4(ptr, v) (*((device uint4*)(ptr)) = (v))
#define MAKE_UINT4(x, y, z, w) uint4((x), (y), (z), (w))
#define F16_BITS(f) uint(as_type<ushort>(half(f)))
#define HALF2_TO_FLOAT2(u) float2(as_type<half2>(uint(u)))
// BYTE_F(word, i): 0.5 + b / 256 as a float for byte i of word, b < 128 (b in bits 16..23 of 0.5)
#define BYTE_F(word, i) AS_FLOAT(0x3F000000u | ((((word) >> (8 * (i))) & 0xFFu) << 16))
#ifndef GRID_WAIT_POLLS  // polls before a grid-barrier wait gives up (~1-4 s on a GPU)
#define GRID_WAIT_POLLS (1u << 22)
#endif
// GRID_BARRIER(bar, target): every threadgroup adds one arrival to bar[0] and waits until the
// count reaches target (the k-th barrier of a launch of n threadgroups: k * n). Only for launches
// whose threadgroups are all resident at once (layer_decode.inc). bar: words that no other running
// launch uses, whose count was zeroed before the launch began; bar[16] is set if a wait gave up
// (~4 M polls). Metal documents neither forward progress for threadgroups that wait for each
// other nor, with relaxed atomics, when one threadgroup's device writes become visible to
// another: the layer kernel is off on Metal unless asked for, and `mlx-rwkv doctor` checks it.
#define GRID_BARRIER(bar, target)                                                                 \
  {                                                                                               \
    threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);                      \
    if (tid == 0) {                                                                               \
      device atomic_uint* count_ = (device atomic_uint*)(bar);                                    \
      atomic_fetch_add_explicit(count_, 1u, memory_order_relaxed);                                \
      for (uint polls_ = 0; atomic_load_explicit(count_, memory_order_relaxed) < (target);        \
           ++polls_) {                                                                            \
        if (polls_ == GRID_WAIT_POLLS) {                                                               \
          atomic_store_explicit(count_ + 16, 1u, memory_order_relaxed);                           \
          break;                                                                                  \
        }                                                                                         \
      }                                                                                           \
    }                                                                                             \
    threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);                      \
  }

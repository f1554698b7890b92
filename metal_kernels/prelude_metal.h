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
#define AS_FLOAT(u) as_type<float>(uint(u))
#define AS_UINT(f) as_type<uint>(float(f))
// Raw 16-byte stores, and the fp16 bits of a float (round to nearest even) in the low half
#define STORE_U4(ptr, v) (*((device uint4*)(ptr)) = (v))
#define MAKE_UINT4(x, y, z, w) uint4((x), (y), (z), (w))
#define F16_BITS(f) uint(as_type<ushort>(half(f)))
#define HALF2_TO_FLOAT2(u) float2(as_type<half2>(uint(u)))
// BYTE_F(word, i): 0.5 + b / 256 as a float for byte i of word, b < 128 (b in bits 16..23 of 0.5)
#define BYTE_F(word, i) AS_FLOAT(0x3F000000u | ((((word) >> (8 * (i))) & 0xFFu) << 16))
// GRID_BARRIER(bar, n): every thread of the grid's n threadgroups waits until all have arrived.
// Only for launches whose n threadgroups are all resident at once (layer_decode.inc). Metal
// documents no forward-progress guarantee for threadgroups spinning on device memory, so the
// layer kernel is off on Metal unless asked for (mlx_rwkv/layer_kernel.py). bar: >= 48 uint32
// words, zero before the first use: the count in word 0, the generation in word 16, word 32 set
// if a wait gave up (~4 M polls); the count is back to 0 after every barrier.
#define GRID_BARRIER(bar, n)                                                                      \
  {                                                                                               \
    threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);                      \
    if (tid == 0) {                                                                               \
      device atomic_uint* bar_ = (device atomic_uint*)(bar);                                      \
      const uint seen_ = atomic_load_explicit(bar_ + 16, memory_order_relaxed);                  \
      if (atomic_fetch_add_explicit(bar_, 1u, memory_order_relaxed) == (n) - 1u) {                \
        atomic_store_explicit(bar_, 0u, memory_order_relaxed);                                    \
        atomic_fetch_add_explicit(bar_ + 16, 1u, memory_order_relaxed);                           \
      } else {                                                                                    \
        for (uint polls_ = 0; atomic_load_explicit(bar_ + 16, memory_order_relaxed) == seen_;     \
             ++polls_) {                                                                          \
          if (polls_ == (1u << 22)) {                                                             \
            atomic_store_explicit(bar_ + 32, 1u, memory_order_relaxed);                           \
            break;                                                                                \
          }                                                                                       \
        }                                                                                         \
      }                                                                                           \
    }                                                                                             \
    threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);                      \
  }

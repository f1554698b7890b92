// CUDA prelude: maps the portable kernel vocabulary onto CUDA (MLX adds the fp16/bf16 headers).
typedef unsigned int uint;
#define SHARED __shared__
#define BARRIER() __syncthreads()
#define DEVICE_FN __device__ __forceinline__
#define SIMD_WIDTH 32
// The sum of v over the 32 lanes of a warp, in every lane.
#define SIMD_SUM(v) rwkv_warp_sum(v)
DEVICE_FN float rwkv_warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}
// v of lane (this lane ^ mask) of the warp; every lane of the warp must take part.
#define SIMD_SHUFFLE_XOR(v, mask) __shfl_xor_sync(0xffffffffu, (v), (mask))
#define MAKE_FLOAT4(x, y, z, w) make_float4((x), (y), (z), (w))
// Raw 16-byte loads and bit reinterpretations for kernels that read weights as 32-bit words.
#define LOAD_U4(ptr) (*((const uint4*)(ptr)))
// The same from shared memory, and a pointer type into it (SHARED declares, this points)
#define LOAD_SHARED_U4(ptr) (*((const uint4*)(ptr)))
#define SHARED_PTR(T) T*
#define AS_FLOAT(u) __uint_as_float(u)
#define AS_UINT(f) __float_as_uint(f)
// Raw 16-byte stores, and the fp16 bits of a float (round to nearest even) in the low half
#define STORE_U4(ptr, v) (*((uint4*)(ptr)) = (v))
#define MAKE_UINT4(x, y, z, w) make_uint4((x), (y), (z), (w))
#define F16_BITS(f) uint(__half_as_ushort(__float2half_rn(f)))
#define HALF2_TO_FLOAT2(u) rwkv_half2_to_float2(u)
// BYTE_F(word, i): 0.5 + b / 256 as a float for byte i of word, b < 128 (b in bits 16..23 of 0.5)
#define BYTE_F(word, i) __uint_as_float(__byte_perm((word), 0x3F000000u, 0x7044u | ((i) << 8)))
DEVICE_FN float2 rwkv_half2_to_float2(uint u) {
  return __half22float2(*reinterpret_cast<const __half2*>(&u));
}
// GRID_BARRIER(bar, n): every thread of the grid's n threadgroups waits until all have arrived,
// and what they wrote before is visible after. Only for launches whose n threadgroups are all
// resident at once (layer_decode.inc). bar: >= 48 uint32 words, zero before the first use: the
// count in word 0, the generation in word 16 (another 64-byte line), word 32 set if a wait gave
// up (~4 M polls: a threadgroup that never came). The count is back to 0 after every barrier,
// so the words serve the next launch as they are.
#define GRID_BARRIER(bar, n)                         \
  {                                                  \
    __syncthreads();                                 \
    if (tid == 0) {                                  \
      rwkv_grid_sync((unsigned*)(bar), (n));         \
    }                                                \
    __syncthreads();                                 \
  }
DEVICE_FN void rwkv_grid_sync(unsigned* bar, unsigned n) {
  volatile unsigned* generation = bar + 16;
  __threadfence();
  const unsigned seen = *generation;  // read before arriving: it cannot change until all arrive
  __threadfence();
  if (atomicAdd(bar, 1u) == n - 1u) {
    atomicExch(bar, 0u);
    __threadfence();
    atomicAdd(bar + 16, 1u);
  } else {
    for (unsigned polls = 0; *generation == seen; ++polls) {
      if (polls == (1u << 22)) {
        atomicExch(bar + 32, 1u);
        break;
      }
    }
  }
  __threadfence();
}

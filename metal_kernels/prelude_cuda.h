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
// A writable pointer into device memory (for a kernel that writes words it takes as an input)
#define DEVICE_PTR(T) T*
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
#ifndef GRID_WAIT_POLLS  // polls before a grid-barrier wait gives up (~1-4 s on a GPU)
#define GRID_WAIT_POLLS (1u << 22)
#endif
// GRID_BARRIER(bar, target): every threadgroup adds one arrival to bar[0] and waits until the
// count reaches target (the k-th barrier of a launch of n threadgroups: k * n), and what they
// wrote before is visible after. Only for launches whose threadgroups are all resident at once
// (layer_decode.inc). bar: words that no other running launch uses, whose count was zeroed
// before the launch began (layer_decode.inc); bar[16] (another 64-byte line) is set if a wait
// gave up (~4 M polls: a threadgroup that never came). The count only grows within a launch,
// so no reset can race with a later barrier's arrivals.
#define GRID_BARRIER(bar, target)                    \
  {                                                  \
    __syncthreads();                                 \
    if (tid == 0) {                                  \
      rwkv_grid_sync((bar), (target));               \
    }                                                \
    __syncthreads();                                 \
  }
DEVICE_FN void rwkv_grid_sync(unsigned* bar, unsigned target) {
  __threadfence();  // this threadgroup's writes (ordered before by __syncthreads) before the arrival
  atomicAdd(bar, 1u);
  volatile unsigned* count = bar;
  for (unsigned polls = 0; *count < target; ++polls) {
    if (polls == GRID_WAIT_POLLS) {
      atomicExch(bar + 16, 1u);
      break;
    }
  }
  __threadfence();  // the others' writes, seen through the count, before this threadgroup's reads
}

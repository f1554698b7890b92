// metal_shim.h: just enough of the Metal Shading Language (and of MLX's metal::utils()) for clang++
// (-std=c++17 -fsyntax-only, see tests/metal_source.py) to type-check the MSL source that
// mx.fast.metal_kernel generates from our kernels, with three MSL rules that plain C++ lacks:
//
// - Address spaces are distinct: device, constant and threadgroup are clang address spaces 1-3
//   and thread is the default one, so a pointer that crosses them without a cast (a `device`
//   pointer assigned to a `thread` pointer, a `constant` input passed where `device` is
//   expected) fails as on Metal. (clang still accepts a C-style cast between address spaces,
//   which Metal rejects; the bodies never cast one.) Values in any address space are builtin
//   types (scalars, clang ext vectors, bfloat as an enum), since C++ methods cannot take an
//   object in another address space.
// - MSL's scalar type names are keywords: half, bfloat, uchar, ushort, uint, ulong expand to
//   qualified names at the end of this file, so `const uint half = 1;` does not compile. Vector
//   names stay plain typedefs (float4(a, b, c, d) needs a function-like macro); the reserved-word
//   lint (tests/msl_lint.py) covers them and the rest of the MSL reserved list.
// - Threadgroup memory is counted per instantiation (tests/metal_source.py adds the checks).
//
// Declarations only, except where a body gives a check (as_type's size). Nothing from the C++
// standard library is included, so a kernel that uses std:: or libc does not compile here either.
// Not modelled: Metal's ban on casts between address spaces, and resource limits beyond the ones
// tests/metal_source.py checks. Kernel-argument attributes ([[thread_index_in_simdgroup]], ...) are
// deliberately NOT declared here: MLX declares them as kernel parameters when the kernel *body*
// mentions them, and the test's signature does the same, so a header-only use fails here as it
// fails on Metal. Needs clang (address spaces, __fp16 as an arithmetic type, ext vectors).
#pragma once
#ifndef __clang__
#error "metal_shim.h needs clang++ (address spaces and ext vectors)"
#endif

// ---- address spaces -----------------------------------------------------------------------------
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
#define METAL_FUNC inline

// ---- scalar types -----------------------------------------------------------------------------
namespace metal {
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef __fp16 half;  // arithmetic with -fnative-half-type: half * float is float, as in MSL
// bfloat16: converts explicitly to and from float (float(x), T(f)); no arithmetic of its own here
enum class bfloat : ushort {};
}  // namespace metal
typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;

// ---- vectors: vec<T, N> and float2..4, half2..4, int, uint, short, ushort, char, uchar, long ----
// clang ext vectors: swizzles, v[i], element-wise operators, copies in every address space.
// MSL's constructors float4(a, b, c, d), float4(xy, z, w), float4(s), float4(h4) are the
// function-like macros at the end of this file (the component count is not checked).
namespace metal {
template <typename T, int N>
using vec = T __attribute__((ext_vector_type(N)));
template <typename V, typename... A>
V make_vec(A... components);

#define METAL_SHIM_VECTORS(T) \
  typedef vec<T, 2> T##2;     \
  typedef vec<T, 3> T##3;     \
  typedef vec<T, 4> T##4;
METAL_SHIM_VECTORS(float)
METAL_SHIM_VECTORS(half)
METAL_SHIM_VECTORS(int)
METAL_SHIM_VECTORS(uint)
METAL_SHIM_VECTORS(short)
METAL_SHIM_VECTORS(ushort)
METAL_SHIM_VECTORS(char)
METAL_SHIM_VECTORS(uchar)
METAL_SHIM_VECTORS(long)
METAL_SHIM_VECTORS(ulong)
#undef METAL_SHIM_VECTORS
}  // namespace metal

namespace metal {
// ---- reinterpretation -------------------------------------------------------------------------
template <typename To, typename From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: the two types differ in size");
  To to;
  __builtin_memcpy(&to, &x, sizeof(To));
  return to;
}

// ---- synchronisation --------------------------------------------------------------------------
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
mem_flags operator|(mem_flags, mem_flags);
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);

enum memory_order { memory_order_relaxed };
template <typename T>
struct atomic { T value; };
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
#define METAL_SHIM_ATOMICS(space)                                                          \
  template <typename T>                                                                     \
  T atomic_fetch_add_explicit(space atomic<T>* object, T operand, memory_order order);      \
  template <typename T>                                                                     \
  T atomic_load_explicit(const space atomic<T>* object, memory_order order);                \
  template <typename T>                                                                     \
  void atomic_store_explicit(space atomic<T>* object, T desired, memory_order order);
METAL_SHIM_ATOMICS(device)
METAL_SHIM_ATOMICS(threadgroup)
#undef METAL_SHIM_ATOMICS

// ---- SIMD-group functions (float, half, int, uint and their vectors) -------------------------
template <typename T> T simd_sum(T);
template <typename T> T simd_max(T);
template <typename T> T simd_min(T);
template <typename T> T simd_prefix_exclusive_sum(T);
template <typename T> T simd_prefix_inclusive_sum(T);
template <typename T> T simd_shuffle(T, ushort lane);
template <typename T> T simd_shuffle_down(T, ushort delta);
template <typename T> T simd_shuffle_up(T, ushort delta);
template <typename T> T simd_shuffle_xor(T, ushort mask);
template <typename T> T simd_broadcast(T, ushort lane);
template <typename T> T simd_broadcast_first(T);

// ---- math: float and half overloads (plus vectors), as in <metal_math> -----------------------
#define METAL_SHIM_UNARY(f)                      \
  float f(float);                                \
  half f(half);                                  \
  float4 f(float4);                              \
  half4 f(half4);
#define METAL_SHIM_BINARY(f)                     \
  float f(float, float);                         \
  half f(half, half);                            \
  float4 f(float4, float4);                      \
  half4 f(half4, half4);
METAL_SHIM_UNARY(exp)
METAL_SHIM_UNARY(exp2)
METAL_SHIM_UNARY(log)
METAL_SHIM_UNARY(log2)
METAL_SHIM_UNARY(sqrt)
METAL_SHIM_UNARY(rsqrt)
METAL_SHIM_UNARY(fabs)
METAL_SHIM_UNARY(floor)
METAL_SHIM_UNARY(ceil)
METAL_SHIM_UNARY(round)
METAL_SHIM_UNARY(trunc)
METAL_SHIM_UNARY(sin)
METAL_SHIM_UNARY(cos)
METAL_SHIM_UNARY(tanh)
METAL_SHIM_BINARY(pow)
METAL_SHIM_BINARY(fmax)
METAL_SHIM_BINARY(fmin)
float fma(float, float, float);
half fma(half, half, half);
float mix(float, float, float);
half mix(half, half, half);
float dot(float2, float2);
float dot(float4, float4);
half dot(half4, half4);
bool isnan(float);
bool isnan(half);
bool isinf(float);
bool isinf(half);

// abs / max / min / clamp also take integers
#define METAL_SHIM_ALL_TYPES(decl) \
  decl(float) decl(half) decl(int) decl(uint) decl(short) decl(ushort) decl(char) decl(uchar) \
  decl(long) decl(ulong)
#define METAL_SHIM_ABS(T) T abs(T);
#define METAL_SHIM_MAX(T) T max(T, T);
#define METAL_SHIM_MIN(T) T min(T, T);
#define METAL_SHIM_CLAMP(T) T clamp(T, T, T);
#define METAL_SHIM_ABS4(T) T##4 abs(T##4);
#define METAL_SHIM_MAX4(T) T##4 max(T##4, T##4);
#define METAL_SHIM_MIN4(T) T##4 min(T##4, T##4);
METAL_SHIM_ALL_TYPES(METAL_SHIM_ABS)
METAL_SHIM_ALL_TYPES(METAL_SHIM_MAX)
METAL_SHIM_ALL_TYPES(METAL_SHIM_MIN)
METAL_SHIM_ALL_TYPES(METAL_SHIM_CLAMP)
METAL_SHIM_ALL_TYPES(METAL_SHIM_ABS4)
METAL_SHIM_ALL_TYPES(METAL_SHIM_MAX4)
METAL_SHIM_ALL_TYPES(METAL_SHIM_MIN4)

namespace fast {
METAL_SHIM_UNARY(exp)
METAL_SHIM_UNARY(exp2)
METAL_SHIM_UNARY(log)
METAL_SHIM_UNARY(sqrt)
METAL_SHIM_UNARY(rsqrt)
METAL_SHIM_UNARY(tanh)
float divide(float, float);
}  // namespace fast
namespace precise {
METAL_SHIM_UNARY(exp)
METAL_SHIM_UNARY(sqrt)
METAL_SHIM_UNARY(tanh)
float divide(float, float);
}  // namespace precise
#undef METAL_SHIM_UNARY
#undef METAL_SHIM_BINARY
#undef METAL_SHIM_ALL_TYPES
#undef METAL_SHIM_ABS
#undef METAL_SHIM_MAX
#undef METAL_SHIM_MIN
#undef METAL_SHIM_CLAMP
#undef METAL_SHIM_ABS4
#undef METAL_SHIM_MAX4
#undef METAL_SHIM_MIN4

template <typename T>
struct numeric_limits {
  static T max();
  static T min();
  static T lowest();
  static T infinity();
  static T epsilon();
};
}  // namespace metal

#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define FLT_MAX __FLT_MAX__
#define FLT_MIN __FLT_MIN__

// ---- MLX's metal::utils(): the names its generated signatures use ----------------------------
typedef metal::half float16_t;
typedef metal::bfloat bfloat16_t;

using namespace metal;

// ---- MSL's type keywords (after every declaration above) ----------------------------------------
// A qualified name cannot be declared inside a function, so `const uint half = 1;` fails as it
// does on Metal, while half(x), uint(x) and `half h;` keep working.
#define half ::metal::half
#define bfloat ::metal::bfloat
#define uchar ::metal::uchar
#define ushort ::metal::ushort
#define uint ::metal::uint
#define ulong ::metal::ulong
// MSL vector constructors: float4(a, b, c, d), float4(xy, z, w), float4(s), float4(h4); a bare
// float4 is the typedef
#define float2(...) ::metal::make_vec<::metal::float2>(__VA_ARGS__)
#define float3(...) ::metal::make_vec<::metal::float3>(__VA_ARGS__)
#define float4(...) ::metal::make_vec<::metal::float4>(__VA_ARGS__)
#define half2(...) ::metal::make_vec<::metal::half2>(__VA_ARGS__)
#define half3(...) ::metal::make_vec<::metal::half3>(__VA_ARGS__)
#define half4(...) ::metal::make_vec<::metal::half4>(__VA_ARGS__)
#define int2(...) ::metal::make_vec<::metal::int2>(__VA_ARGS__)
#define int3(...) ::metal::make_vec<::metal::int3>(__VA_ARGS__)
#define int4(...) ::metal::make_vec<::metal::int4>(__VA_ARGS__)
#define uint2(...) ::metal::make_vec<::metal::uint2>(__VA_ARGS__)
#define uint3(...) ::metal::make_vec<::metal::uint3>(__VA_ARGS__)
#define uint4(...) ::metal::make_vec<::metal::uint4>(__VA_ARGS__)
#define short2(...) ::metal::make_vec<::metal::short2>(__VA_ARGS__)
#define short3(...) ::metal::make_vec<::metal::short3>(__VA_ARGS__)
#define short4(...) ::metal::make_vec<::metal::short4>(__VA_ARGS__)
#define ushort2(...) ::metal::make_vec<::metal::ushort2>(__VA_ARGS__)
#define ushort3(...) ::metal::make_vec<::metal::ushort3>(__VA_ARGS__)
#define ushort4(...) ::metal::make_vec<::metal::ushort4>(__VA_ARGS__)
#define char2(...) ::metal::make_vec<::metal::char2>(__VA_ARGS__)
#define char3(...) ::metal::make_vec<::metal::char3>(__VA_ARGS__)
#define char4(...) ::metal::make_vec<::metal::char4>(__VA_ARGS__)
#define uchar2(...) ::metal::make_vec<::metal::uchar2>(__VA_ARGS__)
#define uchar3(...) ::metal::make_vec<::metal::uchar3>(__VA_ARGS__)
#define uchar4(...) ::metal::make_vec<::metal::uchar4>(__VA_ARGS__)
#define long2(...) ::metal::make_vec<::metal::long2>(__VA_ARGS__)
#define long3(...) ::metal::make_vec<::metal::long3>(__VA_ARGS__)
#define long4(...) ::metal::make_vec<::metal::long4>(__VA_ARGS__)
#define ulong2(...) ::metal::make_vec<::metal::ulong2>(__VA_ARGS__)
#define ulong3(...) ::metal::make_vec<::metal::ulong3>(__VA_ARGS__)
#define ulong4(...) ::metal::make_vec<::metal::ulong4>(__VA_ARGS__)

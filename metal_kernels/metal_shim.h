// metal_shim.h: just enough of the Metal Shading Language (and of MLX's metal::utils()) for a
// host C++ compiler (g++ or clang++, -std=c++17 -fsyntax-only) to type-check the MSL source that
// mx.fast.metal_kernel generates from our kernels (tests/metal_source.py renders it).
//
// Declarations only, except where a body gives a check (as_type's size). Nothing from the C++
// standard library is included, so a kernel that uses std:: or libc does not compile here either.
// What cannot be modelled: address spaces (the qualifiers below are empty), vector swizzles,
// Metal's rules on threadgroup variables and resource limits. Kernel-argument attributes
// ([[thread_index_in_simdgroup]], ...) are deliberately NOT declared here: MLX declares them as
// kernel parameters when the kernel *body* mentions them, and the test's signature does the same,
// so a header-only use fails here as it fails on Metal.
#pragma once

// ---- address spaces (Metal keywords; empty so that `const device T* x` is `const T* x`) -------
#define device
#define constant
#define threadgroup
#define thread
#define METAL_FUNC inline

// ---- scalar types -----------------------------------------------------------------------------
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
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

#if defined(__FLT16_MAX__) && !defined(METAL_SHIM_STRUCT_HALF)
typedef _Float16 half;  // a real arithmetic type: half * float is float, as in MSL
#else
struct half {
  ushort bits;
  half() = default;
  half(float);
  operator float() const;
  half& operator+=(float);
  half& operator-=(float);
  half& operator*=(float);
  half& operator/=(float);
};
#endif

// bfloat16: a storage type converting to and from float (MSL 3.1 `bfloat` or MLX's struct).
struct bfloat {
  ushort bits;
  bfloat() = default;
  bfloat(float);
  operator float() const;
  bfloat& operator+=(float);
  bfloat& operator-=(float);
  bfloat& operator*=(float);
  bfloat& operator/=(float);
};

// ---- vectors: vec<T, N> and float2..4, half2..4, uint2..4, int2..4, uchar2..4, ushort2..4 ---
namespace metal {
template <typename T, int N>
struct vec_fields;
template <typename T>
struct vec_fields<T, 2> { T x, y; };
template <typename T>
struct vec_fields<T, 3> { T x, y, z; };
template <typename T>
struct vec_fields<T, 4> { T x, y, z, w; };

template <bool B>
struct vec_enable {};
template <>
struct vec_enable<true> { typedef int type; };

template <typename T, int N>
struct vec : vec_fields<T, N> {
  vec() = default;
  vec(T scalar);  // splat; also lets `v * 2.0f` use the vector operators
  template <typename... A, typename vec_enable<(sizeof...(A) >= 2 && sizeof...(A) <= N)>::type = 0>
  vec(A... components);  // float4(a, b, c, d), float4(xy, z, w), ... (arity not checked)
  template <typename U>
  explicit vec(const vec<U, N>& other);  // float4(h4): explicit element conversion
  T& operator[](uint i);
  const T& operator[](uint i) const;
  vec& operator+=(vec);
  vec& operator-=(vec);
  vec& operator*=(vec);
  vec& operator/=(vec);
  friend vec operator+(vec a, vec) { return a; }
  friend vec operator-(vec a, vec) { return a; }
  friend vec operator*(vec a, vec) { return a; }
  friend vec operator/(vec a, vec) { return a; }
  friend vec operator-(vec a) { return a; }
};
}  // namespace metal

#define METAL_SHIM_VECTORS(T)           \
  typedef metal::vec<T, 2> T##2;        \
  typedef metal::vec<T, 3> T##3;        \
  typedef metal::vec<T, 4> T##4;
METAL_SHIM_VECTORS(float)
METAL_SHIM_VECTORS(half)
METAL_SHIM_VECTORS(int)
METAL_SHIM_VECTORS(uint)
METAL_SHIM_VECTORS(short)
METAL_SHIM_VECTORS(ushort)
METAL_SHIM_VECTORS(char)
METAL_SHIM_VECTORS(uchar)
METAL_SHIM_VECTORS(bool)
#undef METAL_SHIM_VECTORS

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
template <typename T>
T atomic_fetch_add_explicit(atomic<T>* object, T operand, memory_order order);
template <typename T>
T atomic_load_explicit(const atomic<T>* object, memory_order order);
template <typename T>
void atomic_store_explicit(atomic<T>* object, T desired, memory_order order);

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
  template <typename T, int N>                   \
  vec<T, N> f(vec<T, N>);
#define METAL_SHIM_BINARY(f)                     \
  float f(float, float);                         \
  half f(half, half);                            \
  template <typename T, int N>                   \
  vec<T, N> f(vec<T, N>, vec<T, N>);
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
template <typename T, int N>
T dot(vec<T, N>, vec<T, N>);
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
METAL_SHIM_ALL_TYPES(METAL_SHIM_ABS)
METAL_SHIM_ALL_TYPES(METAL_SHIM_MAX)
METAL_SHIM_ALL_TYPES(METAL_SHIM_MIN)
METAL_SHIM_ALL_TYPES(METAL_SHIM_CLAMP)
template <typename T, int N> vec<T, N> abs(vec<T, N>);
template <typename T, int N> vec<T, N> max(vec<T, N>, vec<T, N>);
template <typename T, int N> vec<T, N> min(vec<T, N>, vec<T, N>);
template <typename T, int N> vec<T, N> clamp(vec<T, N>, vec<T, N>, vec<T, N>);

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
typedef half float16_t;
typedef bfloat bfloat16_t;

using namespace metal;

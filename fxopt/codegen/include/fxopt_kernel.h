// fxopt_kernel.h: the fixed helpers every generated kernel uses, for both targets.
//
// The op table (fxopt/ops.py) writes each op's scalar expression in terms of these functions, so the C++ (CPU)
// and CUDA C++ (NVRTC) kernels compute the same arithmetic. Semantics follow PyTorch's eager kernels: NaN
// propagates through min/max/clamp/relu, floor division and remainder round like Python, float16/bfloat16 are
// storage types converted to float for arithmetic.
//
// NVRTC compiles without any include path, so this header includes nothing on CUDA and defines the few standard
// types it needs itself.
#pragma once

#if defined(__CUDACC__)
#define FX_INLINE __device__ __forceinline__
#if defined(__CUDACC_RTC__)
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#endif
#define FX_INF_F __int_as_float(0x7f800000)
#define FX_NAN_F __int_as_float(0x7fc00000)
#define FX_INF_D __longlong_as_double(0x7ff0000000000000LL)
#define FX_NAN_D __longlong_as_double(0x7ff8000000000000LL)
#define FX_RESTRICT __restrict__
#define FX_TRAP() __trap()
// NOTE [Programmatic dependent launch]: every generated CUDA kernel starts with FX_GRID_DEPENDENCY(). On Hopper and
// later it is griddepcontrol.wait, which returns once the grids this one programmatically depends on have completed
// and their writes are visible (at once when it was launched without such a dependency), then
// griddepcontrol.launch_dependents, which lets a kernel that programmatically depends on this one be scheduled now:
// that kernel waits in its own griddepcontrol.wait, so nothing is read early. runtime/cudagraph/pdl.py makes the
// edges between such kernels of a captured graph programmatic: the next kernel's launch overlaps this one's run.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FX_GRID_DEPENDENCY()                             \
  do {                                                   \
    asm volatile("griddepcontrol.wait;" ::: "memory");   \
    asm volatile("griddepcontrol.launch_dependents;" :::); \
  } while (0)
#else
#define FX_GRID_DEPENDENCY() \
  do {                       \
  } while (0)
#endif
#else
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#define FX_INLINE static inline
#define FX_INF_F std::numeric_limits<float>::infinity()
#define FX_NAN_F std::numeric_limits<float>::quiet_NaN()
#define FX_INF_D std::numeric_limits<double>::infinity()
#define FX_NAN_D std::numeric_limits<double>::quiet_NaN()
#define FX_RESTRICT __restrict__
#define FX_TRAP() __builtin_trap()
#endif

// An index map's entry (NOTE [Movement maps] in codegen/rowwise.py), checked against the elements it may address:
// the host checks a map before its first launch, and an entry changed after that is a fault, not a stray access.
FX_INLINE int64_t fx_map_index(int32_t v, int64_t limit) {
  if (v < 0 || v >= limit) FX_TRAP();
  return v;
}

// ---- float16 / bfloat16 storage ------------------------------------------------------------------------------
// Plain 16-bit structs: loads and stores move 2 bytes, arithmetic happens in float.
struct fx_half { uint16_t bits; };
struct fx_bf16 { uint16_t bits; };

FX_INLINE float fx_f32_from_bits(uint32_t u) {
#if defined(__CUDACC__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}
FX_INLINE uint32_t fx_bits_from_f32(float f) {
#if defined(__CUDACC__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}

// NOTE [3xTF32 GEMMs] (passes/tf32x3.py): a float32 value's TF32 part (rounded to the nearest TF32 value, ties to
// even; truncated where rounding up would overflow: exact in TF32) and the remainder (exact in float32, of either
// sign); a non-finite value is its own part, with remainder 0
FX_INLINE float fx_tf32_hi(float v) {
  const uint32_t u = fx_bits_from_f32(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return v;
  const uint32_t nearest = (u + 0xfffu + ((u >> 13) & 1u)) & 0xffffe000u;
  return fx_f32_from_bits((nearest & 0x7f800000u) == 0x7f800000u ? (u & 0xffffe000u) : nearest);
}
FX_INLINE float fx_tf32_lo(float v) {
  const uint32_t u = fx_bits_from_f32(v);
  return (u & 0x7f800000u) == 0x7f800000u ? 0.f : v - fx_tf32_hi(v);
}

FX_INLINE float fx_load(fx_half h) {
#if defined(__CUDACC__)
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits)); return f;
#else
  // IEEE binary16 -> binary32, exact (normals, subnormals, inf, nan).
  uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0x1f) return fx_f32_from_bits(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return fx_f32_from_bits(sign);
    float f = (float)man * 5.9604644775390625e-08f;  // man * 2^-24
    return sign ? -f : f;
  }
  return fx_f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}
FX_INLINE fx_half fx_store_half(float f) {
  fx_half h;
#if defined(__CUDACC__)
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
#else
  // binary32 -> binary16, round to nearest even, overflow to inf, nan kept quiet.
  uint32_t u = fx_bits_from_f32(f), sign = (u >> 16) & 0x8000u, abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) { h.bits = (uint16_t)(sign | 0x7e00u); return h; }
  if (abs >= 0x477ff000u) { h.bits = (uint16_t)(sign | 0x7c00u); return h; }  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // result is subnormal or zero
    float a = fx_f32_from_bits(abs) * 16777216.0f;  // scale by 2^24: the subnormal's integer mantissa
    h.bits = (uint16_t)(sign | (uint32_t)std::nearbyint(a));
    return h;
  }
  uint32_t mant_odd = (abs >> 13) & 1u;
  abs += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  h.bits = (uint16_t)(sign | (abs >> 13));
#endif
  return h;
}
FX_INLINE float fx_load(fx_bf16 b) { return fx_f32_from_bits((uint32_t)b.bits << 16); }
FX_INLINE fx_bf16 fx_store_bf16(float f) {
  fx_bf16 b;
  uint32_t u = fx_bits_from_f32(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) { b.bits = (uint16_t)((u >> 16) | 0x40u); return b; }  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  b.bits = (uint16_t)(u >> 16);
  return b;
}
// A value rounded to the precision of a 16-bit type and back: what an explicit .half() in a chain does.
FX_INLINE float fx_round_half(float f) { return fx_load(fx_store_half(f)); }
FX_INLINE float fx_round_bf16(float f) { return fx_load(fx_store_bf16(f)); }
template <class T> FX_INLINE T fx_load(T v) { return v; }

// ---- math: float and double overloads -------------------------------------------------------------------------
#if defined(__CUDACC__)
#define FX_UNARY(name, f32, f64) \
  FX_INLINE float name(float x) { return f32(x); } \
  FX_INLINE double name(double x) { return f64(x); }
#define FX_BINARY(name, f32, f64) \
  FX_INLINE float name(float x, float y) { return f32(x, y); } \
  FX_INLINE double name(double x, double y) { return f64(x, y); }
#else
#define FX_UNARY(name, f32, f64) \
  FX_INLINE float name(float x) { return std::f64(x); } \
  FX_INLINE double name(double x) { return std::f64(x); }
#define FX_BINARY(name, f32, f64) \
  FX_INLINE float name(float x, float y) { return std::f64(x, y); } \
  FX_INLINE double name(double x, double y) { return std::f64(x, y); }
#endif
FX_UNARY(fx_exp, expf, exp)
FX_UNARY(fx_exp2, exp2f, exp2)
FX_UNARY(fx_expm1, expm1f, expm1)
FX_UNARY(fx_log, logf, log)
FX_UNARY(fx_log2, log2f, log2)
FX_UNARY(fx_log10, log10f, log10)
FX_UNARY(fx_log1p, log1pf, log1p)
FX_UNARY(fx_sqrt, sqrtf, sqrt)
FX_UNARY(fx_sin, sinf, sin)
FX_UNARY(fx_cos, cosf, cos)
FX_UNARY(fx_tan, tanf, tan)
FX_UNARY(fx_tanh, tanhf, tanh)
FX_UNARY(fx_sinh, sinhf, sinh)
FX_UNARY(fx_cosh, coshf, cosh)
FX_UNARY(fx_atan, atanf, atan)
FX_UNARY(fx_asin, asinf, asin)
FX_UNARY(fx_acos, acosf, acos)
FX_UNARY(fx_erf, erff, erf)
FX_UNARY(fx_erfc, erfcf, erfc)
FX_UNARY(fx_floor_f, floorf, floor)
FX_UNARY(fx_ceil_f, ceilf, ceil)
FX_UNARY(fx_trunc_f, truncf, trunc)
FX_UNARY(fx_rint_f, rintf, nearbyint)
FX_UNARY(fx_fabs, fabsf, fabs)
FX_BINARY(fx_pow_f, powf, pow)
FX_BINARY(fx_fmod, fmodf, fmod)
FX_BINARY(fx_copysign, copysignf, copysign)

#if defined(__CUDACC__)
FX_INLINE float fx_rsqrt(float x) { return rsqrtf(x); }
FX_INLINE double fx_rsqrt(double x) { return rsqrt(x); }
#else
FX_INLINE float fx_rsqrt(float x) { return 1.0f / std::sqrt(x); }
FX_INLINE double fx_rsqrt(double x) { return 1.0 / std::sqrt(x); }
#endif

template <class T> FX_INLINE bool fx_isnan(T x) { return x != x; }

// Rounding: identity on integers, the float function on floats.
template <class T> FX_INLINE T fx_floor(T x) { return x; }
template <class T> FX_INLINE T fx_ceil(T x) { return x; }
template <class T> FX_INLINE T fx_trunc(T x) { return x; }
template <class T> FX_INLINE T fx_round(T x) { return x; }
template <class T> FX_INLINE T fx_frac(T x) { return 0; }
FX_INLINE float fx_floor(float x) { return fx_floor_f(x); }
FX_INLINE double fx_floor(double x) { return fx_floor_f(x); }
FX_INLINE float fx_ceil(float x) { return fx_ceil_f(x); }
FX_INLINE double fx_ceil(double x) { return fx_ceil_f(x); }
FX_INLINE float fx_trunc(float x) { return fx_trunc_f(x); }
FX_INLINE double fx_trunc(double x) { return fx_trunc_f(x); }
FX_INLINE float fx_round(float x) { return fx_rint_f(x); }  // half to even, as torch.round
FX_INLINE double fx_round(double x) { return fx_rint_f(x); }
FX_INLINE float fx_frac(float x) { return x - fx_trunc_f(x); }
FX_INLINE double fx_frac(double x) { return x - fx_trunc_f(x); }

template <class T> FX_INLINE T fx_abs(T x) { return x < 0 ? -x : x; }
FX_INLINE float fx_abs(float x) { return fx_fabs(x); }
FX_INLINE double fx_abs(double x) { return fx_fabs(x); }
FX_INLINE bool fx_abs(bool x) { return x; }
template <class T> FX_INLINE T fx_sign(T x) { return (T)((T(0) < x) - (x < T(0))); }  // sign(nan) = 0, as eager
FX_INLINE bool fx_sign(bool x) { return x; }
template <class T> FX_INLINE T fx_bitwise_not(T x) { return ~x; }
FX_INLINE bool fx_bitwise_not(bool x) { return !x; }

// ---- NaN-propagating min/max and clamps (torch.maximum, clamp, relu keep NaN) ----------------------------------
template <class T> FX_INLINE T fx_maximum(T a, T b) { return (a != a) ? a : ((b != b) ? b : (a > b ? a : b)); }
template <class T> FX_INLINE T fx_minimum(T a, T b) { return (a != a) ? a : ((b != b) ? b : (a < b ? a : b)); }
// A NaN value or a NaN bound gives NaN, as eager's clamp with tensor bounds does.
template <class T> FX_INLINE T fx_clamp_min(T x, T lo) { return (x != x) ? x : (lo != lo ? lo : (x < lo ? lo : x)); }
template <class T> FX_INLINE T fx_clamp_max(T x, T hi) { return (x != x) ? x : (hi != hi ? hi : (x > hi ? hi : x)); }
template <class T> FX_INLINE T fx_clamp(T x, T lo, T hi) { return fx_clamp_max(fx_clamp_min(x, lo), hi); }
template <class T> FX_INLINE T fx_relu(T x) { return x < T(0) ? T(0) : x; }  // relu(nan) = nan, relu(-0) = -0
FX_INLINE bool fx_relu(bool x) { return x; }

// ---- division with Python rounding (torch.div rounding_mode, //, %) ------------------------------------------
template <class T> FX_INLINE T fx_floordiv(T a, T b) {  // integers; tensor divisors are never fused (ops.py)
  T q = a / b;
  return ((a % b != 0) && ((a < 0) != (b < 0))) ? q - 1 : q;
}
template <class T> FX_INLINE T fx_floordiv_f(T a, T b) {  // PyTorch's div_floor_floating
  if (b == T(0)) return a / b;
  T mod = fx_fmod(a, b), div = (a - mod) / b;
  if ((mod != T(0)) && ((b < T(0)) != (mod < T(0)))) div -= T(1);
  if (div == T(0)) return fx_copysign(T(0), a / b);
  T fl = fx_floor_f(div);
  if (div - fl > T(0.5)) fl += T(1);
  return fl;
}
FX_INLINE float fx_floordiv(float a, float b) { return fx_floordiv_f(a, b); }
FX_INLINE double fx_floordiv(double a, double b) { return fx_floordiv_f(a, b); }
template <class T> FX_INLINE T fx_truncdiv(T a, T b) { return a / b; }
FX_INLINE float fx_truncdiv(float a, float b) { return fx_trunc_f(a / b); }
FX_INLINE double fx_truncdiv(double a, double b) { return fx_trunc_f(a / b); }
template <class T> FX_INLINE T fx_remainder(T a, T b) {
  T r = a % b;
  return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}
template <class T> FX_INLINE T fx_remainder_f(T a, T b) {
  T r = fx_fmod(a, b);
  return (r != T(0) && ((r < T(0)) != (b < T(0)))) ? r + b : r;
}
FX_INLINE float fx_remainder(float a, float b) { return fx_remainder_f(a, b); }
FX_INLINE double fx_remainder(double a, double b) { return fx_remainder_f(a, b); }

// ---- pow ---------------------------------------------------------------------------------------------------
template <class T> FX_INLINE T fx_pow(T base, T exp) {  // integers: by squaring; negative exponents as eager
  if (exp < 0) return base == 1 ? T(1) : (base == T(-1) ? ((exp & 1) ? T(-1) : T(1)) : T(0));
  T result = 1;
  while (exp) { if (exp & 1) result *= base; exp >>= 1; base *= base; }
  return result;
}
FX_INLINE float fx_pow(float a, float b) { return fx_pow_f(a, b); }
FX_INLINE double fx_pow(double a, double b) { return fx_pow_f(a, b); }
FX_INLINE bool fx_pow(bool a, bool b) { return a || !b; }

// ---- activations ---------------------------------------------------------------------------------------------
template <class T> FX_INLINE T fx_sigmoid(T x) { return T(1) / (T(1) + fx_exp(-x)); }
template <class T> FX_INLINE T fx_silu(T x) { return x / (T(1) + fx_exp(-x)); }
template <class T> FX_INLINE T fx_gelu(T x) { return x * T(0.5) * (T(1) + fx_erf(x * T(0.70710678118654752440))); }
template <class T> FX_INLINE T fx_gelu_tanh(T x) {
  const T beta = T(0.79788456080286535588), kappa = T(0.044715);  // sqrt(2/pi)
  return T(0.5) * x * (T(1) + fx_tanh(beta * (x + kappa * x * x * x)));
}
template <class T> FX_INLINE T fx_mish(T x) { return x * fx_tanh(fx_log1p(fx_exp(x))); }
template <class T> FX_INLINE T fx_softplus(T x, T beta, T threshold) {
  return (x * beta) > threshold ? x : fx_log1p(fx_exp(x * beta)) / beta;
}
template <class T> FX_INLINE T fx_leaky_relu(T x, T slope) { return x > T(0) ? x : x * slope; }
template <class T> FX_INLINE T fx_elu(T x, T alpha, T scale, T input_scale) {
  return x > T(0) ? x * scale : fx_expm1(x * input_scale) * alpha * scale;
}
template <class T> FX_INLINE T fx_hardsigmoid(T x) {
  return fx_minimum(fx_maximum(x + T(3), T(0)), T(6)) / T(6);
}
template <class T> FX_INLINE T fx_hardswish(T x) {
  return x * fx_minimum(fx_maximum(x + T(3), T(0)), T(6)) / T(6);
}
template <class T> FX_INLINE T fx_lerp(T a, T b, T w) {  // PyTorch's lerp: exact at both ends
  T diff = b - a;
  return fx_abs(w) < T(0.5) ? a + w * diff : b - diff * (T(1) - w);
}
template <class T> FX_INLINE T fx_nan_to_num(T x, T nan, T posinf, T neginf) {
  if (x != x) return nan;
  if (x == FX_INF_D) return posinf;
  if (x == -FX_INF_D) return neginf;
  return x;
}

// ---- vectors for 16-byte loads and stores ----------------------------------------------------------------------
template <class T, int N> struct alignas(sizeof(T) * N) fx_vec { T v[N]; };

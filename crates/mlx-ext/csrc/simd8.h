// Eight f32 lanes, as AVX2 registers where the translation unit is compiled for AVX2 (the build
// compiles kernels.cpp twice and picks at run time), else as plain arrays the compiler may
// vectorize for the target (NEON on arm64).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define KV_SIMD_AVX2 1
#endif

namespace kvsplit {

// An e8m0 scale byte as the float 2^(e - 127); 0 is 2^-127 (a subnormal), as MLX decodes it.
inline float e8m0_to_float(uint8_t e) {
  const uint32_t bits = e == 0 ? 0x00400000u : uint32_t(e) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#endif
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {
    // Subnormal half: value = man * 2^-24.
    float f = float(man) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#ifdef KV_SIMD_AVX2
struct F8 {
  __m256 v;
  static F8 zero() { return {_mm256_setzero_ps()}; }
  static F8 splat(float x) { return {_mm256_set1_ps(x)}; }
  static F8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  // Eight f16 bit patterns widened (F16C, which every AVX2 CPU has).
  static F8 load_half(const uint16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  // Lane i = (p[i] >> shift) & mask for 8 bytes p.
  static F8 codes(const uint8_t* p, int shift, int mask) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    b = _mm_and_si128(_mm_srli_epi16(b, shift), _mm_set1_epi8(char(mask)));
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b))};
  }
  // Lane i = (24-bit little-endian value of p[3i..3i+3) >> shift) & mask for 24 bytes p; reads
  // exactly those 24 bytes (two 16-byte loads at p and p + 8).
  static F8 codes24(const uint8_t* p, int shift, int mask) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));
    const __m256i x = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    // Low half: packs 0-3 from bytes 0..11 of p; high half: packs 4-7 from bytes 4..15 of p + 8.
    const __m256i idx = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                         4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1);
    __m256i w = _mm256_shuffle_epi8(x, idx);
    w = _mm256_and_si256(_mm256_srl_epi32(w, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(mask));
    return {_mm256_cvtepi32_ps(w)};
  }
  // Lane i = the e2m1 value of code (p[i] >> shift) & 15 (MXFP4): magnitudes 0, .5, 1, 1.5,
  // 2, 3, 4, 6 by the low three bits, the sign by the fourth.
  static F8 e2m1(const uint8_t* p, int shift) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    b = _mm_and_si128(_mm_srli_epi16(b, shift), _mm_set1_epi8(15));
    const __m256i c = _mm256_cvtepu8_epi32(b);
    const __m256 mag = _mm256_permutevar8x32_ps(_mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f), c);
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(8)), 28);
    return {_mm256_xor_ps(mag, _mm256_castsi256_ps(sign))};
  }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
inline F8 fma(F8 a, F8 b, F8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline F8 operator+(F8 a, F8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline F8 operator-(F8 a, F8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline F8 operator*(F8 a, F8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline F8 vmax(F8 a, F8 b) { return {_mm256_max_ps(a.v, b.v)}; }

// exp(x) for x <= 0 (softmax arguments): Cody-Waite reduction to r in [-ln2/2, ln2/2], a
// degree-6 polynomial, and 2^n through the exponent bits; relative error ~2e-7. Inputs below
// -87 flush to 0.
inline F8 exp_nonpositive(F8 x) {
  __m256 xv = _mm256_max_ps(x.v, _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xv, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xv);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 out = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  // n = -126 and below would need a subnormal scale: flush those to 0 like the clamp above.
  return {_mm256_and_ps(out, _mm256_cmp_ps(xv, _mm256_set1_ps(-87.0f), _CMP_GT_OQ))};
}

// cap * tanh(x / cap) (Gemma 2's score soft-capping), with tanh|y| = (1 - e) / (1 + e) for
// e = exp(-2|y|) <= 1: the exp's ~2e-7 relative error leaves ~1e-7 of cap absolute. Masked
// scores (-inf) stay -inf.
inline F8 soft_cap(F8 x, float cap) {
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  const __m256 y = _mm256_mul_ps(x.v, _mm256_set1_ps(1.0f / cap));
  const __m256 e = exp_nonpositive(F8{_mm256_mul_ps(_mm256_andnot_ps(sign, y), _mm256_set1_ps(-2.0f))}).v;
  const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  const __m256 r = _mm256_mul_ps(_mm256_or_ps(t, _mm256_and_ps(sign, y)), _mm256_set1_ps(cap));
  return {_mm256_blendv_ps(r, x.v, _mm256_cmp_ps(x.v, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ))};
}
#else
struct F8 {
  float v[8];
  static F8 zero() { return splat(0.0f); }
  static F8 splat(float x) {
    F8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = x;
    return r;
  }
  static F8 load(const float* p) {
    F8 r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static F8 load_half(const uint16_t* p) {
    F8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = half_to_float(p[i]);
    return r;
  }
  void store(float* p) const { std::memcpy(p, v, sizeof(v)); }
  static F8 codes(const uint8_t* p, int shift, int mask) {
    F8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = float((p[i] >> shift) & mask);
    return r;
  }
  static F8 codes24(const uint8_t* p, int shift, int mask) {
    F8 r;
    for (int i = 0; i < 8; ++i) {
      const uint32_t x = uint32_t(p[3 * i]) | uint32_t(p[3 * i + 1]) << 8 | uint32_t(p[3 * i + 2]) << 16;
      r.v[i] = float((x >> shift) & uint32_t(mask));
    }
    return r;
  }
  static F8 e2m1(const uint8_t* p, int shift) {
    static constexpr float lut[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                      -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
    F8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = lut[(p[i] >> shift) & 15];
    return r;
  }
  float sum() const {
    float s = 0;
    for (float x : v) s += x;
    return s;
  }
  float max() const {
    float m = v[0];
    for (float x : v) m = x > m ? x : m;
    return m;
  }
};
inline F8 fma(F8 a, F8 b, F8 c) {
  for (int i = 0; i < 8; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return c;
}
inline F8 operator+(F8 a, F8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
  return a;
}
inline F8 operator-(F8 a, F8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] -= b.v[i];
  return a;
}
inline F8 operator*(F8 a, F8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i];
  return a;
}
inline F8 vmax(F8 a, F8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] = b.v[i] > a.v[i] ? b.v[i] : a.v[i];
  return a;
}
inline F8 exp_nonpositive(F8 x) {
  for (int i = 0; i < 8; ++i) x.v[i] = std::exp(x.v[i]);
  return x;
}
inline F8 soft_cap(F8 x, float cap) {
  for (int i = 0; i < 8; ++i)
    if (x.v[i] != -INFINITY) x.v[i] = cap * std::tanh(x.v[i] / cap);
  return x;
}
#endif

}  // namespace kvsplit

// CPU kernels over MLX affine-quantized rows (bits 2, 3, 4, 6, 8; groups along a row), compiled
// once per instruction set: KV_NS names the namespace (see kernels.h and build.rs).
//
// Bits 3 and 6 (MLX packs them as a little-endian bit stream, 8 or 4 codes per 3 bytes) use
// 24-byte units whose lane i is the i-th 3-byte pack, phase j its j-th code: the same
// lane/phase order as below, so everything after the unpack is shared.
//
// Packed order: MLX packs element e of a row into bits (e % (32/b)) * b of 32-bit word
// e / (32/b), so byte i of a row holds elements i*p .. i*p+p-1 (p = 8/b codes per byte), one per
// "phase" (shift j*b). A unit of 8 bytes therefore unpacks with one shift+mask per phase into 8
// lanes: phase j gives elements i*p + j, i = 0..7. Queries/inputs are permuted into that order
// once per call, so the inner loops are loads, shifts, converts and FMAs only.
#include "kernels.h"

#include <algorithm>
#include <type_traits>

#include "simd8.h"

#ifndef KV_NS
#error "build.rs defines KV_NS"
#endif

namespace kvsplit {
namespace KV_NS {
namespace {

// Calls f with the code width as a compile-time constant (the widths the kernels unpack).
template <class F>
inline void with_bits(int bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Phase j of the unit at p: one code per lane (MX: its e2m1 value).
template <int B, bool MX = false>
inline F8 unit_codes(const uint8_t* p, int j) {
  constexpr int mask = (1 << B) - 1;
  if constexpr (MX) {
    static_assert(B == 4, "MXFP4 codes are 4-bit");
    return F8::e2m1(p, j * 4);
  } else if constexpr (unit_bytes_of(B) == 24) {
    return F8::codes24(p, j * B, mask);
  } else {
    return F8::codes(p, j * B, mask);
  }
}

inline float scale_at(const PackedRows& w, int64_t r, int g) {
  int64_t i = r * w.sb_stride + g;
  if (w.mxfp4) return e8m0_to_float(static_cast<const uint8_t*>(w.scales)[i]);
  return w.f16 ? half_to_float(static_cast<const uint16_t*>(w.scales)[i]) : static_cast<const float*>(w.scales)[i];
}

inline float bias_at(const PackedRows& w, int64_t r, int g) {
  int64_t i = r * w.sb_stride + g;
  if (w.mxfp4) return 0.0f;
  return w.f16 ? half_to_float(static_cast<const uint16_t*>(w.biases)[i]) : static_cast<const float*>(w.biases)[i];
}

// Dot products of R permuted input rows with packed rows [r0, r1); y[m*ldy + (r - r0)].
template <int B, int R, bool MX = false>
void dot_rows(const float* xp, const float* xsum, int k, const PackedRows& w, int64_t r0, int64_t r1, float* y,
              int64_t ldy) {
  constexpr int per = phases_of(B), unit = 8 * per, ub = unit_bytes_of(B);
  const int ng = k / w.group, upg = w.group / unit;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.w + r * w.row_bytes;
    F8 acc[R];
    float bacc[R];
    for (int m = 0; m < R; ++m) {
      acc[m] = F8::zero();
      bacc[m] = 0.0f;
    }
    for (int g = 0; g < ng; ++g) {
      // Two accumulators per row so consecutive FMAs do not wait on each other.
      F8 ga[R][2];
      for (int m = 0; m < R; ++m) ga[m][0] = ga[m][1] = F8::zero();
      for (int u = 0; u < upg; ++u) {
        const int unit_idx = g * upg + u;
        const uint8_t* p = row + unit_idx * ub;
        const float* xu = xp + unit_idx * unit;
        for (int j = 0; j < per; ++j) {
          F8 c = unit_codes<B, MX>(p, j);
          for (int m = 0; m < R; ++m) ga[m][(u * per + j) & 1] = fma(c, F8::load(xu + m * k + j * 8), ga[m][(u * per + j) & 1]);
        }
      }
      const F8 s = F8::splat(scale_at(w, r, g));
      const float b = bias_at(w, r, g);
      for (int m = 0; m < R; ++m) {
        acc[m] = fma(s, ga[m][0] + ga[m][1], acc[m]);
        bacc[m] += b * xsum[m * ng + g];
      }
    }
    for (int m = 0; m < R; ++m) y[m * ldy + (r - r0)] = acc[m].sum() + bacc[m];
  }
}

template <int B, bool MX = false>
void dot_rows_any(const float* xp, const float* xsum, int rows, int k, const PackedRows& w, int64_t r0, int64_t r1,
                  float* y, int64_t ldy) {
  const int ng = k / w.group;
  for (int m0 = 0; m0 < rows; m0 += 4) {
    const float* x = xp + int64_t(m0) * k;
    const float* xs = xsum + int64_t(m0) * ng;
    float* out = y + m0 * ldy;
    switch (std::min(4, rows - m0)) {
      case 1: dot_rows<B, 1, MX>(x, xs, k, w, r0, r1, out, ldy); break;
      case 2: dot_rows<B, 2, MX>(x, xs, k, w, r0, r1, out, ldy); break;
      case 3: dot_rows<B, 3, MX>(x, xs, k, w, r0, r1, out, ldy); break;
      default: dot_rows<B, 4, MX>(x, xs, k, w, r0, r1, out, ldy); break;
    }
  }
}

void dot_rows_bits(const float* xp, const float* xsum, int rows, int k, const PackedRows& w, int64_t r0, int64_t r1,
                   float* y, int64_t ldy) {
  if (w.mxfp4) return dot_rows_any<4, true>(xp, xsum, rows, k, w, r0, r1, y, ldy);
  with_bits(w.bits, [&](auto b) { dot_rows_any<decltype(b)::value>(xp, xsum, rows, k, w, r0, r1, y, ldy); });
}

// out[m*d + e] (values' permuted order) = sum_t wt[m*n + t] * code(t, e), for R rows; the
// weights already carry the value scale of the group being summed.
template <int B, int R>
void weighted_codes(const float* wt, int n, int d, const PackedRows& v, int64_t t0, int g, float* out) {
  constexpr int per = phases_of(B), unit = 8 * per, ub = unit_bytes_of(B);
  const int upg = v.group / unit;
  for (int u = 0; u < upg; ++u) {
    const int unit_idx = g * upg + u;
    F8 acc[R][per];
    for (int m = 0; m < R; ++m)
      for (int j = 0; j < per; ++j) acc[m][j] = F8::zero();
    const uint8_t* p = v.w + t0 * v.row_bytes + unit_idx * ub;
    for (int t = 0; t < n; ++t, p += v.row_bytes) {
      F8 c[per];
      for (int j = 0; j < per; ++j) c[j] = unit_codes<B>(p, j);
      for (int m = 0; m < R; ++m) {
        const F8 s = F8::splat(wt[m * n + t]);
        for (int j = 0; j < per; ++j) acc[m][j] = fma(s, c[j], acc[m][j]);
      }
    }
    for (int m = 0; m < R; ++m)
      for (int j = 0; j < per; ++j) acc[m][j].store(out + m * d + unit_idx * unit + j * 8);
  }
}

template <int B>
void weighted_codes_any(const float* wt, int rows, int n, int d, const PackedRows& v, int64_t t0, int g, float* out) {
  for (int m0 = 0; m0 < rows; m0 += 4) {
    const float* w = wt + int64_t(m0) * n;
    float* o = out + int64_t(m0) * d;
    switch (std::min(4, rows - m0)) {
      case 1: weighted_codes<B, 1>(w, n, d, v, t0, g, o); break;
      case 2: weighted_codes<B, 2>(w, n, d, v, t0, g, o); break;
      case 3: weighted_codes<B, 3>(w, n, d, v, t0, g, o); break;
      default: weighted_codes<B, 4>(w, n, d, v, t0, g, o); break;
    }
  }
}

// Rows [r0, r1) as f32 from `out` on (row r at out + (r - r0) * k), each row's K elements in the
// packed unit order (`permute`'s order):
// one shift+mask, convert and FMA per 8 elements, 8-lane stores.
template <int B, bool MX = false>
void dequantize_rows_b(const PackedRows& w, int k, int64_t r0, int64_t r1, float* out) {
  constexpr int per = phases_of(B), unit = 8 * per, ub = unit_bytes_of(B);
  const int ng = k / w.group, upg = w.group / unit;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.w + r * w.row_bytes;
    float* o = out + (r - r0) * k;
    for (int g = 0; g < ng; ++g) {
      const F8 s = F8::splat(scale_at(w, r, g)), b = F8::splat(bias_at(w, r, g));
      for (int u = 0; u < upg; ++u) {
        const int unit_idx = g * upg + u;
        const uint8_t* p = row + unit_idx * ub;
        for (int j = 0; j < per; ++j) fma(unit_codes<B, MX>(p, j), s, b).store(o + unit_idx * unit + j * 8);
      }
    }
  }
}

}  // namespace

void dequantize_rows(const PackedRows& w, int k, int64_t r0, int64_t r1, float* out) {
  if (w.mxfp4) return dequantize_rows_b<4, true>(w, k, r0, r1, out);
  with_bits(w.bits, [&](auto b) { dequantize_rows_b<decltype(b)::value>(w, k, r0, r1, out); });
}

void matvec(const float* xp, const float* xsum, int rows, int k, const PackedRows& w, int r0, int r1, float* y,
            int64_t ldy) {
  dot_rows_bits(xp, xsum, rows, k, w, r0, r1, y + r0, ldy);
}

namespace {

// Scores s (rows x n) become exp(s - max) in place; m and l get each row's max and sum. With
// softcap > 0 each score is first capped to softcap * tanh(s / softcap); masked scores (-inf)
// stay masked rather than becoming -softcap.
void softmax_rows(float* s, int rows, int n, float* m, float* l, float softcap) {
  for (int r = 0; r < rows; ++r) {
    float* sr = s + int64_t(r) * n;
    if (softcap > 0.0f) {
      int t = 0;
      for (; t + 8 <= n; t += 8) soft_cap(F8::load(sr + t), softcap).store(sr + t);
      for (; t < n; ++t)
        if (sr[t] != -INFINITY) sr[t] = softcap * std::tanh(sr[t] / softcap);
    }
    int t = 0;
    F8 mx = F8::splat(-INFINITY);
    for (; t + 8 <= n; t += 8) mx = vmax(mx, F8::load(sr + t));
    float mr = mx.max();
    for (; t < n; ++t) mr = std::max(mr, sr[t]);
    F8 sum = F8::zero();
    const F8 mv = F8::splat(mr);
    for (t = 0; t + 8 <= n; t += 8) {
      F8 p = exp_nonpositive(F8::load(sr + t) - mv);
      p.store(sr + t);
      sum = sum + p;
    }
    float lr = sum.sum();
    for (; t < n; ++t) {
      sr[t] = std::exp(sr[t] - mr);
      lr += sr[t];
    }
    m[r] = mr;
    l[r] = lr;
  }
}

// out (rows x d, values' permuted order) = sum over tokens [t0, t0 + n) of p[r][t] v_t, for the
// probabilities s; scratch as attend_block's after its scores (rows * (n + d) + 2 n floats).
void weighted_values(const float* s, int rows, int d, const PackedRows& v, int64_t t0, int n, float* out,
                     float* wt) {
  const int vng = d / v.group;
  float* vsc = wt + int64_t(rows) * n + int64_t(rows) * d;  // n value scales, then n biases
  float* vbi = vsc + n;
  for (int g = 0; g < vng; ++g) {
    // One conversion per token, shared by every query row.
    for (int t = 0; t < n; ++t) {
      vsc[t] = scale_at(v, t0 + t, g);
      vbi[t] = bias_at(v, t0 + t, g);
    }
    for (int r = 0; r < rows; ++r) {
      const float* pr = s + int64_t(r) * n;
      float* wr = wt + int64_t(r) * n;
      F8 bacc = F8::zero();
      int t = 0;
      for (; t + 8 <= n; t += 8) {
        const F8 p = F8::load(pr + t);
        (p * F8::load(vsc + t)).store(wr + t);
        bacc = fma(p, F8::load(vbi + t), bacc);
      }
      float bsum = bacc.sum();
      for (; t < n; ++t) {
        wr[t] = pr[t] * vsc[t];
        bsum += pr[t] * vbi[t];
      }
      // The bias term is the same for every element of the group: written first, added to below.
      for (int e = 0; e < v.group; ++e) out[int64_t(r) * d + g * v.group + e] = bsum;
    }
    float* tmp = wt + int64_t(rows) * n;  // rows x d
    with_bits(v.bits, [&](auto b) { weighted_codes_any<decltype(b)::value>(wt, rows, n, d, v, t0, g, tmp); });
    for (int r = 0; r < rows; ++r)
      for (int e = g * v.group; e < (g + 1) * v.group; ++e) out[int64_t(r) * d + e] += tmp[int64_t(r) * d + e];
  }
}

// Scores of per-channel keys, token groups [g0, g1): s[r * lds + (t - g0 * group)]. Per group,
// q . k_t = sum_e (q_e s_eg) c_et + sum_e q_e b_eg: the first term is weighted_codes with the
// channels as its "tokens" and this group's tokens as its elements (so it comes out in the
// permuted unit order, undone here), the second a constant of the group.
template <int B>
void channel_scores(const float* q, int rows, int d, const PackedRows& kt, int64_t g0, int64_t g1, float* s,
                    int64_t lds, float* scratch) {
  constexpr int per = phases_of(B), unit = 8 * per;
  const int group = kt.group;
  // weighted_codes counts groups from its operand's first byte: start it at group g0.
  PackedRows k = kt;
  k.w += g0 * (int64_t(group) * B / 8);
  float* wt = scratch;                      // rows x d: q_e s_eg
  float* sc = wt + int64_t(rows) * d;       // d scales
  float* bi = sc + d;                       // d biases
  float* cst = bi + d;                      // rows constants
  float* tmp = cst + rows;                  // one unit
  for (int64_t g = g0; g < g1; ++g) {
    for (int e = 0; e < d; ++e) {
      sc[e] = scale_at(kt, e, int(g));
      bi[e] = bias_at(kt, e, int(g));
    }
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + int64_t(r) * d;
      float* wr = wt + int64_t(r) * d;
      F8 c = F8::zero();
      for (int e = 0; e < d; e += 8) {
        const F8 qv = F8::load(qr + e);
        (qv * F8::load(sc + e)).store(wr + e);
        c = fma(qv, F8::load(bi + e), c);
      }
      cst[r] = c.sum();
    }
    weighted_codes_any<B>(wt, rows, d, int(lds), k, 0, int(g - g0), s);
    for (int r = 0; r < rows; ++r) {
      float* sr = s + int64_t(r) * lds + (g - g0) * group;
      for (int u0 = 0; u0 < group; u0 += unit) {
        for (int j = 0; j < per; ++j)
          for (int i = 0; i < 8; ++i) tmp[i * per + j] = sr[u0 + j * 8 + i];
        for (int w = 0; w < unit; ++w) sr[u0 + w] = tmp[w] + cst[r];
      }
    }
  }
}

}  // namespace

void attend_block(const float* qp, const float* qsum, int rows, int d, const PackedRows& k, const PackedRows& v,
                  int64_t t0, int64_t t1, float* m, float* l, float* out, float* scratch, float softcap) {
  const int n = int(t1 - t0);
  float* s = scratch;          // rows x n scores, then probabilities
  float* wt = scratch + rows * int64_t(n);  // rows x n probabilities times one group's value scale
  dot_rows_bits(qp, qsum, rows, d, k, t0, t1, s, n);
  softmax_rows(s, rows, n, m, l, softcap);
  weighted_values(s, rows, d, v, t0, n, out, wt);
}

namespace {

// s[r * ld + t] = q_r . kt[:, t] for R rows and 16 (or 8) tokens from t: kt is K^T (d x ld).
template <int R, int W>
inline void score_tile(const float* q, int d, const float* kt, int64_t ld, int t, float* s) {
  F8 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = F8::zero();
  for (int e = 0; e < d; ++e) {
    F8 kv[W];
    for (int w = 0; w < W; ++w) kv[w] = F8::load(kt + e * ld + t + 8 * w);
    for (int r = 0; r < R; ++r) {
      const F8 qb = F8::splat(q[r * d + e]);
      for (int w = 0; w < W; ++w) acc[r][w] = fma(qb, kv[w], acc[r][w]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w].store(s + r * ld + t + 8 * w);
}

// out[r * d + e] = sum_t p[r * ld + t] vb[t * d + e] for R rows and 16 (or 8) dims from e.
template <int R, int W>
inline void value_tile(const float* p, int64_t ld, int n, const float* vb, int d, int e, float* out) {
  F8 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = F8::zero();
  for (int t = 0; t < n; ++t) {
    F8 vv[W];
    for (int w = 0; w < W; ++w) vv[w] = F8::load(vb + int64_t(t) * d + e + 8 * w);
    for (int r = 0; r < R; ++r) {
      const F8 pb = F8::splat(p[r * ld + t]);
      for (int w = 0; w < W; ++w) acc[r][w] = fma(pb, vv[w], acc[r][w]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w].store(out + int64_t(r) * d + e + 8 * w);
}

template <int R>
void tile_products(const float* qp, int d, const float* kt, int64_t ld, float* s, const float* vb, int n,
                   float* out, bool scores) {
  if (scores) {
    int t = 0;
    for (; t + 16 <= ld; t += 16) score_tile<R, 2>(qp, d, kt, ld, t, s);
    if (t < ld) score_tile<R, 1>(qp, d, kt, ld, t, s);
  } else {
    int e = 0;
    for (; e + 16 <= d; e += 16) value_tile<R, 2>(s, ld, n, vb, d, e, out);
    if (e < d) value_tile<R, 1>(s, ld, n, vb, d, e, out);
  }
}

void tile_rows(const float* qp, int rows, int d, const float* kt, int64_t ld, float* s, const float* vb, int n,
               float* out, bool scores) {
  for (int r0 = 0; r0 < rows; r0 += 4) {
    const float* q = qp + int64_t(r0) * d;
    float* sr = s + r0 * ld;
    float* o = out + int64_t(r0) * d;
    switch (std::min(4, rows - r0)) {
      case 1: tile_products<1>(q, d, kt, ld, sr, vb, n, o, scores); break;
      case 2: tile_products<2>(q, d, kt, ld, sr, vb, n, o, scores); break;
      case 3: tile_products<3>(q, d, kt, ld, sr, vb, n, o, scores); break;
      default: tile_products<4>(q, d, kt, ld, sr, vb, n, o, scores); break;
    }
  }
}

}  // namespace

// Tokens [t0, t1) of one side (keys or values) as f32 rows of d: dequantized (permuted order) or
// widened from f16 (natural order).
static void widen_rows(const PackedRows& w, const uint16_t* h, int64_t stride, int d, int64_t t0, int64_t t1,
                       float* out) {
  if (h == nullptr) return dequantize_rows(w, d, t0, t1, out);
  for (int64_t t = t0; t < t1; ++t) {
    const uint16_t* row = h + t * stride;
    float* o = out + (t - t0) * d;
    for (int e = 0; e < d; e += 8) F8::load_half(row + e).store(o + e);
  }
}

void attend_tile(const float* qp, int rows, int rep, int d, const TileSource& src, int64_t t0, int64_t t1,
                 int64_t first_pos, float* m, float* l, float* out, float* scratch, float softcap) {
  const int n = int(t1 - t0);
  const int64_t ld = (n + 7) / 8 * 8;  // score row stride: whole vectors, padding masked below
  float* kt = scratch;                 // d x ld: K^T of the block (the keys' permuted order)
  float* rows_f = kt + int64_t(d) * ld;  // ld x d: widened rows (keys, then values)
  float* s = rows_f + ld * d;          // rows x ld scores, then probabilities
  widen_rows(src.k, src.hk, src.k_stride, d, t0, t1, rows_f);
  for (int t = 0; t < n; ++t)
    for (int e = 0; e < d; ++e) kt[int64_t(e) * ld + t] = rows_f[int64_t(t) * d + e];
  for (int e = 0; e < d; ++e)
    for (int64_t t = n; t < ld; ++t) kt[e * ld + t] = 0.0f;
  tile_rows(qp, rows, d, kt, ld, s, nullptr, n, out, true);
  for (int r = 0; r < rows; ++r) {
    // Row r sees the block up to its own position (causal), and never the padding.
    int64_t seen = first_pos < 0 ? n : std::min<int64_t>(n, first_pos + r / rep + 1 - t0);
    for (int64_t t = std::max<int64_t>(seen, 0); t < ld; ++t) s[r * ld + t] = -INFINITY;
  }
  softmax_rows(s, rows, int(ld), m, l, softcap);
  widen_rows(src.v, src.hv, src.v_stride, d, t0, t1, rows_f);
  tile_rows(nullptr, rows, d, nullptr, ld, s, rows_f, n, out, false);
}

void attend_block_channels(const float* q, int rows, int d, const PackedRows& kt, const PackedRows& v, int64_t t0,
                           int64_t t1, float* m, float* l, float* out, float* scratch, float softcap) {
  // A window's oldest visible token may sit inside its key group (a ring): the whole group is
  // scored, since its codes share one scale per channel, and the tokens before t0 are masked.
  const int64_t a0 = t0 / kt.group * kt.group;
  const int skip = int(t0 - a0);
  const int n = int(t1 - a0);
  float* s = scratch;
  float* wt = scratch + rows * int64_t(n);
  // After attend_block's own scratch (rows * (2n + d) + 2n), so both fit one allocation.
  float* cs = wt + int64_t(rows) * (n + d) + 2 * int64_t(n);
  const int64_t g0 = a0 / kt.group, g1 = t1 / kt.group;
  with_bits(kt.bits, [&](auto b) { channel_scores<decltype(b)::value>(q, rows, d, kt, g0, g1, s, n, cs); });
  for (int r = 0; r < rows && skip > 0; ++r) std::fill(s + int64_t(r) * n, s + int64_t(r) * n + skip, -INFINITY);
  softmax_rows(s, rows, n, m, l, softcap);
  weighted_values(s, rows, d, v, a0, n, out, wt);
}

void attend_float_block(const float* q, int rows, int d, const float* k, int64_t k_stride, const float* v,
                        int64_t v_stride, int n, int v_bits, float* m, float* l, float* out, float* scratch, float softcap) {
  float* s = scratch;  // rows x n
  float* nat = s + int64_t(rows) * n;  // d: one output row in natural order
  for (int r = 0; r < rows; ++r) {
    const float* qr = q + int64_t(r) * d;
    for (int t = 0; t < n; ++t) {
      const float* kt = k + t * k_stride;
      F8 acc = F8::zero();
      for (int e = 0; e < d; e += 8) acc = fma(F8::load(qr + e), F8::load(kt + e), acc);
      s[int64_t(r) * n + t] = acc.sum();
    }
  }
  softmax_rows(s, rows, n, m, l, softcap);
  for (int r = 0; r < rows; ++r) {
    for (int e = 0; e < d; e += 8) F8::zero().store(nat + e);
    for (int t = 0; t < n; ++t) {
      const F8 p = F8::splat(s[int64_t(r) * n + t]);
      const float* vt = v + t * v_stride;
      for (int e = 0; e < d; e += 8) fma(p, F8::load(vt + e), F8::load(nat + e)).store(nat + e);
    }
    permute(nat, d, v_bits, out + int64_t(r) * d);
  }
}

// A 16-bit dense cache is read where it lies: each token's key and value are widened once into
// a row of f32 (F16C), which every query row of the head then uses, so the cache is streamed
// once per step at half the bytes of an f32 one.
void attend_half_block(const float* q, int rows, int d, const uint16_t* k, int64_t k_stride, const uint16_t* v,
                       int64_t v_stride, int n, float* m, float* l, float* out, float* scratch, float softcap) {
  float* s = scratch;                        // rows x n scores, then probabilities
  float* acc = s + int64_t(rows) * n;        // rows x d outputs
  float* row = acc + int64_t(rows) * d;      // d: one widened token
  for (int t = 0; t < n; ++t) {
    const uint16_t* kt = k + t * k_stride;
    for (int e = 0; e < d; e += 8) F8::load_half(kt + e).store(row + e);
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + int64_t(r) * d;
      F8 a0 = F8::zero(), a1 = F8::zero();
      int e = 0;
      for (; e + 16 <= d; e += 16) {
        a0 = fma(F8::load(qr + e), F8::load(row + e), a0);
        a1 = fma(F8::load(qr + e + 8), F8::load(row + e + 8), a1);
      }
      if (e < d) a0 = fma(F8::load(qr + e), F8::load(row + e), a0);
      s[int64_t(r) * n + t] = (a0 + a1).sum();
    }
  }
  softmax_rows(s, rows, n, m, l, softcap);
  for (int64_t i = 0; i < int64_t(rows) * d; i += 8) F8::zero().store(acc + i);
  for (int t = 0; t < n; ++t) {
    const uint16_t* vt = v + t * v_stride;
    for (int e = 0; e < d; e += 8) F8::load_half(vt + e).store(row + e);
    for (int r = 0; r < rows; ++r) {
      const F8 p = F8::splat(s[int64_t(r) * n + t]);
      float* ar = acc + int64_t(r) * d;
      for (int e = 0; e < d; e += 8) fma(p, F8::load(row + e), F8::load(ar + e)).store(ar + e);
    }
  }
  std::copy(acc, acc + int64_t(rows) * d, out);
}

}  // namespace KV_NS
}  // namespace kvsplit

// Plain-pointer CPU kernels behind the primitives in ext.cpp. kernels.cpp is compiled once per
// instruction set (namespaces `avx2` and `generic`); ext.cpp picks one at run time.
#pragma once

#include <cstdint>

namespace kvsplit {

// A packed affine-quantized matrix: row r's codes start at `w + r * row_bytes`; its scale and
// bias for group g are at `(scales|biases)[r * sb_stride + g]`, as f32 or f16 bit patterns.
struct PackedRows {
  const uint8_t* w;
  int64_t row_bytes;
  const void* scales;
  const void* biases;
  int64_t sb_stride;
  bool f16;
  int group;
  int bits;
  // MXFP4 (OCP MX): 4-bit e2m1 codes in MLX's 4-bit packing, one e8m0 byte of scale per group
  // of 32 in `scales` (u8), no biases.
  bool mxfp4 = false;
};

// One head's keys and values as a prefill tile reads them: packed rows, or (hk and hv set) f16
// rows at the given strides (a 16-bit dense cache).
struct TileSource {
  PackedRows k, v;
  const uint16_t* hk = nullptr;
  const uint16_t* hv = nullptr;
  int64_t k_stride = 0, v_stride = 0;
};

// A packed unit is 8 lanes of codes. Bits 2, 4 and 8 give each lane one byte (8-byte units,
// 8/bits codes per lane); bits 3 and 6 give each lane one 3-byte pack of MLX's little-endian bit
// stream (24-byte units, 8 or 4 codes per lane). Phase j of a lane is its j-th code.
constexpr int phases_of(int bits) { return bits == 3 ? 8 : bits == 6 ? 4 : 8 / bits; }
constexpr int unit_bytes_of(int bits) { return bits == 3 || bits == 6 ? 24 : 8; }
constexpr int unit_elems_of(int bits) { return 8 * phases_of(bits); }

// The element order `PackedRows` codes unpack in: per unit, phase j of every lane first
// (see kernels.cpp). `permute` writes x in that order so dot products need no shuffles.
void permute(const float* x, int n, int bits, float* out);
void unpermute(const float* x, int n, int bits, float* out);

// Floats attend_block_channels needs for `rows` query rows over n = t1 - t0 tokens.
inline int64_t channel_scratch(int rows, int d, int64_t n) {
  return int64_t(rows) * (2 * n + 2 * d) + 2 * n + 2 * d + rows + 64;
}

// Floats attend_tile needs for `rows` query rows over n tokens of head_dim d.
inline int64_t tile_scratch(int rows, int d, int64_t n) {
  const int64_t ld = (n + 7) / 8 * 8;
  return 2 * int64_t(d) * ld + int64_t(rows) * ld;
}

// Floats attend_half_block needs for `rows` query rows over n tokens of head_dim d.
inline int64_t half_scratch(int rows, int d, int64_t n) { return int64_t(rows) * (n + d) + d; }

// Every attend_* takes `softcap`: 0 for plain scores, else each (scaled) score s becomes
// softcap * tanh(s / softcap) before the softmax (Gemma 2's attention logit soft-capping).
#define KVSPLIT_KERNELS(NS)                                                                 \
  namespace NS {                                                                             \
  /* y[m*ldy + r] = x_m . W_r for r in [r0, r1), m < rows. xp: permuted rows of x (K each), */ \
  /* xsum: per row, per group sums of x. */                                                  \
  void matvec(const float* xp, const float* xsum, int rows, int k, const PackedRows& w,      \
              int r0, int r1, float* y, int64_t ldy);                                         \
  /* Softmax-weighted sum over tokens [t0, t1) of one KV head for `rows` query rows (qp:     */ \
  /* permuted for the keys' bits, qsum: per-group sums). Writes the block's running max m,   */ \
  /* denominator l and unnormalized output (in the values' permuted order) per row; scratch */ \
  /* holds rows * (2 (t1 - t0) + d) + 2 (t1 - t0) floats. */                                                        \
  void attend_block(const float* qp, const float* qsum, int rows, int d, const PackedRows& k, \
                    const PackedRows& v, int64_t t0, int64_t t1, float* m, float* l,         \
                    float* out, float* scratch, float softcap);                                              \
  /* A prefill tile's rows (qp permuted for packed keys' bits, natural for f16 rows) over     */ \
  /* tokens [t0, t1): the block's keys and values widened to f32 once and multiplied in      */ \
  /* register tiles; with first_pos >= 0 row r sees tokens up to first_pos + r / rep. out in */ \
  /* the values' permuted order (natural for f16). scratch: tile_scratch floats. */            \
  void attend_tile(const float* qp, int rows, int rep, int d, const TileSource& src,           \
                   int64_t t0, int64_t t1, int64_t first_pos, float* m, float* l, float* out,   \
                   float* scratch, float softcap);                                                             \
  /* attend_block for per-channel keys: kt's row e is channel e of K^T (groups of kt.group  */ \
  /* tokens along the row; t1 a multiple of it, t0 anywhere: the tokens of t0's group before */ \
  /* it are masked), q the query rows in natural order. */                                    \
  /* scratch: channel_scratch floats. */                                                      \
  void attend_block_channels(const float* q, int rows, int d, const PackedRows& kt,           \
                             const PackedRows& v, int64_t t0, int64_t t1, float* m, float* l, \
                             float* out, float* scratch, float softcap);                                     \
  /* The same over float tokens: k and v rows t at k + t * k_stride, v + t * v_stride (d     */ \
  /* each); q natural; out in the permuted order of `v_bits` so it merges with packed blocks.*/ \
  /* scratch: rows * n + d floats. */                                                         \
  void attend_float_block(const float* q, int rows, int d, const float* k, int64_t k_stride, \
                          const float* v, int64_t v_stride, int n, int v_bits, float* m,      \
                          float* l, float* out, float* scratch, float softcap);                              \
  /* attend_float_block over f16 tokens (bit patterns), out in natural order. */              \
  /* scratch: half_scratch floats. */                                                         \
  void attend_half_block(const float* q, int rows, int d, const uint16_t* k, int64_t k_stride, \
                         const uint16_t* v, int64_t v_stride, int n, float* m, float* l,     \
                         float* out, float* scratch, float softcap);                                         \
  /* out[(r-r0)*k ..] = row r of W as f32 in the permuted order, for r in [r0, r1). */        \
  void dequantize_rows(const PackedRows& w, int k, int64_t r0, int64_t r1, float* out);      \
  }

KVSPLIT_KERNELS(avx2)
KVSPLIT_KERNELS(generic)

}  // namespace kvsplit

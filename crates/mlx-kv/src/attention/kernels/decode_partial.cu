// Split-precision decode attention, pass 1: one block per (token split, KV head); each of its
// WARPS warps walks 32-token tiles of the split.
//
// Scores: every lane owns one token of the tile and computes its dot products with all REP
// query rows from wide loads of its packed key row (queries in shared memory, read as
// broadcasts), so no per-token cross-lane reduction is needed. The key-group scale and bias
// are applied once per group: s = scale * sum(q * code) + bias * sum(q).
// Softmax: one warp max per tile and query row (not per token); each lane keeps a partial
// denominator that is summed once at the end.
// Values: LPT = D / VD lanes cover one token (each owns VD dims, loaded as one 2/4/8-byte
// word), TPW = 32 / LPT tokens per step; the value-group bias contributes p * bias to every
// dim of the group, so it is kept as one running sum per lane and query row.
// 3- and 6-bit codes (MLX packs them as a bit stream, 8 or 4 codes to 3 bytes): a key row is
// still whole u32 words per group, read as for 2/4/8 bits, with codes that straddle two words
// joined (kv_code_at); a lane's value bytes (3 or 6) start at any byte, so the lane loads the
// one or two aligned words that cover them and shifts them into place as they arrive (keeping
// the aligned window until use cost 32 more registers at 8 query rows, and spills).
// Output per (head, split, row): unnormalised o, running max m, denominator l; the merge
// kernel combines the splits.
// KV_STEP (a decode step, fused.rs `decode_step`): the block whose split holds the new token
// first quantizes it (`knew`, `vnew`, one row per KV head) the way MLX's affine quantize does
// and writes codes, scales and biases in place into slot pos[0] of the cache buffers; the
// block's own tile loads see those writes after the barrier below. T is pos[0] + 1, the
// capacity comes from the key buffer's shape, and splits are even slices of T over the grid
// (a trailing split may be empty). Queries are scaled by SCALE_BITS (an f32's bits) here.
// KV_ROT (with KV_STEP and KV_FOLD, fused.rs `decode_step` with a `StoredFrame`): the layer's
// Hadamard rotations (ROT bit 0 keys, bit 1 values) run here instead of as matmul ops around
// the launch: the new key and the query enter the keys' frame before the write and the tiles,
// the new value enters the values' frame, and the fold rotates the output back
// (decode_fold.cu); with KV_CENTER the cache's key center (`kc`, in the keys' frame) comes off
// the new key before it is quantized (a shift of every key by one vector moves every score of
// a query by the same amount, so the query needs no change).
// KV_PAGED (with KV_STEP, fused.rs `decode_step_paged`): one launch serves S sequences whose
// rows live in a block pool (`[NB, HKV, BLOCK, W]`); grid row bh is sequence bh / HKV, head
// bh % HKV. `table` row s holds T_s and then the pool blocks of the sequence's tokens, so
// lengths differ per sequence and no device position counter exists: each sequence splits its
// own T_s over the grid's splits, and splits past it are empty (m = -inf, l = 0).
constexpr int KW = D * BK / 32;   // u32 words per key row
constexpr int VW = D * BV / 32;
constexpr int KG = D / GK;        // key groups per row
constexpr int VG = D / GV;
constexpr int GKW = GK * BK / 32; // words per key group
constexpr int LPT = D / VD;
constexpr int TPW = 32 / LPT;
constexpr int VB = VD * BV / 8;   // bytes of value codes per lane and token
constexpr bool VPOW2 = (BV & (BV - 1)) == 0;
// Words a lane holds per token: 2/4/8 bits load one aligned 2-, 4- or 8-byte word; 3/6 bits
// load the aligned words that cover VB bytes and keep them shifted to the first (kv_load_bytes).
constexpr int VBW = VB >= 4 ? (VB + 3) / 4 : 1;
static_assert(32 % TPW == 0, "value steps must tile 32 tokens");
static_assert(VD * BV % 8 == 0 && (VPOW2 ? (VB == 2 || VB == 4 || VB == 8) : VB <= 8),
              "a lane's value codes are whole bytes, at most 8");

const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int split = blockIdx.x;
const int bh = blockIdx.y;
const int n_split = gridDim.x;
#ifndef KV_FOLD
#define KV_FOLD 0
#endif
#ifndef KV_MMA
#define KV_MMA 0
#endif
#ifndef KV_PAGED
#define KV_PAGED 0
#endif
#ifndef KV_ROT
#define KV_ROT 0
#endif
#ifndef KV_CENTER
#define KV_CENTER 0
#endif
static_assert(!KV_ROT || (KV_STEP && KV_FOLD && !KV_PAGED), "in-kernel rotation: the one-launch step");
static_assert(!KV_CENTER || KV_ROT, "the key center is taken off in the rotating step");
#if KV_FOLD
// One scratch output for the splits' partial results (fewer buffers for MLX to allocate).
float* const out_o = part;
float* const out_m = part + (size_t)gridDim.y * gridDim.x * REP * D;
float* const out_l = out_m + (size_t)gridDim.y * gridDim.x * REP;
#endif
// kv_row(t): the buffer row of token t of this block's head. Tile starts are multiples of 32
// (PER is) and a 32-token tile's rows are consecutive (in the pool too: BLOCK % 32 == 0), so
// tile code looks up its first row once and adds the token's offset: one table read per tile.
#if KV_PAGED
static_assert(KV_STEP && BLOCK % 32 == 0, "paged decode: a step, with whole tiles per block");
const int HKV = kw_shape[1];
const int32_t* const blocks = table + (size_t)(bh / HKV) * table_shape[1];
const int head = bh % HKV;
// T = 0 (a row the caller left empty) gives empty splits, no write and an undefined output.
const int T = blocks[0];
const int PER = max(32, ((T + n_split - 1) / n_split + 31) / 32 * 32);
auto kv_row = [&](int t) -> size_t {
  return ((size_t)blocks[1 + (unsigned)t / BLOCK] * HKV + head) * BLOCK + (unsigned)t % BLOCK;
};
#else
#if KV_STEP
const int T = pos[0] + 1;
const int CAP = kw_shape[2];
const int PER = ((T + n_split - 1) / n_split + 31) / 32 * 32;
#else
const int T = meta[0];
const int CAP = meta[1];
const int PER = meta[2];
#endif
auto kv_row = [&](int t) -> size_t { return (size_t)bh * CAP + t; };
#endif
const int t0 = split * PER;
const int t1 = min(T, t0 + PER);

__shared__ __align__(16) float q_s[REP * D];
__shared__ float qg_s[REP * KG];
__shared__ float sm_m[WARPS][REP];
__shared__ float sm_l[WARPS][REP];
__shared__ float sm_o[WARPS][REP][D];

#if KV_STEP
__shared__ unsigned char code_s[2][D];
if (T > 0 && split == (T - 1) / PER) {
  const size_t row = kv_row(T - 1);
#if KV_ROT
  // The new key and value enter the stored frame first (ROT bit 0: keys rotated, bit 1:
  // values; KV_CENTER: the key center `kc`, in that frame, taken off), in f32, staged in this
  // warp's slice of sm_o, which the block uses only at its end.
  if (warp < 2) {
    float* const x = &sm_o[warp][0][0];
    for (int i = lane; i < D; i += 32) x[i] = kv_to_float(warp == 0 ? knew[(size_t)bh * D + i] : vnew[(size_t)bh * D + i]);
    __syncwarp();
    if (warp == 0 ? (ROT & 1) : (ROT & 2)) kv_hadamard<D, false>(x, 1, lane, 32);
#if KV_CENTER
    if (warp == 0) {
      for (int i = lane; i < D; i += 32) x[i] -= kv_to_float(kc[(size_t)bh * D + i]);
      __syncwarp();
    }
#endif
    if (warp == 0) {
      kv_quantize_row<D, GK, BK>(x, const_cast<uint32_t*>(kw) + row * KW, const_cast<__half*>(ks) + row * KG,
                                 const_cast<__half*>(kb) + row * KG, code_s[0], lane);
    } else {
      kv_quantize_row<D, GV, BV>(x, const_cast<uint32_t*>(vw) + row * VW, const_cast<__half*>(vs) + row * VG,
                                 const_cast<__half*>(vb) + row * VG, code_s[1], lane);
    }
  }
#else
  if (warp == 0) {
    kv_quantize_row<D, GK, BK>(knew + (size_t)bh * D, const_cast<uint32_t*>(kw) + row * KW,
                               const_cast<__half*>(ks) + row * KG, const_cast<__half*>(kb) + row * KG, code_s[0], lane);
  } else if (warp == 1) {
    kv_quantize_row<D, GV, BV>(vnew + (size_t)bh * D, const_cast<uint32_t*>(vw) + row * VW,
                               const_cast<__half*>(vs) + row * VG, const_cast<__half*>(vb) + row * VG, code_s[1], lane);
  }
#endif
  __threadfence_block();
}
#endif
for (int i = threadIdx.x; i < REP * D; i += blockDim.x) {
  // The tensor-core variant scales scores instead: its query fragments are f16, and an f16
  // query times 1/sqrt(D) would round again.
  q_s[i] = kv_to_float(q[(size_t)bh * REP * D + i]) * (KV_MMA ? 1.f : __int_as_float(SCALE_BITS));
}
__syncthreads();
#if KV_ROT
// Keys rotated (ROT bit 0): the query enters their frame here (q H / sqrt(D), in f32).
if (ROT & 1) kv_hadamard<D, true>(q_s, REP, threadIdx.x, blockDim.x);
#endif
for (int i = threadIdx.x; i < REP * KG; i += blockDim.x) {
  const int r = i / KG, g = i % KG;
  float s = 0.f;
  for (int j = 0; j < GK; ++j) s += q_s[r * D + g * GK + j];
  qg_s[i] = s;
}
__syncthreads();

#if KV_MMA
// Tensor-core variant (fused.rs `mma_applies`: groups of 64, head_dim 64 or 128, at most 8 query
// rows, f16/bf16 queries). Per 32-token tile of a warp:
// - Scores: S^T (tokens x rows) = K codes (16 tokens x 16 dims per MMA) * Q^T, one m16n8k16
//   MMA per 16 dims, one accumulator per key group so that the group's scale and bias are
//   applied after: s = scale * dot(q, code) + bias * sum(q). Lane (g8, tg) of the MMA loads a
//   16-dim chunk of tokens g8 and g8 + 8 per group (one 16- or 8-byte load); the query
//   fragments follow the chunk's dim order (kv_key_dim) and stay in registers.
// - Softmax in f32 on the score fragments: a lane holds rows 2tg and 2tg + 1, the same rows
//   as its output fragments, so the running max and rescale need no exchange; p goes to
//   shared memory as f16 to turn (tokens x rows) into the value MMA's (rows x tokens) layout.
// - Values: O^T (dims x rows) += V^T (16 dims x 16 tokens) * P^T. Codes are dequantized to
//   f16 before the MMA (one f16 fma per pair: scale and bias vary along the token axis, which
//   the MMA sums over). Lane (g8, tg) owns 8 dims per group and tokens 2tg, 2tg+1, 2tg+8,
//   2tg+9 of each 16.
// Precision: keys' codes and the f16 queries are exact in f16 and the dots accumulate in f32;
// values are rounded to f16 (as a dense f16 cache stores them) and p to f16.
static_assert(GK == 64 && GV == 64 && D % 64 == 0 && D <= 128 && REP <= 8 && (BK == 4 || BK == 8) && VPOW2,
              "tensor-core variant: groups of 64, head_dim 64 or 128, at most 8 rows, 4/8-bit keys, 2/4/8-bit values");
constexpr int NG = D / 64;                 // key and value groups per row
constexpr int CW = BK / 2;                 // u32 words of a lane's 16-dim key chunk
constexpr int VCW = BV >= 4 ? BV / 4 : 1;  // u32 words of a lane's 8-dim value chunk
const int g8 = lane >> 2;
const int tg = lane & 3;
__shared__ __align__(16) unsigned short p_h[WARPS][8][40];

unsigned qf[NG][4][2];
#pragma unroll
for (int gi = 0; gi < NG; ++gi) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int p = 2 * j + h;
      const int base = g8 * D + gi * 64 + tg * 16;
      qf[gi][j][h] = g8 < REP ? kv_h2_pack(q_s[base + kv_key_dim<BK>(p, 0)], q_s[base + kv_key_dim<BK>(p, 1)]) : 0u;
    }
  }
}
float qsum[NG][2];
#pragma unroll
for (int gi = 0; gi < NG; ++gi) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) qsum[gi][rr] = 2 * tg + rr < REP ? qg_s[(2 * tg + rr) * KG + gi] : 0.f;
}
const float scale = __int_as_float(SCALE_BITS);
float o[NG * 4][4];
#pragma unroll
for (int i = 0; i < NG * 4; ++i) {
#pragma unroll
  for (int c = 0; c < 4; ++c) o[i][c] = 0.f;
}
float m2[2] = {-KV_INF, -KV_INF}, l2[2] = {0.f, 0.f};

// One tile's loads; `cur` is computed on while the next tile's loads are in flight (at 32K a
// warp walks only ~8 tiles, and without this every tile waited a full memory latency).
// Tokens past the split's end load nothing: zero codes, scales and biases (finite values,
// weight 0), so the tile after the last one is all zeros and touches no memory.
// A token's scales (and biases) for all NG groups are one 2- or 4-byte word, f16 group 0 in
// the low half: half the registers of one float each, which two tiles in flight need.
struct KvTile {
  unsigned kc[2][2][NG][CW];
  unsigned ksp[2][2], kbp[2][2];
  unsigned vc[2][4][NG][VCW];
  unsigned vsp[2][4], vbp[2][4];
};
auto load_sb = [&](const __half* p, size_t row) -> unsigned {
  if constexpr (NG == 2) {
    return reinterpret_cast<const unsigned*>(p)[row];
  } else {
    return __half_as_ushort(p[row]);
  }
};
auto load_tile = [&](KvTile& x, int base) {
  // A tile past the split's end reads no table entry either (it may lie past the sequence's).
  const size_t row0 = base < t1 ? kv_row(base) : 0;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int t = base + 16 * mt + g8 + 8 * hh;
      const size_t row = row0 + (t - base);
      x.ksp[mt][hh] = t < t1 ? load_sb(ks, row) : 0u;
      x.kbp[mt][hh] = t < t1 ? load_sb(kb, row) : 0u;
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        if (t < t1) {
          kv_load_words<CW>(kw + row * KW + (gi * 64 + tg * 16) * BK / 32, x.kc[mt][hh][gi]);
        } else {
#pragma unroll
          for (int w = 0; w < CW; ++w) x.kc[mt][hh][gi][w] = 0u;
        }
      }
    }
  }
#pragma unroll
  for (int ks2 = 0; ks2 < 2; ++ks2) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int t = base + 16 * ks2 + 2 * tg + (u & 1) + 8 * (u >> 1);
      const size_t row = row0 + (t - base);
      x.vsp[ks2][u] = t < t1 ? load_sb(vs, row) : 0u;
      x.vbp[ks2][u] = t < t1 ? load_sb(vb, row) : 0u;
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        if (t < t1) {
          if constexpr (BV == 2) {
            x.vc[ks2][u][gi][0] = reinterpret_cast<const unsigned short*>(vw + row * VW)[gi * 8 + g8];
          } else {
            kv_load_words<VCW>(vw + row * VW + (gi * 64 + g8 * 8) * BV / 32, x.vc[ks2][u][gi]);
          }
        } else {
#pragma unroll
          for (int w = 0; w < VCW; ++w) x.vc[ks2][u][gi][w] = 0u;
        }
      }
    }
  }
};
KvTile cur;
load_tile(cur, t0 + warp * 32);
for (int base = t0 + warp * 32; base < t1; base += WARPS * 32) {
  KvTile nxt;
  load_tile(nxt, base + WARPS * 32);
  const auto& kc = cur.kc;
  const auto& vc = cur.vc;

  // Scores: s[mt][c] is token 16 mt + g8 + 8 (c >> 1), row 2 tg + (c & 1).
  float s[2][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int c = 0; c < 4; ++c) s[mt][c] = 0.f;
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      float acc4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const unsigned a[4] = {kv_h2_unbias(kv_key_pair<BK>(kc[mt][0][gi], 2 * j)),
                               kv_h2_unbias(kv_key_pair<BK>(kc[mt][1][gi], 2 * j)),
                               kv_h2_unbias(kv_key_pair<BK>(kc[mt][0][gi], 2 * j + 1)),
                               kv_h2_unbias(kv_key_pair<BK>(kc[mt][1][gi], 2 * j + 1))};
        kv_mma(acc4, a, qf[gi][j][0], qf[gi][j][1]);
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float ksc = __half2float(__ushort_as_half((unsigned short)(cur.ksp[mt][c >> 1] >> (16 * gi))));
        const float kbi = __half2float(__ushort_as_half((unsigned short)(cur.kbp[mt][c >> 1] >> (16 * gi))));
        s[mt][c] += ksc * acc4[c] + kbi * qsum[gi][c & 1];
      }
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) s[mt][c] = base + 16 * mt + g8 + 8 * (c >> 1) < t1 ? s[mt][c] * scale : -KV_INF;
  }

  // Online softmax per row; the tile's first token is always valid, so the new max is finite.
  __syncwarp();
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float mx = fmaxf(fmaxf(s[0][rr], s[0][rr + 2]), fmaxf(s[1][rr], s[1][rr + 2]));
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float m_new = fmaxf(m2[rr], mx);
    const float alpha = __expf(m2[rr] - m_new);
    m2[rr] = m_new;
    float lsum = 0.f;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float p = __expf(s[mt][2 * hh + rr] - m_new);
        lsum += p;
        p_h[warp][2 * tg + rr][16 * mt + g8 + 8 * hh] = __half_as_ushort(__float2half_rn(p));
      }
    }
    l2[rr] = l2[rr] * alpha + lsum;
#pragma unroll
    for (int i = 0; i < NG * 4; ++i) {
      o[i][rr] *= alpha;
      o[i][rr + 2] *= alpha;
    }
  }
  __syncwarp();
  unsigned pb[2][2];
#pragma unroll
  for (int ks2 = 0; ks2 < 2; ++ks2) {
    pb[ks2][0] = *reinterpret_cast<const unsigned*>(&p_h[warp][g8][16 * ks2 + 2 * tg]);
    pb[ks2][1] = *reinterpret_cast<const unsigned*>(&p_h[warp][g8][16 * ks2 + 2 * tg + 8]);
  }

  // Values: o[4 gi + jj] holds dim 64 gi + 8 g8 + 2 jj (c 0, 1) and the next dim (c 2, 3).
#pragma unroll
  for (int ks2 = 0; ks2 < 2; ++ks2) {
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      // Group gi's scales (biases) of two tokens as one f16 pair.
      const unsigned sel = gi == 0 ? 0x5410 : 0x7632;
      const unsigned sab = __byte_perm(cur.vsp[ks2][0], cur.vsp[ks2][1], sel);
      const unsigned bab = __byte_perm(cur.vbp[ks2][0], cur.vbp[ks2][1], sel);
      const unsigned scd = __byte_perm(cur.vsp[ks2][2], cur.vsp[ks2][3], sel);
      const unsigned bcd = __byte_perm(cur.vbp[ks2][2], cur.vbp[ks2][3], sel);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const unsigned a[4] = {
            kv_h2_fma(kv_h2_unbias(kv_val_pair<BV>(vc[ks2][0][gi], vc[ks2][1][gi], 2 * jj)), sab, bab),
            kv_h2_fma(kv_h2_unbias(kv_val_pair<BV>(vc[ks2][0][gi], vc[ks2][1][gi], 2 * jj + 1)), sab, bab),
            kv_h2_fma(kv_h2_unbias(kv_val_pair<BV>(vc[ks2][2][gi], vc[ks2][3][gi], 2 * jj)), scd, bcd),
            kv_h2_fma(kv_h2_unbias(kv_val_pair<BV>(vc[ks2][2][gi], vc[ks2][3][gi], 2 * jj + 1)), scd, bcd)};
        kv_mma(o[gi * 4 + jj], a, pb[ks2][0], pb[ks2][1]);
      }
    }
  }
  cur = nxt;
}

// Per warp: the rows' denominators summed over the lanes that share tg; every (dim, row) of
// the output has one owner lane.
#pragma unroll
for (int rr = 0; rr < 2; ++rr) {
  float lw = l2[rr];
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) lw += __shfl_xor_sync(0xffffffffu, lw, off);
  const int r = 2 * tg + rr;
  if (r < REP) {
    if (g8 == 0) { sm_m[warp][r] = m2[rr]; sm_l[warp][r] = lw; }
#pragma unroll
    for (int i = 0; i < NG * 4; ++i) {
      const int d = (i >> 2) * 64 + g8 * 8 + 2 * (i & 3);
      sm_o[warp][r][d] = o[i][rr];
      sm_o[warp][r][d + 1] = o[i][rr + 2];
    }
  }
}
#else
__shared__ float p_s[WARPS][REP][32];
const int sub = lane / LPT;      // which token of a value step this lane reads
const int d0 = (lane % LPT) * VD;

float m[REP], l[REP], accb[REP], acc[REP][VD];
#pragma unroll
for (int r = 0; r < REP; ++r) {
  m[r] = -KV_INF; l[r] = 0.f; accb[r] = 0.f;
#pragma unroll
  for (int i = 0; i < VD; ++i) acc[r][i] = 0.f;
}

constexpr int NV = 32 / TPW;   // value steps per tile
for (int base = t0 + warp * 32; base < t1; base += WARPS * 32) {
  const int t = base + lane;
  const bool valid = t < t1;
  const int nt = min(32, t1 - base);
  const size_t row0 = kv_row(base);
  // Issue every load of the tile before any arithmetic: keys (this lane's token) and values
  // (this lane's dim slice of NV tokens), so one memory latency is paid per tile, not one per
  // value step.
  unsigned kwv[KW];
  float ksc[KG], kbi[KG];
  if (valid) {
    const size_t row = row0 + lane;
    kv_load_words<KW>(kw + row * KW, kwv);
#pragma unroll
    for (int g = 0; g < KG; ++g) {
      ksc[g] = __half2float(ks[row * KG + g]);
      kbi[g] = __half2float(kb[row * KG + g]);
    }
  }
  unsigned vwv[NV][VBW];
  float vsc[NV], vbi[NV];
  kv_load_value_tile<D, BV, GV, VD, VBW>(vw, vs, vb, row0, nt, sub, d0, vwv, vsc, vbi);
  float s[REP];
#pragma unroll
  for (int r = 0; r < REP; ++r) s[r] = valid ? 0.f : -KV_INF;
  if (valid) {
#pragma unroll
    for (int g = 0; g < KG; ++g) {
      float dot[REP];
#pragma unroll
      for (int r = 0; r < REP; ++r) dot[r] = 0.f;
#pragma unroll
      for (int j = 0; j < GK; ++j) {
        const float c = kv_code_at<BK>(kwv + g * GKW, j);
#pragma unroll
        for (int r = 0; r < REP; ++r) dot[r] = fmaf(q_s[r * D + g * GK + j], c, dot[r]);
      }
#pragma unroll
      for (int r = 0; r < REP; ++r) s[r] += ksc[g] * dot[r] + kbi[g] * qg_s[r * KG + g];
    }
  }
  __syncwarp();
  kv_softmax_tile<REP, VD>(s, valid, m, l, accb, acc, p_s[warp], lane);
  __syncwarp();
  // Tokens past the split's end were not loaded (their codes and scale are 0) and their p is 0.
  kv_accumulate_values<D, BV, REP, VD, VBW>(p_s[warp], vwv, vsc, vbi, sub, accb, acc);
}

kv_warp_finish<D, REP, VD>(m, l, accb, acc, lane, sm_m[warp], sm_l[warp], sm_o[warp]);
#endif
__syncthreads();
kv_block_finish<D, REP, WARPS>(sm_m, sm_l, sm_o, ((size_t)bh * n_split + split) * REP, out_o, out_m, out_l);
// The fold (KV_FOLD) follows in decode_fold.cu, appended to this source by fused.rs.

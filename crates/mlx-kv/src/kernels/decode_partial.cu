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
// Output per (head, split, row): unnormalised o, running max m, denominator l; the merge
// kernel combines the splits.
// KV_STEP (a decode step, fused.rs `decode_step`): the block whose split holds the new token
// first quantizes it (`knew`, `vnew`, one row per KV head) the way MLX's affine quantize does
// and writes codes, scales and biases in place into slot pos[0] of the cache buffers; the
// block's own tile loads see those writes after the barrier below. T is pos[0] + 1, the
// capacity comes from the key buffer's shape, and splits are even slices of T over the grid
// (a trailing split may be empty). Queries are scaled by SCALE_BITS (an f32's bits) here.
constexpr int KW = D * BK / 32;   // u32 words per key row
constexpr int VW = D * BV / 32;
constexpr int KG = D / GK;        // key groups per row
constexpr int VG = D / GV;
constexpr int GKW = GK * BK / 32; // words per key group
constexpr int LPT = D / VD;
constexpr int TPW = 32 / LPT;
constexpr int VB = VD * BV / 8;   // bytes of value codes per lane and token
constexpr int VBW = VB >= 4 ? VB / 4 : 1;
static_assert(32 % TPW == 0, "value steps must tile 32 tokens");

const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int split = blockIdx.x;
const int bh = blockIdx.y;
const int n_split = gridDim.x;
#ifndef KV_FOLD
#define KV_FOLD 0
#endif
#if KV_FOLD
// One scratch output for the splits' partial results (fewer buffers for MLX to allocate).
float* const out_o = part;
float* const out_m = part + (size_t)gridDim.y * gridDim.x * REP * D;
float* const out_l = out_m + (size_t)gridDim.y * gridDim.x * REP;
#endif
#if KV_STEP
const int T = pos[0] + 1;
const int CAP = kw_shape[2];
const int PER = ((T + n_split - 1) / n_split + 31) / 32 * 32;
#else
const int T = meta[0];
const int CAP = meta[1];
const int PER = meta[2];
#endif
const int t0 = split * PER;
const int t1 = min(T, t0 + PER);

__shared__ __align__(16) float q_s[REP * D];
__shared__ float qg_s[REP * KG];
__shared__ float p_s[WARPS][REP][32];
__shared__ float sm_m[WARPS][REP];
__shared__ float sm_l[WARPS][REP];
__shared__ float sm_o[WARPS][REP][D];

#if KV_STEP
__shared__ unsigned char code_s[2][D];
if (split == (T - 1) / PER) {
  const size_t row = (size_t)bh * CAP + (T - 1);
  if (warp == 0) {
    kv_quantize_row<D, GK, BK>(knew + (size_t)bh * D, const_cast<uint32_t*>(kw) + row * KW,
                               const_cast<__half*>(ks) + row * KG, const_cast<__half*>(kb) + row * KG, code_s[0], lane);
  } else if (warp == 1) {
    kv_quantize_row<D, GV, BV>(vnew + (size_t)bh * D, const_cast<uint32_t*>(vw) + row * VW,
                               const_cast<__half*>(vs) + row * VG, const_cast<__half*>(vb) + row * VG, code_s[1], lane);
  }
  __threadfence_block();
}
#endif
for (int i = threadIdx.x; i < REP * D; i += blockDim.x) {
  q_s[i] = kv_to_float(q[(size_t)bh * REP * D + i]) * __int_as_float(SCALE_BITS);
}
__syncthreads();
for (int i = threadIdx.x; i < REP * KG; i += blockDim.x) {
  const int r = i / KG, g = i % KG;
  float s = 0.f;
  for (int j = 0; j < GK; ++j) s += q_s[r * D + g * GK + j];
  qg_s[i] = s;
}
__syncthreads();

const int sub = lane / LPT;      // which token of a value step this lane reads
const int d0 = (lane % LPT) * VD;
const int vgrp = d0 / GV;

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
  // Issue every load of the tile before any arithmetic: keys (this lane's token) and values
  // (this lane's dim slice of NV tokens), so one memory latency is paid per tile, not one per
  // value step.
  unsigned kwv[KW];
  float ksc[KG], kbi[KG];
  if (valid) {
    const size_t row = (size_t)bh * CAP + t;
    kv_load_words<KW>(kw + row * KW, kwv);
#pragma unroll
    for (int g = 0; g < KG; ++g) {
      ksc[g] = __half2float(ks[row * KG + g]);
      kbi[g] = __half2float(kb[row * KG + g]);
    }
  }
  unsigned vwv[NV][VBW];
  float vsc[NV], vbi[NV];
#pragma unroll
  for (int n = 0; n < NV; ++n) {
    const int tt = sub + n * TPW;
    vsc[n] = 0.f; vbi[n] = 0.f;
#pragma unroll
    for (int w = 0; w < VBW; ++w) vwv[n][w] = 0u;
    if (tt < nt) {
      const size_t row = (size_t)bh * CAP + base + tt;
      const unsigned char* vrow = reinterpret_cast<const unsigned char*>(vw + row * VW) + (d0 * BV / 8);
      if constexpr (VB == 8) {
        const uint2 x = *reinterpret_cast<const uint2*>(vrow);
        vwv[n][0] = x.x; vwv[n][VBW - 1] = x.y;
      } else if constexpr (VB == 4) {
        vwv[n][0] = *reinterpret_cast<const unsigned*>(vrow);
      } else {
        vwv[n][0] = *reinterpret_cast<const unsigned short*>(vrow);
      }
      vsc[n] = __half2float(vs[row * VG + vgrp]);
      vbi[n] = __half2float(vb[row * VG + vgrp]);
    }
  }
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
      for (int w = 0; w < GKW; ++w) {
#pragma unroll
        for (int e = 0; e < 32 / BK; ++e) {
          const float c = kv_code<BK>(kwv[g * GKW + w], e);
          const int j = g * GK + w * (32 / BK) + e;
#pragma unroll
          for (int r = 0; r < REP; ++r) dot[r] = fmaf(q_s[r * D + j], c, dot[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < REP; ++r) s[r] += ksc[g] * dot[r] + kbi[g] * qg_s[r * KG + g];
    }
  }
  __syncwarp();
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    const float m_new = fmaxf(m[r], kv_warp_max(s[r]));
    const float alpha = __expf(m[r] - m_new);
    const float p = valid ? __expf(s[r] - m_new) : 0.f;
    l[r] = l[r] * alpha + p;
    accb[r] *= alpha;
#pragma unroll
    for (int i = 0; i < VD; ++i) acc[r][i] *= alpha;
    p_s[warp][r][lane] = p;
    m[r] = m_new;
  }
  __syncwarp();
  // Tokens past the split's end were not loaded (their codes and scale are 0) and their p is 0.
#pragma unroll
  for (int n = 0; n < NV; ++n) {
    const int tt = sub + n * TPW;
#pragma unroll
    for (int r = 0; r < REP; ++r) {
      const float p = p_s[warp][r][tt];
      const float ps = p * vsc[n];
      accb[r] = fmaf(p, vbi[n], accb[r]);
#pragma unroll
      for (int i = 0; i < VD; ++i) {
        acc[r][i] = fmaf(ps, kv_code<BV>(vwv[n][(i * BV) >> 5], ((i * BV) & 31) / BV), acc[r][i]);
      }
    }
  }
}

// Per warp: sum the lanes' denominators, and the value sums of lanes that own the same dims.
#pragma unroll
for (int r = 0; r < REP; ++r) {
  const float lw = kv_warp_sum(l[r]);
#pragma unroll
  for (int i = 0; i < VD; ++i) {
    float a = acc[r][i] + accb[r];
#pragma unroll
    for (int off = LPT; off < 32; off <<= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
    if (sub == 0) sm_o[warp][r][d0 + i] = a;
  }
  if (lane == 0) { sm_m[warp][r] = m[r]; sm_l[warp][r] = lw; }
}
__syncthreads();
// Per block: merge the warps (a warp that saw no token has m = -inf and weight 0).
for (int i = threadIdx.x; i < REP * D; i += blockDim.x) {
  const int r = i / D, d = i % D;
  float M = -KV_INF;
  for (int w = 0; w < WARPS; ++w) M = fmaxf(M, sm_m[w][r]);
  float L = 0.f, O = 0.f;
  if (M > -KV_INF) {
    for (int w = 0; w < WARPS; ++w) {
      const float c = sm_m[w][r] > -KV_INF ? __expf(sm_m[w][r] - M) : 0.f;
      L += sm_l[w][r] * c;
      O += sm_o[w][r][d] * c;
    }
  }
  const size_t o = ((size_t)bh * n_split + split) * REP + r;
  out_o[o * D + d] = O;
  if (d == 0) { out_m[o] = M; out_l[o] = L; }
}

#if KV_FOLD
// The merge folded into this launch (fused.rs `decode_step` with fold): the last block of a
// head to finish (an arrival counter per head in pos[1 + bh]) merges that head's splits as
// decode_merge.cu does and writes `out` in the query dtype; the last head to be merged resets
// the counters and advances pos[0] (every block has read it by then). Other blocks' partial
// results are read through L2 (__ldcg) after the fences. Split weights are staged in sm_o,
// free once the block's own warps are merged, so at most WARPS * D splits.
{
  __shared__ int kv_last;
  __shared__ float kv_l[REP];
  int32_t* ctr = const_cast<int32_t*>(pos);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) kv_last = atomicAdd(&ctr[1 + bh], 1) == n_split - 1;
  __syncthreads();
  if (kv_last) {
    __threadfence();
    constexpr int MAXS = WARPS * D;
    float* c_s = &sm_o[0][0][0];
    for (int r = warp; r < REP; r += WARPS) {
      float mx = -KV_INF;
      for (int s2 = lane; s2 < n_split; s2 += 32) {
        const float ms = __ldcg(&out_m[((size_t)bh * n_split + s2) * REP + r]);
        c_s[r * MAXS + s2] = ms;
        mx = fmaxf(mx, ms);
      }
      mx = kv_warp_max(mx);
      float ls = 0.f;
      for (int s2 = lane; s2 < n_split; s2 += 32) {
        const float c = c_s[r * MAXS + s2] > -KV_INF ? __expf(c_s[r * MAXS + s2] - mx) : 0.f;
        c_s[r * MAXS + s2] = c;
        ls += __ldcg(&out_l[((size_t)bh * n_split + s2) * REP + r]) * c;
      }
      ls = kv_warp_sum(ls);
      if (lane == 0) kv_l[r] = ls;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < REP * D; i += blockDim.x) {
      const int r = i / D, dd = i % D;
      float o = 0.f;
#pragma unroll 8
      for (int s2 = 0; s2 < n_split; ++s2) {
        o += __ldcg(&out_o[(((size_t)bh * n_split + s2) * REP + r) * D + dd]) * c_s[r * MAXS + s2];
      }
      out[((size_t)bh * REP + r) * D + dd] = kv_from_float<OT>(o / kv_l[r]);
    }
    if (threadIdx.x == 0) {
      ctr[1 + bh] = 0;
      __threadfence();
      if (atomicAdd(&ctr[1023], 1) == (int)gridDim.y - 1) {
        ctr[1023] = 0;
        ctr[0] += 1;
      }
    }
  }
}
#endif

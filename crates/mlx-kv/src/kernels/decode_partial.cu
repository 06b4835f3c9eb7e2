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
constexpr int KW = D * BK / 32;   // u32 words per key row
constexpr int VW = D * BV / 32;
constexpr int KG = D / GK;        // key groups per row
constexpr int VG = D / GV;
constexpr int GKW = GK * BK / 32; // words per key group
constexpr int LPT = D / VD;
constexpr int TPW = 32 / LPT;
constexpr int VB = VD * BV / 8;   // bytes of value codes per lane and token
constexpr int VBW = VB >= 4 ? VB / 4 : 1;

const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int split = blockIdx.x;
const int bh = blockIdx.y;
const int n_split = gridDim.x;
const int T = meta[0];
const int CAP = meta[1];
const int PER = meta[2];
const int t0 = split * PER;
const int t1 = min(T, t0 + PER);

__shared__ __align__(16) float q_s[REP * D];
__shared__ float qg_s[REP * KG];
__shared__ float p_s[WARPS][REP][32];
__shared__ float sm_m[WARPS][REP];
__shared__ float sm_l[WARPS][REP];
__shared__ float sm_o[WARPS][REP][D];

for (int i = threadIdx.x; i < REP * D; i += blockDim.x) {
  q_s[i] = kv_to_float(q[(size_t)bh * REP * D + i]);
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

for (int base = t0 + warp * 32; base < t1; base += WARPS * 32) {
  const int t = base + lane;
  const bool valid = t < t1;
  float s[REP];
#pragma unroll
  for (int r = 0; r < REP; ++r) s[r] = -KV_INF;
  if (valid) {
    const size_t row = (size_t)bh * CAP + t;
    unsigned kwv[KW];
    kv_load_words<KW>(kw + row * KW, kwv);
#pragma unroll
    for (int r = 0; r < REP; ++r) s[r] = 0.f;
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
      const float sc = __half2float(ks[row * KG + g]);
      const float bi = __half2float(kb[row * KG + g]);
#pragma unroll
      for (int r = 0; r < REP; ++r) s[r] += sc * dot[r] + bi * qg_s[r * KG + g];
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
  const int nt = min(32, t1 - base);
  for (int tt = sub; tt < nt; tt += TPW) {
    const size_t row = (size_t)bh * CAP + base + tt;
    const unsigned char* vrow = reinterpret_cast<const unsigned char*>(vw + row * VW) + (d0 * BV / 8);
    unsigned vwv[VBW];
    if constexpr (VB == 8) {
      const uint2 x = *reinterpret_cast<const uint2*>(vrow);
      vwv[0] = x.x; vwv[VBW - 1] = x.y;
    } else if constexpr (VB == 4) {
      vwv[0] = *reinterpret_cast<const unsigned*>(vrow);
    } else {
      vwv[0] = *reinterpret_cast<const unsigned short*>(vrow);
    }
    const float sc = __half2float(vs[row * VG + vgrp]);
    const float bi = __half2float(vb[row * VG + vgrp]);
#pragma unroll
    for (int r = 0; r < REP; ++r) {
      const float p = p_s[warp][r][tt];
      const float ps = p * sc;
      accb[r] = fmaf(p, bi, accb[r]);
#pragma unroll
      for (int i = 0; i < VD; ++i) {
        acc[r][i] = fmaf(ps, kv_code<BV>(vwv[(i * BV) >> 5], ((i * BV) & 31) / BV), acc[r][i]);
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

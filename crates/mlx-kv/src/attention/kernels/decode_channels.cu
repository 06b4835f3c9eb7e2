// Split-precision decode attention, pass 1, for per-channel keys (KIVI-style, fused.rs
// `attend_channels`): one block per (token split, KV head), WARPS warps each walking 32-token
// tiles of the split, as decode_partial.cu's CUDA-core variant does; its merge pass
// (decode_merge.cu) finishes the job.
//
// Keys: the body's codes run along tokens, one row per channel (`kw` [BH, D, KWR] u32, MLX's
// bit stream per row, so a 32-token tile of one channel is BK consecutive words), with one
// scale and bias per channel and group of GK tokens (`ks`, `kb` [BH, D, KGR]). GK is a multiple
// of 32 and tiles start at multiples of 32, so a tile lies in one key group and its score is
//   s[t] = sum_d (q[d] * scale[d]) * code[d, t] + sum_d q[d] * bias[d]:
// per tile, the warp folds the group's scales into the query once (qk_s, D * REP products) and
// sums q * bias once; then each lane owns one token and walks the channels. Every step of that
// walk is one warp load of the channel's BK words for the tile (one 32-byte sector at most:
// the lanes read adjacent codes of one row), so loads are contiguous without staging.
// Tail: tokens [TB, T) are the cache's newest ones, not yet a whole key group, in float
// (`tk`, `tv` [BH, NT, D]); their tiles take plain dot products and plain value sums in the
// same online softmax. TB is a multiple of GK, so no tile mixes body and tail.
// Values stay per token and are read exactly as decode_partial.cu reads them (LPT lanes per
// token, VD dims each, the group bias kept as one running sum): the value loads, the online
// softmax and the warp and block merges are decode_common.cuh's CUDA-core pass functions.
// KV_CSTEP (fused.rs `step_channels`): a decode step; the block whose split holds the new token
// writes it into the tail buffers first (rotated when ROT says so), T and TB come from `pos`,
// and with KV_FOLD the merge follows in the same launch (decode_fold.cu).
constexpr int LPT = D / VD;
constexpr int TPW = 32 / LPT;
constexpr int NV = 32 / TPW;       // value steps per tile
constexpr int VB = VD * BV / 8;    // bytes of value codes per lane and token
constexpr bool KPOW2 = (BK & (BK - 1)) == 0;
constexpr int VBW = VB >= 4 ? (VB + 3) / 4 : 1;
constexpr int CH = D < 32 ? D : 32; // channels whose loads are issued together (one latency each)
static_assert(GK % 32 == 0, "a 32-token tile lies in one key group");
static_assert(D % CH == 0 && 32 % TPW == 0, "whole channel chunks and value steps");

const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int split = blockIdx.x;
const int bh = blockIdx.y;
const int n_split = gridDim.x;
#ifndef KV_FOLD
#define KV_FOLD 0
#endif
#ifndef KV_PAGED
#define KV_PAGED 0
#endif
#ifndef KV_CSTEP
#define KV_CSTEP 0
#endif
// The fold's output rotation (decode_fold.cu) reads ROT, which every step variant is given.
#define KV_ROT KV_CSTEP
#if KV_FOLD
// One scratch output for the splits' partial results (as decode_partial.cu's fold).
float* const out_o = part;
float* const out_m = part + (size_t)gridDim.y * gridDim.x * REP * D;
float* const out_l = out_m + (size_t)gridDim.y * gridDim.x * REP;
#endif
#if KV_CSTEP
// The decode step (fused.rs `step_channels`): `tk`, `tv` are the cache's whole tail buffers
// (capacity NT rows per head, read in place: no contiguity copy), pos[0] the tail row of the
// new token and pos[1022] the body's tokens. The token's K and V rows are written into the
// tail in its dtype (TT; the same rounding as MLX's astype) by the block that reads them.
const int NEW = pos[0];
const int TB = pos[1022];
const int T = TB + NEW + 1;
const int PER = ((T + n_split - 1) / n_split + 31) / 32 * 32;
#else
const int T = meta[0];
const int PER = meta[2];
const int TB = meta[4];
#endif
const int KWR = kw_shape[3];   // words per channel row: the key buffer's capacity * BK / 32
const int KGR = ks_shape[3];   // key groups per channel row
const int VCAP = vw_shape[2];
const int NT = tk_shape[2];
const int t0 = split * PER;
const int t1 = min(T, t0 + PER);

__shared__ __align__(16) float q_s[REP * D];
__shared__ float p_s[WARPS][REP][32];
__shared__ float sm_m[WARPS][REP];
__shared__ float sm_l[WARPS][REP];
__shared__ float sm_o[WARPS][REP][D];
// A warp's query times its tile's key scales, per channel. It shares sm_o's storage: each warp
// uses only its own slice, qk_s inside its tile loop and sm_o after it (static shared memory
// is capped at 48 KB, which D = 256 with 8 rows would pass with both).
float (*const qk_s)[D] = sm_o[warp];
// Staged key words per warp (one tile: BK words for each of D channels), where they fit beside
// the other shared arrays under the 48 KB static cap and in KSL registers a lane; else
// the chunked walk reads them straight from memory.
constexpr int KSL = D * BK / 32;
constexpr bool KSTAGE = KSL <= 24 && (WARPS * D * BK + REP * D + WARPS * REP * (34 + D)) * 4 <= 44 * 1024;
__shared__ uint32_t k_st[KSTAGE ? WARPS : 1][KSTAGE ? D * BK : 1];

#if KV_CSTEP
if (split == (T - 1) / PER && warp < 2) {
  const size_t row = ((size_t)bh * NT + NEW) * D;
  TT* const dst = const_cast<TT*>(warp == 0 ? tk : tv) + row;
  // ROT bit 0: keys rotated (the new key enters the stored frame here), bit 1: values. The row
  // is staged in this warp's slice of sm_o, which the tiles use only after the barrier below.
  float* const x = &sm_o[warp][0][0];
  for (int i = lane; i < D; i += 32) x[i] = kv_to_float(warp == 0 ? knew[(size_t)bh * D + i] : vnew[(size_t)bh * D + i]);
  __syncwarp();
  if (warp == 0 ? (ROT & 1) : (ROT & 2)) kv_hadamard<D, false>(x, 1, lane, 32);
  for (int i = lane; i < D; i += 32) dst[i] = kv_from_float<TT>(x[i]);
  __threadfence_block();
}
#endif
// The query scale is applied here (SCALE_BITS, an f32's bits), not by an op before the launch.
for (int i = threadIdx.x; i < REP * D; i += blockDim.x) q_s[i] = kv_to_float(q[(size_t)bh * REP * D + i]) * __int_as_float(SCALE_BITS);
#if KV_CSTEP
// Keys rotated (ROT bit 0): the query enters the stored frame here (q H / sqrt(D), in f32).
if (ROT & 1) {
  __syncthreads();
  kv_hadamard<D, true>(q_s, REP, threadIdx.x, blockDim.x);
}
#endif
__syncthreads();

const int sub = lane / LPT;      // which token of a value step this lane reads
const int d0 = (lane % LPT) * VD;
// This lane's code in a channel's words of a tile: bit lane * BK of the BK words.
const int kwi = lane * BK / 32;
const int ksh = lane * BK % 32;

float m[REP], l[REP], accb[REP], acc[REP][VD];
#pragma unroll
for (int r = 0; r < REP; ++r) {
  m[r] = -KV_INF; l[r] = 0.f; accb[r] = 0.f;
#pragma unroll
  for (int i = 0; i < VD; ++i) acc[r][i] = 0.f;
}

// Sink tokens (NS, a template int; `--kv-sinks`): float rows `sk`, `sv` [BH, NS, D] kept out of
// the body because the first token's outlier key channels would set the range of its whole
// key group. They sit outside [0, T), so the body's tiles keep their group alignment; they are
// one more float tile (0 < NS <= 32), read by the warp with the fewest tiles of the last split:
// at 4K tokens over few heads every warp has one tile, so a warp that read two would double
// the launch's critical path (the last split is usually short, leaving that warp idle).
static_assert(NS >= 0 && NS <= 32, "sink tokens fit one tile");
const int sink_split = (T - 1) / PER;
const int sink_warp = ((T - sink_split * PER + 31) / 32) % WARPS;
if (NS > 0 && split == sink_split && warp == sink_warp) {
  kv_float_tile<D, REP, VD, CH>(sk, sv, (size_t)bh * NS, NS, q_s, m, l, accb, acc, p_s[warp], lane);
  __syncwarp();
}

for (int base = t0 + warp * 32; base < t1; base += WARPS * 32) {
  const int t = base + lane;
  const bool valid = t < t1;
  const int nt = min(32, t1 - base);
  const bool body = base < TB;
  float s[REP];
  if (body) {
    // Value loads first (as decode_partial.cu), so their latency overlaps the key walk.
    const size_t row0 = (size_t)bh * VCAP + base;
    unsigned vwv[NV][VBW];
    float vsc[NV], vbi[NV];
    kv_load_value_tile<D, BV, GV, VD, VBW>(vw, vs, vb, row0, nt, sub, d0, vwv, vsc, vbi);
    const int g = base / GK;
    const uint32_t* kt = kw + (size_t)bh * D * KWR + (size_t)base * BK / 32;
    // Staged: the tile's key words of every channel (BK per channel) are loaded into registers
    // now, beside the value loads and before the scale loads, so the tile waits on one memory
    // round trip instead of three (scales, then two chunks of channels); a 4K-token decode over
    // few KV heads gives each warp one tile, so that chain was the launch's critical path.
    uint32_t kst[KSTAGE ? KSL : 1];
    if constexpr (KSTAGE) {
#pragma unroll
      for (int j = 0; j < KSL; ++j) {
        const int i = lane + 32 * j;
        kst[j] = kt[(size_t)(i / BK) * KWR + i % BK];
      }
    }
    // The tile's key group folded into the query: qk_s[r][d] = q[r][d] * scale[d], and
    // s starts from sum_d q[r][d] * bias[d] (lanes own every 32nd channel).
#pragma unroll
    for (int r = 0; r < REP; ++r) s[r] = 0.f;
    for (int d = lane; d < D; d += 32) {
      const size_t at = ((size_t)bh * D + d) * KGR + g;
      const float sc = __half2float(ks[at]), bi = __half2float(kb[at]);
#pragma unroll
      for (int r = 0; r < REP; ++r) {
        qk_s[r][d] = q_s[r * D + d] * sc;
        s[r] = fmaf(q_s[r * D + d], bi, s[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < REP; ++r) s[r] = kv_warp_sum(s[r]);
    if constexpr (KSTAGE) {
#pragma unroll
      for (int j = 0; j < KSL; ++j) k_st[warp][lane + 32 * j] = kst[j];
      __syncwarp();
#pragma unroll 8
      for (int c = 0; c < D; ++c) {
        const uint32_t* w = &k_st[warp][c * BK];
        const unsigned lo = w[kwi];
        const unsigned hi = !KPOW2 && ksh + BK > 32 ? w[kwi + 1] : 0u;
        const float code = KPOW2 ? kv_code<BK>(lo, ksh / BK)
                                 : __uint_as_float((__funnelshift_r(lo, hi, ksh) & ((1u << BK) - 1u)) | 0x4b000000u) - 8388608.f;
#pragma unroll
        for (int r = 0; r < REP; ++r) s[r] = fmaf(qk_s[r][c], code, s[r]);
      }
    } else {
    __syncwarp();
#pragma unroll 1
    for (int c0 = 0; c0 < D; c0 += CH) {
      unsigned lo[CH], hi[CH];
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        const uint32_t* w = kt + (size_t)(c0 + c) * KWR;
        lo[c] = w[kwi];
        // 3/6 bits: a code that straddles two words takes the next one (still in the tile).
        hi[c] = !KPOW2 && ksh + BK > 32 ? w[kwi + 1] : 0u;
      }
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        const float code = KPOW2 ? kv_code<BK>(lo[c], ksh / BK)
                                 : __uint_as_float((__funnelshift_r(lo[c], hi[c], ksh) & ((1u << BK) - 1u)) | 0x4b000000u) - 8388608.f;
#pragma unroll
        for (int r = 0; r < REP; ++r) s[r] = fmaf(qk_s[r][c0 + c], code, s[r]);
      }
    }
    }
#pragma unroll
    for (int r = 0; r < REP; ++r) s[r] = valid ? s[r] : -KV_INF;
    __syncwarp();
    kv_softmax_tile<REP, VD>(s, valid, m, l, accb, acc, p_s[warp], lane);
    __syncwarp();
    kv_accumulate_values<D, BV, REP, VD, VBW>(p_s[warp], vwv, vsc, vbi, sub, accb, acc);
  } else {
    // Tail tile: float keys and values, rows base - TB.. of the tail.
    kv_float_tile<D, REP, VD, CH>(tk, tv, (size_t)bh * NT + (base - TB), nt, q_s, m, l, accb, acc, p_s[warp], lane);
  }
  // The next tile's qk_s writes must not overtake this tile's reads by other lanes.
  __syncwarp();
}

// Per warp, then per block; qk_s aliases this warp's sm_o slice, and every lane is past its
// last read of it (the __syncwarp above).
kv_warp_finish<D, REP, VD>(m, l, accb, acc, lane, sm_m[warp], sm_l[warp], sm_o[warp]);
__syncthreads();
kv_block_finish<D, REP, WARPS>(sm_m, sm_l, sm_o, ((size_t)bh * n_split + split) * REP, out_o, out_m, out_l);

// Helpers shared by the split-precision decode-attention kernels (prepended to each kernel's
// source through the custom-kernel header; NVRTC sees no <cmath>, so infinity is spelled by
// its bit pattern).
#define KV_INF __int_as_float(0x7f800000)

// `N` consecutive u32 words from a pointer aligned to the widest load that divides N: one
// 16-byte load per 4 words keeps few, wide requests in flight per lane.
template <int N>
__device__ __forceinline__ void kv_load_words(const unsigned* p, unsigned* out) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      out[4 * i] = v.x; out[4 * i + 1] = v.y; out[4 * i + 2] = v.z; out[4 * i + 3] = v.w;
    }
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const uint2 v = reinterpret_cast<const uint2*>(p)[i];
      out[2 * i] = v.x; out[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

// Element `e` (0-based, little end first, as MLX packs) of a word of B-bit codes, as a float.
// The code is placed in the mantissa of 2^23 and 2^23 subtracted: exact, and cheaper than an
// integer-to-float conversion, whose throughput is a quarter of an FMA's.
template <int B>
__device__ __forceinline__ float kv_code(unsigned w, int e) {
  if constexpr (B == 8) {
    return __uint_as_float(__byte_perm(w, 0x4b000000u, 0x7440 + e)) - 8388608.f;
  } else {
    return __uint_as_float(((w >> (e * B)) & ((1u << B) - 1u)) | 0x4b000000u) - 8388608.f;
  }
}

// Code `j` of a run of B-bit codes packed as MLX packs a row: one little-endian bit stream over
// u32 words, code j at bit j * B. 2-, 4- and 8-bit codes never straddle a word (kv_code); MLX
// packs 3-bit codes 8 to 3 bytes and 6-bit codes 4 to 3 bytes, so some of theirs straddle two
// words and are joined with a funnel shift. `j` is a constant after unrolling, so the straddle
// test and the word index fold away.
template <int B>
__device__ __forceinline__ float kv_code_at(const unsigned* w, int j) {
  if constexpr ((B & (B - 1)) == 0) {
    return kv_code<B>(w[j * B / 32], (j * B % 32) / B);
  } else {
    const int bit = j * B, wi = bit >> 5, sh = bit & 31;
    const unsigned x = sh + B <= 32 ? w[wi] >> sh : __funnelshift_r(w[wi], w[wi + 1], sh);
    return __uint_as_float((x & ((1u << B) - 1u)) | 0x4b000000u) - 8388608.f;
  }
}

__device__ __forceinline__ float kv_warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float kv_warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Dtype conversions that do not depend on the half types' implicit conversion operators
// (which a translation unit may switch off).
__device__ __forceinline__ float kv_to_float(float x) { return x; }
__device__ __forceinline__ float kv_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float kv_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T kv_from_float(float x);
template <> __device__ __forceinline__ float kv_from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half kv_from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 kv_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Packs D B-bit codes (one byte each in `code`) into the D * B / 32 words of a row, lane `lane`
// of a warp writing every 32nd word.
template <int D, int B>
__device__ __forceinline__ void kv_pack_codes(const unsigned char* code, uint32_t* w, int lane) {
  if constexpr ((B & (B - 1)) == 0) {
    constexpr int PW = 32 / B;
    for (int wi = lane; wi < D * B / 32; wi += 32) {
      uint32_t word = 0u;
#pragma unroll
      for (int e = 0; e < PW; ++e) word |= (uint32_t)code[wi * PW + e] << (e * B);
      w[wi] = word;
    }
  } else {
    for (int wi = lane; wi < D * B / 32; wi += 32) {
      // Codes 32 wi / B .. (32 wi + 31) / B have bits in word wi; a negative shift is the high
      // part of a code that began in the word before.
      uint32_t word = 0u;
      for (int j = 32 * wi / B; j <= (32 * wi + 31) / B; ++j) {
        const int sh = j * B - 32 * wi;
        const uint32_t c = code[j];
        word |= sh >= 0 ? c << sh : c >> -sh;
      }
      w[wi] = word;
    }
  }
}

// NB bytes (at most 8) that start `mis` bytes (0-3) into the aligned word `p[0]`, as
// (NB + 3) / 4 words from their first byte: the aligned words that hold them are loaded (none
// past them, which may lie past the buffer's end) and funnel-shifted down. 3- and 6-bit value
// codes of a lane start at any byte.
template <int NB>
__device__ __forceinline__ void kv_load_bytes(const unsigned* p, unsigned mis, unsigned* out) {
  constexpr int MAXMIS = NB % 4 == 0 ? 0 : (NB % 2 == 0 ? 2 : 3);  // bytes start at multiples of NB
  constexpr int WIN = (NB + MAXMIS + 3) / 4;
  unsigned x[WIN + 1];
#pragma unroll
  for (int w = 0; w < WIN; ++w) x[w] = 4u * w < mis + NB ? p[w] : 0u;
  x[WIN] = 0u;
#pragma unroll
  for (int w = 0; w < (NB + 3) / 4; ++w) out[w] = __funnelshift_r(x[w], x[w + 1], 8u * mis);
}

// Quantizes one row of D values (one KV head's new token) into B-bit codes with one scale and
// bias per G values, as MLX's affine_quantize does (same formulas and order, so the codes
// match MLX's `quantize`): its running max starts at 0 and its min at FLT_MAX, the scale is
// (max - min) / (2^B - 1) with its sign and the bias chosen by the edge of larger magnitude,
// and codes are round((x - bias) / scale) clamped to 2^B - 1. Called by one warp; each lane
// owns D / 32 consecutive values. Codes are staged in `code_s` (D bytes) and packed into u32
// words as one little-endian bit stream (code j at bit j * B), which is MLX's layout for every
// width: 3- and 6-bit codes may straddle two words, and each word takes the parts that fall in it.
template <int D, int G, int B, typename T>
__device__ __forceinline__ void kv_quantize_row(const T* x, uint32_t* w, __half* sc, __half* bi,
                                                unsigned char* code_s, int lane) {
  constexpr int VPL = D / 32;
  constexpr int LPG = G / VPL;
  static_assert(G % VPL == 0 && LPG <= 32, "a group spans whole lanes of one warp");
  const float n_bins = (float)((1 << B) - 1);
  float v[VPL];
  float lo = 3.402823466e+38f, hi = 0.f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    v[i] = kv_to_float(x[lane * VPL + i]);
    lo = fminf(lo, v[i]);
    hi = fmaxf(hi, v[i]);
  }
#pragma unroll
  for (int off = 1; off < LPG; off <<= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
  }
  float scale = fmaxf((hi - lo) / n_bins, 1e-7f);
  const bool side = fabsf(lo) > fabsf(hi);
  scale = side ? scale : -scale;
  const float edge = side ? lo : hi;
  const float q0 = roundf(edge / scale);
  const bool at_zero = q0 == 0.f;
  scale = at_zero ? scale : edge / q0;
  const float bias = at_zero ? 0.f : edge;
  if (lane % LPG == 0) {
    sc[lane / LPG] = __float2half_rn(scale);
    bi[lane / LPG] = __float2half_rn(bias);
  }
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    code_s[lane * VPL + i] = (unsigned char)fminf(fmaxf(roundf((v[i] - bias) / scale), 0.f), n_bins);
  }
  __syncwarp();
  kv_pack_codes<D, B>(code_s, w, lane);
}

// x <- x H / sqrt(D) in place, for `rows` rows of D floats in shared memory, H the Sylvester
// Hadamard matrix (H[j][i] = -1 where popc(i & j) is odd; symmetric, and over sqrt(D) its own
// inverse): the fast Walsh-Hadamard transform, log2(D) rounds of D / 2 butterflies per row in
// f32, the scale folded into the last round. Threads `tid` of `n` share each round and the
// rounds are separated by the block's barrier (BLOCK: every thread of the block calls this) or
// the warp's (one warp's lanes call it). The caller synchronises before (x written); the last
// round's barrier makes the result visible to the same threads after.
// One row is D log2(D) / 2 butterflies, against D^2 multiply-adds for the sign loop.
template <int D, bool BLOCK>
__device__ __forceinline__ void kv_hadamard(float* x, int rows, int tid, int n) {
  static_assert(D > 1 && (D & (D - 1)) == 0, "Sylvester Hadamard needs a power-of-two width");
  for (int h = 1; h < D; h <<= 1) {
    const float s = 2 * h == D ? rsqrtf((float)D) : 1.f;
    for (int p = tid; p < rows * (D / 2); p += n) {
      const int r = p / (D / 2), k = p % (D / 2);
      // The pair's low index has bit h clear: k's bits below h stay, the rest move up one.
      const int i = r * D + (k / h) * 2 * h + k % h;
      const float a = x[i], b = x[i + h];
      x[i] = (a + b) * s;
      x[i + h] = (a - b) * s;
    }
    if constexpr (BLOCK) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  }
}

// ---- The CUDA-core attention pass (decode_partial.cu without KV_MMA, decode_channels.cu) ----
// Both kernels read values per token the same way and keep the same online softmax and
// block-end merges; the pieces are here once. A lane owns VD dims of one token per value step
// (LPT = D / VD lanes a token, TPW = 32 / LPT tokens a step, NV = 32 / TPW steps a tile).

// This lane's value codes, scale and bias for the NV tokens it reads in a 32-token tile whose
// first buffer row is `row0` (a tile's rows are consecutive), issued together so one memory
// latency is paid per tile. Tokens at or past `nt` get zero codes and scale (their p is 0).
template <int D, int BV, int GV, int VD, int VBW>
__device__ __forceinline__ void kv_load_value_tile(const uint32_t* vw, const __half* vs, const __half* vb,
                                                   size_t row0, int nt, int sub, int d0,
                                                   unsigned (*vwv)[VBW], float* vsc, float* vbi) {
  constexpr int VW = D * BV / 32;
  constexpr int VG = D / GV;
  constexpr int TPW = 32 / (D / VD);
  constexpr int NV = 32 / TPW;
  constexpr int VB = VD * BV / 8;
  constexpr bool VPOW2 = (BV & (BV - 1)) == 0;
  static_assert(VBW == (VB >= 4 ? (VB + 3) / 4 : 1), "words a lane holds per token");
  const int vgrp = d0 / GV;
  const unsigned voff = (unsigned)d0 * BV / 8;
  const unsigned vmis = VPOW2 ? 0u : voff & 3u;
#pragma unroll
  for (int n = 0; n < NV; ++n) {
    const int tt = sub + n * TPW;
    vsc[n] = 0.f; vbi[n] = 0.f;
#pragma unroll
    for (int w = 0; w < VBW; ++w) vwv[n][w] = 0u;
    if (tt < nt) {
      const size_t row = row0 + tt;
      const unsigned char* vrow = reinterpret_cast<const unsigned char*>(vw + row * VW) + (d0 * BV / 8);
      if constexpr (!VPOW2) {
        kv_load_bytes<VB>(vw + row * VW + (voff >> 2), vmis, vwv[n]);
      } else if constexpr (VB == 8) {
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
}

// One tile's online-softmax update: this lane's scores `s` (-inf where not `valid`) against the
// running max `m`, denominator `l` and value sums (rescaled), and the tile's weights into
// `p_w` (this warp's [REP][32] slice of shared memory) for the value step.
template <int REP, int VD>
__device__ __forceinline__ void kv_softmax_tile(const float* s, bool valid, float* m, float* l, float* accb,
                                                float (*acc)[VD], float (*p_w)[32], int lane) {
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    const float m_new = fmaxf(m[r], kv_warp_max(s[r]));
    const float alpha = __expf(m[r] - m_new);
    const float p = valid ? __expf(s[r] - m_new) : 0.f;
    l[r] = l[r] * alpha + p;
    accb[r] *= alpha;
#pragma unroll
    for (int i = 0; i < VD; ++i) acc[r][i] *= alpha;
    p_w[r][lane] = p;
    m[r] = m_new;
  }
}

// One tile of float tokens (the per-channel kernel's sink run or tail, decode_channels.cu): `nt`
// tokens whose K and V rows start at row `row0` of `fk`, `fv` ([rows, D]), lane i scoring token
// i; CH channels' loads are issued together (one latency per chunk), then the online-softmax
// update and the value sums, lanes owning VD dims of one token each (as the packed tiles).
template <int D, int REP, int VD, int CH, typename FT>
__device__ __forceinline__ void kv_float_tile(const FT* fk, const FT* fv, size_t row0, int nt, const float* q_s,
                                              float* m, float* l, float* accb, float (*acc)[VD],
                                              float (*p_w)[32], int lane) {
  constexpr int LPT = D / VD;
  constexpr int TPW = 32 / LPT;
  constexpr int NV = 32 / TPW;
  const bool valid = lane < nt;
  float s[REP];
#pragma unroll
  for (int r = 0; r < REP; ++r) s[r] = 0.f;
  if (valid) {
    const size_t krow = (row0 + lane) * D;
#pragma unroll 1
    for (int c0 = 0; c0 < D; c0 += CH) {
      float k[CH];
#pragma unroll
      for (int c = 0; c < CH; ++c) k[c] = kv_to_float(fk[krow + c0 + c]);
#pragma unroll
      for (int c = 0; c < CH; ++c) {
#pragma unroll
        for (int r = 0; r < REP; ++r) s[r] = fmaf(q_s[r * D + c0 + c], k[c], s[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < REP; ++r) s[r] = valid ? s[r] : -KV_INF;
  __syncwarp();
  kv_softmax_tile<REP, VD>(s, valid, m, l, accb, acc, p_w, lane);
  __syncwarp();
  const int sub = lane / LPT;
  const int d0 = (lane % LPT) * VD;
  for (int n = 0; n < NV; ++n) {
    const int tt = sub + n * TPW;
    if (tt < nt) {
      const size_t vrow = (row0 + tt) * D + d0;
#pragma unroll
      for (int r = 0; r < REP; ++r) {
        const float p = p_w[r][tt];
#pragma unroll
        for (int i = 0; i < VD; ++i) acc[r][i] = fmaf(p, kv_to_float(fv[vrow + i]), acc[r][i]);
      }
    }
  }
}

// The value step of a packed tile: p * scale * code into the lane's dims, and p * bias into one
// running sum per row (the group bias adds the same amount to every dim of the group).
template <int D, int BV, int REP, int VD, int VBW>
__device__ __forceinline__ void kv_accumulate_values(const float (*p_w)[32], const unsigned (*vwv)[VBW],
                                                     const float* vsc, const float* vbi, int sub,
                                                     float* accb, float (*acc)[VD]) {
  constexpr int TPW = 32 / (D / VD);
  constexpr int NV = 32 / TPW;
#pragma unroll
  for (int n = 0; n < NV; ++n) {
    const int tt = sub + n * TPW;
#pragma unroll
    for (int r = 0; r < REP; ++r) {
      const float p = p_w[r][tt];
      const float ps = p * vsc[n];
      accb[r] = fmaf(p, vbi[n], accb[r]);
#pragma unroll
      for (int i = 0; i < VD; ++i) acc[r][i] = fmaf(ps, kv_code_at<BV>(vwv[n], i), acc[r][i]);
    }
  }
}

// Per warp, after its last tile: the lanes' denominators summed, and the value sums of the
// lanes that own the same dims, into the warp's slot of the block's shared arrays.
template <int D, int REP, int VD>
__device__ __forceinline__ void kv_warp_finish(const float* m, const float* l, const float* accb,
                                               const float (*acc)[VD], int lane, float* sm_m_w,
                                               float* sm_l_w, float (*sm_o_w)[D]) {
  constexpr int LPT = D / VD;
  const int sub = lane / LPT;
  const int d0 = (lane % LPT) * VD;
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    const float lw = kv_warp_sum(l[r]);
#pragma unroll
    for (int i = 0; i < VD; ++i) {
      float a = acc[r][i] + accb[r];
#pragma unroll
      for (int off = LPT; off < 32; off <<= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
      if (sub == 0) sm_o_w[r][d0 + i] = a;
    }
    if (lane == 0) { sm_m_w[r] = m[r]; sm_l_w[r] = lw; }
  }
}

// Per block, after a barrier: the warps merged (a warp that saw no token has m = -inf and
// weight 0) into this split's partial result, row `o0 + r` of out_o / out_m / out_l.
template <int D, int REP, int WARPS>
__device__ __forceinline__ void kv_block_finish(const float (*sm_m)[REP], const float (*sm_l)[REP],
                                                const float (*sm_o)[REP][D], size_t o0,
                                                float* out_o, float* out_m, float* out_l) {
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
    const size_t o = o0 + r;
    out_o[o * D + d] = O;
    if (d == 0) { out_m[o] = M; out_l[o] = L; }
  }
}

// ---- Tensor-core helpers (the KV_MMA variant of decode_partial.cu) ----
// Packed f16 pairs travel as u32 words: low half first, as the MMA fragments expect.

// c += A (16x16 f16, row-major fragment) * B (16x8 f16, column-major fragment), f32 accumulate.
__device__ __forceinline__ void kv_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// (1024 + c) pairs to c, exactly (both are integers below 2048).
__device__ __forceinline__ unsigned kv_h2_unbias(unsigned x) {
  unsigned r;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(0x64006400u));
  return r;
}

__device__ __forceinline__ unsigned kv_h2_fma(unsigned a, unsigned b, unsigned c) {
  unsigned r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

__device__ __forceinline__ unsigned kv_h2_pack(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// Pair p (0..7) of one token's 16-dim key chunk (B-bit codes, B/2 words) as f16 pairs holding
// 1024 + code: the code goes into the mantissa of 1024.0 (0x6400), which costs one byte
// permute (8-bit) or one mask (4-bit) per two codes instead of two int-to-float conversions.
// Which dims a pair holds does not matter to the dot product as long as the query fragment
// uses the same ones (kv_key_dim).
template <int B>
__device__ __forceinline__ unsigned kv_key_pair(const unsigned* w, int p) {
  if constexpr (B == 8) {
    return __byte_perm(w[p >> 1], 0x64u, (p & 1) ? 0x4342 : 0x4140);
  } else {
    return ((w[p >> 2] >> (4 * (p & 3))) & 0x000f000fu) | 0x64006400u;
  }
}

// The chunk dim of pair p's low (half 0) or high (half 1) element.
template <int B>
__device__ __forceinline__ int kv_key_dim(int p, int half) {
  if constexpr (B == 8) {
    return 4 * (p >> 1) + 2 * (p & 1) + half;
  } else {
    return 8 * (p >> 2) + (p & 3) + 4 * half;
  }
}

// Dim e (0..7) of two tokens' 8-dim value chunks (B bits: B/4 words, or the low 16 bits of one
// word for B = 2) as an f16 pair of 1024 + code, token a in the low half.
template <int B>
__device__ __forceinline__ unsigned kv_val_pair(const unsigned* ca, const unsigned* cb, int e) {
  if constexpr (B == 8) {
    const int i = e & 3;
    return (__byte_perm(ca[e >> 2], cb[e >> 2], i | ((4 + i) << 8)) & 0x00ff00ffu) | 0x64006400u;
  } else if constexpr (B == 4) {
    const unsigned x = __byte_perm(ca[0], cb[0], e < 4 ? 0x5410 : 0x7632);
    return ((x >> (4 * (e & 3))) & 0x000f000fu) | 0x64006400u;
  } else {
    const unsigned x = __byte_perm(ca[0], cb[0], 0x5410);
    return ((x >> (2 * e)) & 0x00030003u) | 0x64006400u;
  }
}

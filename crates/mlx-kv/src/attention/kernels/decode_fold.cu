// The merge folded into a step launch (KV_FOLD), appended by fused.rs to the attention pass
// of decode_partial.cu and of decode_channels.cu (KV_CSTEP). It needs from the pass: out_o,
// out_m, out_l (the block's partial results, carved from `part`), sm_o, q_s, pos (or ctr),
// the block coordinates, OT, and KV_ROT (with ROT where it is 1); pos[1 + bh] and pos[1023]
// are arrival counters, pos[0] the counter the step advances.

#if KV_FOLD
// The merge folded into this launch (fused.rs `decode_step` with fold): the last block of a
// head to finish (an arrival counter per head in pos[1 + bh], or ctr[1 + bh] when paged)
// merges that head's splits as decode_merge.cu does, writes `out` in the query dtype and
// resets its counter; unpaged, the last head to be merged also resets pos[1023] and advances
// pos[0] (every block has read it by then). Other blocks' partial
// results are read through L2 (__ldcg) after the fences. Split weights are staged in sm_o,
// free once the block's own warps are merged, so at most WARPS * D splits.
{
  __shared__ int kv_last;
  __shared__ float kv_l[REP];
#if KV_PAGED
  int32_t* const arrivals = const_cast<int32_t*>(ctr);
#else
  int32_t* const arrivals = const_cast<int32_t*>(pos);
#endif
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) kv_last = atomicAdd(&arrivals[1 + bh], 1) == n_split - 1;
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
#if KV_ROT
      // Values rotated (ROT bit 1): the output leaves the values' frame below (o H / sqrt(D)),
      // staged in q_s, which the tiles no longer read.
      if (ROT & 2) { q_s[i] = o / kv_l[r]; continue; }
#endif
      out[((size_t)bh * REP + r) * D + dd] = kv_from_float<OT>(o / kv_l[r]);
    }
#if KV_ROT
    if (ROT & 2) {
      __syncthreads();
      kv_hadamard<D, true>(q_s, REP, threadIdx.x, blockDim.x);
      for (int i = threadIdx.x; i < REP * D; i += blockDim.x) out[(size_t)bh * REP * D + i] = kv_from_float<OT>(q_s[i]);
    }
#endif
    if (threadIdx.x == 0) {
      // Every split of this head has arrived, so nothing increments the counter again in this
      // launch, and the next launch runs after this one.
      arrivals[1 + bh] = 0;
#if !KV_PAGED
      __threadfence();
      if (atomicAdd(&arrivals[1023], 1) == (int)gridDim.y - 1) {
        arrivals[1023] = 0;
        arrivals[0] += 1;
      }
#endif
    }
  }
}
#endif

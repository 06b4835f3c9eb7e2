// Split-precision decode attention, pass 2: one block per (KV head, query row), one thread per
// dim. Combines the splits' partial results with weights exp(m_s - max m) and writes the
// normalised output in the query dtype (OT), so no further ops run per layer.
// KV_STEP: the split count comes from the partial results' shape, and the step's position
// counter is advanced (see decode_partial.cu), except with KV_PAGED, which has none.
// The per-split maxima and denominators are staged through shared memory by all threads at
// once; a thread walking them one by one from global memory waits a full load latency per
// split (ncu measured 21 us for 64 splits that way).
#ifndef KV_PAGED
#define KV_PAGED 0
#endif
constexpr int MAX_SPLITS = 1024;
__shared__ float c_s[MAX_SPLITS];
__shared__ float red[32];
const int br = blockIdx.y;
const int d = threadIdx.x;
#if KV_STEP
const int NS = part_m_shape[1];
#else
const int NS = meta[3];
#endif
const size_t first = (size_t)(br / REP) * NS * REP + (br % REP);
float mx = -KV_INF;
for (int s = d; s < NS; s += blockDim.x) {
  const float ms = part_m[first + (size_t)s * REP];
  c_s[s] = ms;
  mx = fmaxf(mx, ms);
}
mx = kv_warp_max(mx);
if ((d & 31) == 0) red[d >> 5] = mx;
__syncthreads();
float M = -KV_INF;
for (int w = 0; w < (int)(blockDim.x + 31) / 32; ++w) M = fmaxf(M, red[w]);
__syncthreads();
float lsum = 0.f;
for (int s = d; s < NS; s += blockDim.x) {
  const float c = c_s[s] > -KV_INF ? __expf(c_s[s] - M) : 0.f;
  c_s[s] = c;
  lsum += part_l[first + (size_t)s * REP] * c;
}
lsum = kv_warp_sum(lsum);
if ((d & 31) == 0) red[d >> 5] = lsum;
__syncthreads();
float L = 0.f;
for (int w = 0; w < (int)(blockDim.x + 31) / 32; ++w) L += red[w];
float O = 0.f;
#pragma unroll 8
for (int s = 0; s < NS; ++s) O += part_o[(first + (size_t)s * REP) * D + d] * c_s[s];
out[(size_t)br * D + d] = kv_from_float<OT>(O / L);
#if KV_STEP && !KV_PAGED
// The step is done: the layer's next token goes to the next slot. No other thread of this
// launch reads pos, and the next step's partial kernel runs after this one.
if (blockIdx.y == 0 && d == 0) const_cast<int32_t*>(pos)[0] += 1;
#endif

// Split-precision decode attention, pass 2: one block per (KV head, query row), one thread per
// dim. Combines the splits' partial results with weights exp(m_s - max m) and writes the
// normalised output in the query dtype (OT), so no further ops run per layer.
const int br = blockIdx.y;
const int d = threadIdx.x;
const int NS = meta[3];
const size_t first = (size_t)(br / REP) * NS * REP + (br % REP);
float M = -KV_INF;
for (int s = 0; s < NS; ++s) M = fmaxf(M, part_m[first + (size_t)s * REP]);
float L = 0.f, O = 0.f;
for (int s = 0; s < NS; ++s) {
  const float ms = part_m[first + (size_t)s * REP];
  if (ms > -KV_INF) {
    const float c = __expf(ms - M);
    L += part_l[first + (size_t)s * REP] * c;
    O += part_o[(first + (size_t)s * REP) * D + d] * c;
  }
}
out[(size_t)br * D + d] = kv_from_float<OT>(O / L);

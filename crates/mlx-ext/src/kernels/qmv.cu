// y = x W^T for a weight in MLX's affine layout (cuda.rs `qmv`): `w` u32 [N, K * BITS / 32]
// (element e of a row in bits BITS * (e % (32 / BITS)) of word e * BITS / 32), `scales` and
// `biases` [N, K / GROUP] in the weight's 16-bit dtype, `x` [rows, K] -> `y` [rows, N], rows <= R
// <= 8 (a decode step: one row per sequence). R is 1 or 8: the row count itself is read from
// x's shape, since a template argument per count would be an NVRTC compile of seconds in the
// middle of a request for every new prompt length or batch size.
// One warp per weight row: each lane reads 16 bytes of codes per step (CPW codes, inside one
// group since GROUP is a multiple of CPW), so a warp's load is 512 contiguous bytes, and every
// code serves all R rows of x. The row's partial sums meet in a warp shuffle. MLX's own one-row
// kernel streamed an 8B model's weights at about 0.9 TB/s in a decode step; this layout reached
// 1.2-2.0 TB/s on an H100 (scripts/gpu-qmv-probe.py, docs/gpu-whole-model-h200.md).
constexpr int CPW = 128 / BITS;         // codes per 16-byte load
constexpr int CPU32 = 32 / BITS;        // codes per u32 word
constexpr int U = K / CPW;              // 16-byte loads per row
constexpr int NG = K / GROUP;           // groups per row
constexpr unsigned MASK = (1u << BITS) - 1u;
static_assert(K % CPW == 0 && GROUP % CPW == 0 && CPW % 8 == 0, "a load lies in one group and whole 8-element runs of x");
static_assert(R >= 1 && R <= 8, "one to eight rows of x");
const int rows = R == 1 ? 1 : x_shape[0];

const int lane = threadIdx.x & 31;
const int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
if (row >= N) return;
const uint4* wr = reinterpret_cast<const uint4*>(w) + (size_t)row * U;
float acc[R];
#pragma unroll
for (int r = 0; r < R; ++r) acc[r] = 0.f;
#pragma unroll 4
for (int u = lane; u < U; u += 32) {
  const uint4 q = __ldg(wr + u);
  const unsigned qw[4] = {q.x, q.y, q.z, q.w};
  const int e0 = u * CPW;
  const int g = e0 / GROUP;
  const float sc = qmv_to_float(scales[(size_t)row * NG + g]);
  const float bi = qmv_to_float(biases[(size_t)row * NG + g]);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    float dot = 0.f, xs = 0.f;
#pragma unroll
    for (int c8 = 0; c8 < CPW / 8; ++c8) {
      float xf[8];
      qmv_load8(x + (size_t)r * K + e0 + c8 * 8, xf);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int c = c8 * 8 + i;
        const float code = (float)((qw[c / CPU32] >> (BITS * (c % CPU32))) & MASK);
        dot = fmaf(code, xf[i], dot);
        xs += xf[i];
      }
    }
    acc[r] = fmaf(sc, dot, fmaf(bi, xs, acc[r]));
  }
}
#pragma unroll
for (int r = 0; r < R; ++r) {
  if (r >= rows) break;
  float a = acc[r];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
  if (lane == 0) y[(size_t)r * N + row] = qmv_from_float<OT>(a);
}

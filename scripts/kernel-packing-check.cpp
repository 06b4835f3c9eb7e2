// Host check of the fused decode kernels' code packing (kernels/decode_common.cuh), no GPU:
// the header is compiled for the CPU with stand-ins for the CUDA intrinsics it uses, and its
// packing helpers are run against a plain bit-stream reference of MLX's layout (code j of a row
// at bit j * B, little end first; scripts cannot call MLX here, but that layout was checked
// against MLX 0.32.2's `quantize` for 3 and 6 bits, see fused.rs).
//   kv_pack_codes  (the step kernels' write of a new token's codes)
//   kv_code_at     (every code read: keys, and values after kv_load_bytes)
//   kv_load_bytes  (a lane's 3- or 6-byte run of 3/6-bit value codes at any byte offset; built
//                   with -fsanitize=address, a load past the row's last word fails the run)
// Usage: g++ -std=c++17 -O1 -fsanitize=address -o /tmp/kpc scripts/kernel-packing-check.cpp && /tmp/kpc
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#define __device__
#define __forceinline__ inline
// The tensor-core helpers' PTX is never called here.
#define asm(...) ((void)0)
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct __half { unsigned short v; };
struct __nv_bfloat16 { unsigned short v; };
static float bits_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static unsigned float_bits(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static float __uint_as_float(unsigned u) { return bits_float(u); }
static float __int_as_float(int i) { return bits_float((unsigned)i); }
static unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  return (unsigned)((((uint64_t)hi << 32) | lo) >> (s & 31));
}
static unsigned __byte_perm(unsigned a, unsigned b, unsigned sel) {
  const uint64_t x = ((uint64_t)b << 32) | a;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((x >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
static float __shfl_xor_sync(unsigned, float v, int) { return v; }
static void __syncwarp() {}
static float __half2float(__half) { return 0.f; }
static float __bfloat162float(__nv_bfloat16) { return 0.f; }
static __half __float2half_rn(float) { return {}; }
static __nv_bfloat16 __float2bfloat16_rn(float) { return {}; }
static unsigned short __half_as_ushort(__half h) { return h.v; }
static __half __ushort_as_half(unsigned short v) { return {v}; }
#include "../crates/mlx-kv/src/attention/kernels/decode_common.cuh"

static int failures = 0;
#define EXPECT(cond, ...)                   \
  do {                                      \
    if (!(cond)) {                          \
      if (failures++ < 20) {                \
        std::printf("FAIL: " __VA_ARGS__);  \
        std::printf("\n");                  \
      }                                     \
    }                                       \
  } while (0)

// MLX's layout, written bit by bit.
static std::vector<uint32_t> reference_pack(const std::vector<unsigned char>& code, int bits) {
  std::vector<uint32_t> w(code.size() * bits / 32, 0u);
  for (size_t j = 0; j < code.size(); ++j)
    for (int b = 0; b < bits; ++b)
      if ((code[j] >> b) & 1) w[(j * bits + b) / 32] |= 1u << ((j * bits + b) % 32);
  return w;
}

template <int D, int B>
static void check_row(std::mt19937& rng) {
  std::vector<unsigned char> code(D);
  for (auto& c : code) c = (unsigned char)(rng() % (1u << B));
  const auto want = reference_pack(code, B);
  // The step kernel's write: 32 lanes.
  std::vector<uint32_t> got(want.size(), 0xdeadbeefu);
  for (int lane = 0; lane < 32; ++lane) kv_pack_codes<D, B>(code.data(), got.data(), lane);
  EXPECT(got == want, "kv_pack_codes D=%d B=%d", D, B);
  // Every read of a key code (a group's words from any word offset is the same stream).
  for (int j = 0; j < D; ++j) {
    const float c = kv_code_at<B>(want.data(), j);
    EXPECT(c == (float)code[j], "kv_code_at D=%d B=%d j=%d: %g != %d", D, B, j, c, code[j]);
  }
  // Value lanes of 3/6 bits: VD dims per lane (fused.rs value_dims gives VD * B = 24 or 48).
  if constexpr ((B & (B - 1)) != 0) {
    for (int vd : {24 / B, 48 / B}) {
      if (vd > D || D / vd > 32) continue;
      // The row alone in a buffer of its exact size: a word past it is an ASan error.
      std::vector<uint32_t> row(want);
      for (int d0 = 0; d0 < D; d0 += vd) {
        const unsigned off = (unsigned)d0 * B / 8;
        unsigned out[2] = {0u, 0u};
        if (vd * B == 24) kv_load_bytes<3>(row.data() + off / 4, off & 3u, out);
        else kv_load_bytes<6>(row.data() + off / 4, off & 3u, out);
        for (int i = 0; i < vd; ++i) {
          const float c = kv_code_at<B>(out, i);
          EXPECT(c == (float)code[d0 + i], "value lane D=%d B=%d VD=%d d0=%d i=%d: %g != %d", D, B, vd, d0, i, c, code[d0 + i]);
        }
      }
    }
  }
}

template <int D>
static void check_widths(std::mt19937& rng) {
  check_row<D, 2>(rng);
  check_row<D, 3>(rng);
  check_row<D, 4>(rng);
  check_row<D, 6>(rng);
  check_row<D, 8>(rng);
}

int main() {
  std::mt19937 rng(18);
  for (int rep = 0; rep < 200; ++rep) {
    check_widths<32>(rng);
    check_widths<64>(rng);
    check_widths<128>(rng);
    check_widths<256>(rng);
  }
  std::printf("kernel packing check: %s (%d failures)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}

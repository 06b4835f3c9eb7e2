// MLX's microscaled quantization modes (mxfp4, mxfp8: e2m1 or e4m3 codes with one power-of-two
// e8m0 scale per group of 32 and no bias) behind C entry points. mlx-c takes the mode too, but
// mlx-rs 0.33 passes "affine" everywhere and keeps mlx-c's error text to itself; here a wrong
// mode, shape or group reaches the caller as MLX's own message.

#include <optional>
#include <string>

#include "ext_common.h"
#include "mlx/c/private/array.h"
#include "mlx/ops.h"

namespace mx = mlx::core;
using kvsplit::guarded;

namespace {
std::optional<mx::array> maybe(const mlx_array a) {
  if (a.ctx == nullptr) return std::nullopt;
  return mlx_array_get_(a);
}
}  // namespace

extern "C" int kvsplit_mode_quantized_matmul(mlx_array* res, const mlx_array x, const mlx_array w,
                                              const mlx_array scales, const mlx_array biases, bool transpose,
                                              int group, int bits, const char* mode) {
  return guarded([&] {
    mlx_array_set_(*res, mx::quantized_matmul(mlx_array_get_(x), mlx_array_get_(w), mlx_array_get_(scales),
                                              maybe(biases), transpose, group, bits, mode));
  });
}

extern "C" int kvsplit_mode_gather_qmm(mlx_array* res, const mlx_array x, const mlx_array w, const mlx_array scales,
                                       const mlx_array biases, const mlx_array lhs_indices,
                                       const mlx_array rhs_indices, bool transpose, int group, int bits,
                                       const char* mode, bool sorted) {
  return guarded([&] {
    mlx_array_set_(*res, mx::gather_qmm(mlx_array_get_(x), mlx_array_get_(w), mlx_array_get_(scales),
                                        maybe(biases), maybe(lhs_indices), maybe(rhs_indices), transpose, group,
                                        bits, mode, sorted));
  });
}

extern "C" int kvsplit_mode_dequantize(mlx_array* res, const mlx_array w, const mlx_array scales,
                                       const mlx_array biases, int group, int bits, const char* mode) {
  return guarded([&] {
    mlx_array_set_(*res, mx::dequantize(mlx_array_get_(w), mlx_array_get_(scales), maybe(biases), group, bits,
                                        mode));
  });
}

// The packed codes and scales (mxfp modes return no biases).
extern "C" int kvsplit_mode_quantize(mlx_array* codes, mlx_array* scales, const mlx_array w, int group, int bits,
                                     const char* mode) {
  return guarded([&] {
    auto out = mx::quantize(mlx_array_get_(w), group, bits, mode);
    if (out.size() != 2) throw std::invalid_argument(std::string("quantize: mode '") + mode + "' returned biases");
    mlx_array_set_(*codes, out[0]);
    mlx_array_set_(*scales, out[1]);
  });
}

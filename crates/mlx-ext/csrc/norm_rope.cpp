// RMSNorm and RoPE as single CPU primitives. On the CPU backend MLX 0.32.2 evaluates
// `fast::rms_norm` and `fast::rope` through their fallbacks, compositions of 10-25 small ops
// each (Square, Sum, Rsqrt, Arange, Sin, Cos, Concatenate, broadcasts...); a decode step of a
// 30-layer model scheduled about 5,000 op nodes, mostly from these, and per-node overhead, not
// arithmetic, dominated the step. The arithmetic mirrors the fallbacks (float32 positions times
// float32 inverse frequencies, float32 sin/cos), so results agree to float32 rounding.
#include <cmath>
#include <vector>

#include "ext_common.h"
#include "kvsplit_ext.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/stream.h"
#include "mlx/primitives.h"

namespace kvsplit {
namespace {

using mlx::core::array;
using mlx::core::Primitive;
using mlx::core::Stream;
using mlx::core::UnaryPrimitive;

class RmsNorm : public CpuPrimitive {
 public:
  RmsNorm(Stream s, float eps, bool has_weight) : CpuPrimitive(s), eps_(eps), has_weight_(has_weight) {}

  void eval_cpu(const std::vector<array>& in, array& out) override {
    const array& x = in[0];
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    const int h = x.shape(-1);
    const int64_t last = x.strides()[x.ndim() - 1];
    std::vector<int64_t> rows = row_offsets(x);
    if (has_weight_ && !in[1].flags().row_contiguous)
      throw std::invalid_argument("kvsplit rms_norm: the weight must be contiguous");
    auto& enc = mlx::core::cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    enc.set_output_array(out);
    enc.dispatch([xd = x.data<float>(), w = has_weight_ ? in[1].data<float>() : nullptr, y = out.data<float>(),
                  rows = std::move(rows), h, last, eps = eps_]() {
      for (size_t r = 0; r < rows.size(); ++r) {
        const float* xr = xd + rows[r];
        float ss = 0.0f;
        for (int j = 0; j < h; ++j) ss += xr[j * last] * xr[j * last];
        const float inv = 1.0f / std::sqrt(ss / float(h) + eps);
        float* yr = y + int64_t(r) * h;
        for (int j = 0; j < h; ++j) yr[j] = xr[j * last] * inv * (w ? w[j] : 1.0f);
      }
    });
  }

  const char* name() const override { return "KvsplitRmsNorm"; }
  bool is_equivalent(const Primitive& o) const override {
    auto& r = static_cast<const RmsNorm&>(o);
    return eps_ == r.eps_ && has_weight_ == r.has_weight_;
  }

 private:
  float eps_;
  bool has_weight_;
};

struct RopeParams {
  int dims;
  bool traditional;
  float base;  // unused when freqs are given
  float scale;
  int offset;
  bool has_freqs;
};

class Rope : public CpuPrimitive {
 public:
  Rope(Stream s, RopeParams p) : CpuPrimitive(s), p_(p) {}

  void eval_cpu(const std::vector<array>& in, array& out) override {
    const array& x = in[0];
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    if (p_.has_freqs && !in[1].flags().row_contiguous)
      throw std::invalid_argument("kvsplit rope: freqs must be contiguous");
    const int d = x.shape(-1), l = x.shape(-2);
    const int64_t last = x.strides()[x.ndim() - 1];
    std::vector<int64_t> rows = row_offsets(x);
    auto& enc = mlx::core::cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    enc.set_output_array(out);
    enc.dispatch([xd = x.data<float>(), fr = p_.has_freqs ? in[1].data<float>() : nullptr, y = out.data<float>(),
                  rows = std::move(rows), d, l, last, p = p_]() {
      const int half = p.dims / 2;
      std::vector<float> inv(half);
      const float step = std::log(p.base) / float(half);
      for (int i = 0; i < half; ++i) inv[i] = fr ? 1.0f / fr[i] : std::exp(-float(i) * step);
      std::vector<float> cs(size_t(l) * half), sn(size_t(l) * half);
      for (int t = 0; t < l; ++t) {
        const float pos = float(t + p.offset) * p.scale;
        for (int i = 0; i < half; ++i) {
          const float th = pos * inv[i];
          cs[size_t(t) * half + i] = std::cos(th);
          sn[size_t(t) * half + i] = std::sin(th);
        }
      }
      for (size_t r = 0; r < rows.size(); ++r) {
        const float* xr = xd + rows[r];
        float* yr = y + int64_t(r) * d;
        const float* c = cs.data() + (r % l) * half;
        const float* s = sn.data() + (r % l) * half;
        for (int i = 0; i < half; ++i) {
          const int a = p.traditional ? 2 * i : i, b = p.traditional ? 2 * i + 1 : i + half;
          const float x1 = xr[a * last], x2 = xr[b * last];
          yr[a] = x1 * c[i] - x2 * s[i];
          yr[b] = x1 * s[i] + x2 * c[i];
        }
        for (int j = p.dims; j < d; ++j) yr[j] = xr[j * last];
      }
    });
  }

  const char* name() const override { return "KvsplitRope"; }
  bool is_equivalent(const Primitive& o) const override {
    auto& q = static_cast<const Rope&>(o).p_;
    return p_.dims == q.dims && p_.traditional == q.traditional && p_.base == q.base && p_.scale == q.scale &&
           p_.offset == q.offset && p_.has_freqs == q.has_freqs;
  }

 private:
  RopeParams p_;
};

}  // namespace
}  // namespace kvsplit

using namespace kvsplit;

extern "C" int kvsplit_cpu_rms_norm(mlx_array* res, const mlx_array x_, const mlx_array weight_, float eps,
                                    const mlx_stream s_) {
  return guarded([&] {
    const array& x = mlx_array_get_(x_);
    const Stream st = mlx_stream_get_(s_);
    const bool has_w = weight_.ctx != nullptr;
    require(x.ndim() >= 1 && x.dtype() == mlx::core::float32, "kvsplit rms_norm: x must be float32 [..., H]");
    std::vector<array> inputs{x};
    if (has_w) {
      const array& w = mlx_array_get_(weight_);
      require(w.ndim() == 1 && w.shape(0) == x.shape(-1) && w.dtype() == mlx::core::float32,
              "kvsplit rms_norm: weight must be float32 [H] with H = " + std::to_string(x.shape(-1)));
      inputs.push_back(w);
    }
    array out(x.shape(), mlx::core::float32, std::make_shared<RmsNorm>(st, eps, has_w), std::move(inputs));
    mlx_array_set_(*res, out);
  });
}

extern "C" int kvsplit_cpu_rope(mlx_array* res, const mlx_array x_, int dims, bool traditional, float base,
                                float scale, int offset, const mlx_array freqs_, const mlx_stream s_) {
  return guarded([&] {
    const array& x = mlx_array_get_(x_);
    const Stream st = mlx_stream_get_(s_);
    require(x.ndim() >= 2 && x.dtype() == mlx::core::float32, "kvsplit rope: x must be float32 [..., L, D]");
    require(dims > 0 && dims % 2 == 0 && dims <= x.shape(-1),
            "kvsplit rope: dims " + std::to_string(dims) + " must be even and at most " + std::to_string(x.shape(-1)));
    const bool has_f = freqs_.ctx != nullptr;
    std::vector<array> inputs{x};
    if (has_f) {
      const array& f = mlx_array_get_(freqs_);
      require(f.ndim() == 1 && f.shape(0) == dims / 2 && f.dtype() == mlx::core::float32,
              "kvsplit rope: freqs must be float32 [dims/2]");
      inputs.push_back(f);
    } else {
      require(base > 0.0f, "kvsplit rope: base must be positive without freqs");
    }
    RopeParams p{dims, traditional, base, scale, offset, has_f};
    array out(x.shape(), mlx::core::float32, std::make_shared<Rope>(st, p), std::move(inputs));
    mlx_array_set_(*res, out);
  });
}

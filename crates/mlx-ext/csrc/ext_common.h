// What every primitive's C entry point shares: errors become a return code and a per-thread
// message instead of crossing the C boundary as exceptions.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"

namespace kvsplit {

std::string& last_error();

template <class F>
int guarded(F&& f) {
  try {
    f();
    last_error().clear();
    return 0;
  } catch (const std::exception& e) {
    last_error() = e.what();
    return 1;
  }
}

// Our primitives have CPU kernels only; on another device they say so by name.
class CpuPrimitive : public mlx::core::UnaryPrimitive {
 public:
  using mlx::core::UnaryPrimitive::UnaryPrimitive;
  void eval_gpu(const std::vector<mlx::core::array>&, mlx::core::array&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU backend only");
  }
};

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

// Offsets of every row (all axes but the last) of a possibly strided array, in elements.
inline std::vector<int64_t> row_offsets(const mlx::core::array& a) {
  const int nd = int(a.ndim());
  int64_t rows = 1;
  for (int i = 0; i + 1 < nd; ++i) rows *= a.shape(i);
  std::vector<int64_t> off(rows);
  std::vector<int> idx(nd > 1 ? nd - 1 : 0, 0);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t o = 0;
    for (int i = 0; i + 1 < nd; ++i) o += int64_t(idx[i]) * a.strides()[i];
    off[r] = o;
    for (int i = nd - 2; i >= 0; --i) {
      if (++idx[i] < a.shape(i)) break;
      idx[i] = 0;
    }
  }
  return off;
}

}  // namespace kvsplit

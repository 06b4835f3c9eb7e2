// MLX primitives for the CPU backend: a quantized matrix-vector product and decode attention
// over a packed split-precision KV cache. MLX 0.32.2's own CPU `quantized_matmul` is scalar
// code and its ops cannot read packed codes without widening whole blocks to f32 first; a
// `Primitive` subclass is MLX's extension point for kernels of one's own (the mechanism of its
// "Custom Extensions" guide), and it links against the stock libmlx.
#include "kvsplit_ext.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "ext_common.h"
#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/stream.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace kvsplit {

using mlx::core::array;
using mlx::core::Primitive;
using mlx::core::Stream;
using mlx::core::UnaryPrimitive;

// ---- element order of packed units (kernels.cpp explains it) ----

void permute(const float* x, int n, int bits, float* out) {
  const int per = phases_of(bits), unit = 8 * per;
  for (int e = 0; e < n; ++e) {
    const int u = e / unit, w = e % unit;
    out[u * unit + (w % per) * 8 + w / per] = x[e];
  }
}

void unpermute(const float* x, int n, int bits, float* out) {
  const int per = phases_of(bits), unit = 8 * per;
  for (int e = 0; e < n; ++e) {
    const int u = e / unit, w = e % unit;
    out[e] = x[u * unit + (w % per) * 8 + w / per];
  }
}

namespace {

// Bytes a kernel call must read before it is worth waking the pool's workers.
constexpr int64_t kParallelBytes = 512 * 1024;

// The engine's `--cpu-build generic` forces the baseline build (tests compare both); set through
// kvsplit_ext_configure, read on every call, so it is an atomic and not a static.
std::atomic<bool> g_force_generic{false};
// 0: one thread per core. Fixed when the pool is first used.
std::atomic<int> g_threads{0};

bool use_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool cpu_has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                              __builtin_cpu_supports("f16c");
  return cpu_has && !g_force_generic.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

void matvec(const float* xp, const float* xsum, int rows, int k, const PackedRows& w, int r0, int r1, float* y,
            int64_t ldy) {
#if defined(KVSPLIT_HAVE_AVX2)
  if (use_avx2()) return avx2::matvec(xp, xsum, rows, k, w, r0, r1, y, ldy);
#endif
  generic::matvec(xp, xsum, rows, k, w, r0, r1, y, ldy);
}

void attend_block(const float* qp, const float* qsum, int rows, int d, const PackedRows& k, const PackedRows& v,
                  int64_t t0, int64_t t1, float* m, float* l, float* out, float* scratch, float softcap) {
#if defined(KVSPLIT_HAVE_AVX2)
  if (use_avx2()) return avx2::attend_block(qp, qsum, rows, d, k, v, t0, t1, m, l, out, scratch, softcap);
#endif
  generic::attend_block(qp, qsum, rows, d, k, v, t0, t1, m, l, out, scratch, softcap);
}

void attend_tile(const float* qp, int rows, int rep, int d, const TileSource& src, int64_t t0, int64_t t1,
                 int64_t first_pos, float* m, float* l, float* out, float* scratch, float softcap) {
#if defined(KVSPLIT_HAVE_AVX2)
  if (use_avx2()) return avx2::attend_tile(qp, rows, rep, d, src, t0, t1, first_pos, m, l, out, scratch, softcap);
#endif
  generic::attend_tile(qp, rows, rep, d, src, t0, t1, first_pos, m, l, out, scratch, softcap);
}

void attend_block_channels(const float* q, int rows, int d, const PackedRows& kt, const PackedRows& v, int64_t t0,
                           int64_t t1, float* m, float* l, float* out, float* scratch, float softcap) {
#if defined(KVSPLIT_HAVE_AVX2)
  if (use_avx2()) return avx2::attend_block_channels(q, rows, d, kt, v, t0, t1, m, l, out, scratch, softcap);
#endif
  generic::attend_block_channels(q, rows, d, kt, v, t0, t1, m, l, out, scratch, softcap);
}

void attend_float_block(const float* q, int rows, int d, const float* k, int64_t k_stride, const float* v,
                        int64_t v_stride, int n, int v_bits, float* m, float* l, float* out, float* scratch, float softcap) {
#if defined(KVSPLIT_HAVE_AVX2)
  if (use_avx2()) return avx2::attend_float_block(q, rows, d, k, k_stride, v, v_stride, n, v_bits, m, l, out, scratch, softcap);
#endif
  generic::attend_float_block(q, rows, d, k, k_stride, v, v_stride, n, v_bits, m, l, out, scratch, softcap);
}

void attend_half_block(const float* q, int rows, int d, const uint16_t* k, int64_t k_stride, const uint16_t* v,
                       int64_t v_stride, int n, float* m, float* l, float* out, float* scratch, float softcap) {
#if defined(KVSPLIT_HAVE_AVX2)
  if (use_avx2()) return avx2::attend_half_block(q, rows, d, k, k_stride, v, v_stride, n, m, l, out, scratch, softcap);
#endif
  generic::attend_half_block(q, rows, d, k, k_stride, v, v_stride, n, m, l, out, scratch, softcap);
}

void dequantize_rows(const PackedRows& w, int k, int64_t r0, int64_t r1, float* out) {
#if defined(KVSPLIT_HAVE_AVX2)
  if (use_avx2()) return avx2::dequantize_rows(w, k, r0, r1, out);
#endif
  generic::dequantize_rows(w, k, r0, r1, out);
}

// ---- a small thread pool ----
// MLX runs one CPU task at a time per stream, so a kernel may use every core. Workers spin
// briefly before sleeping: a decode step calls these kernels back to back with short MLX ops in
// between, and waking a sleeping thread costs tens of microseconds.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = [] {
      started_.store(true);
      return new Pool(thread_count());  // never destroyed: workers outlive main's statics
    }();
    return *pool;
  }

  static int thread_count() {
    int n = g_threads.load();
    if (n >= 1) return std::min(n, 256);
    return std::max(1u, std::thread::hardware_concurrency());
  }

  static bool started() { return started_.load(); }

  int size() const { return int(workers_.size()) + 1; }

  // `parallel` false runs every item on the calling thread: below a few hundred KB of reads,
  // waking the workers costs more than they save.
  void run(int n, const std::function<void(int)>& f, bool parallel = true) {
    if (workers_.empty() || n <= 1 || !parallel) {
      for (int i = 0; i < n; ++i) f(i);
      return;
    }
    // One job at a time: MLX may evaluate on several threads at once (each caller thread has
    // its own CPU stream), and the pool has one job slot. Two callers sharing it waited for each
    // other's workers forever (seen with parallel tests).
    std::lock_guard<std::mutex> one_job(run_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &f;
      njobs_ = n;
      next_.store(0);
      pending_.store(int(workers_.size()));
      gen_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    drain();
    auto start = std::chrono::steady_clock::now();
    while (pending_.load(std::memory_order_acquire) != 0) {
      if (std::chrono::steady_clock::now() - start > std::chrono::microseconds(200)) {
        std::unique_lock<std::mutex> lock(mu_);
        done_.wait(lock, [&] { return pending_.load() == 0; });
        break;
      }
    }
  }

 private:
  static inline std::atomic<bool> started_{false};
  std::mutex run_mu_;
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
    for (auto& w : workers_) w.detach();
  }

  void drain() {
    for (int i; (i = next_.fetch_add(1)) < njobs_;) (*job_)(i);
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      while (gen_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() - start < std::chrono::microseconds(50)) {
      }
      if (gen_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return gen_.load() != seen; });
      }
      seen = gen_.load(std::memory_order_acquire);
      drain();
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);
        done_.notify_all();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<int> next_{0};
  int njobs_ = 0;
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> gen_{0};
};

// ---- checks shared by both primitives ----

void check_bits_group(const char* what, int bits, int group, int len) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 6 && bits != 8)
    throw std::invalid_argument(std::string(what) + ": bits must be 2, 3, 4, 6 or 8, got " + std::to_string(bits));
  const int unit = unit_elems_of(bits);  // elements in one packed unit
  if (group <= 0 || group % unit != 0 || len % group != 0)
    throw std::invalid_argument(std::string(what) + ": group size " + std::to_string(group) +
                                " must be a multiple of " + std::to_string(unit) + " and divide " +
                                std::to_string(len));
}

void check_scale_dtype(const char* what, const array& s, const array& b) {
  using mlx::core::float16;
  using mlx::core::float32;
  if (s.dtype() != b.dtype() || (s.dtype() != float32 && s.dtype() != float16))
    throw std::invalid_argument(std::string(what) + ": scales and biases must both be float32 or float16");
}

// A soft-capping value as the kernels take it: 0 (none) or a finite positive cap.
float checked_softcap(const char* what, float softcap) {
  require(softcap == 0.0f || (std::isfinite(softcap) && softcap > 0.0f),
          std::string(what) + ": softcap " + std::to_string(softcap) + " must be positive and finite (0: none)");
  return softcap;
}

// Every axis but the last may be strided (cache views); the last must be dense.
void check_last_dense(const char* what, const array& a) {
  if (a.ndim() > 0 && a.shape(-1) > 1 && a.strides()[a.ndim() - 1] != 1)
    throw std::invalid_argument(std::string(what) + ": the last axis must be contiguous");
}

PackedRows packed_rows(const array& w, const array& s, const array& b, int group, int bits, int64_t w_off,
                       int64_t sb_off, int token_axis) {
  PackedRows p;
  p.w = reinterpret_cast<const uint8_t*>(w.data<uint32_t>() + w_off);
  p.row_bytes = int64_t(w.strides()[token_axis]) * 4;
  p.f16 = s.dtype() == mlx::core::float16;
  const size_t esize = p.f16 ? 2 : 4;
  p.scales = static_cast<const char*>(s.data<void>()) + sb_off * esize;
  p.biases = static_cast<const char*>(b.data<void>()) + sb_off * esize;
  p.sb_stride = s.strides()[token_axis];
  if (b.strides()[token_axis] != p.sb_stride || b.strides() != s.strides())
    throw std::invalid_argument("scales and biases must share one layout");
  p.group = group;
  p.bits = bits;
  return p;
}

// An MXFP4 matrix: u32 codes as MLX's 4-bit packing, u8 (e8m0) scales per group of 32.
PackedRows mxfp4_rows(const array& w, const array& s) {
  PackedRows p;
  p.w = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
  p.row_bytes = int64_t(w.strides()[0]) * 4;
  p.scales = s.data<uint8_t>();
  p.biases = nullptr;
  p.sb_stride = s.strides()[0];
  p.f16 = false;
  p.group = 32;
  p.bits = 4;
  p.mxfp4 = true;
  return p;
}

// ---- primitives over one packed matrix: a group size and a bit width (affine: inputs w,
// scales, biases; MXFP4: w, scales) ----

class PackedMatrixPrimitive : public CpuPrimitive {
 public:
  PackedMatrixPrimitive(Stream s, int group, int bits, bool mxfp4 = false)
      : CpuPrimitive(s), group_(group), bits_(bits), mxfp4_(mxfp4) {}

  bool is_equivalent(const Primitive& other) const override {
    auto* o = dynamic_cast<const PackedMatrixPrimitive*>(&other);
    return o != nullptr && std::string(name()) == o->name() && group_ == o->group_ && bits_ == o->bits_ &&
           mxfp4_ == o->mxfp4_;
  }

 protected:
  // The weight's inputs from `first` on as the kernels read them.
  PackedRows rows_of(const std::vector<array>& in, size_t first) const {
    return mxfp4_ ? mxfp4_rows(in[first], in[first + 1])
                  : packed_rows(in[first], in[first + 1], in[first + 2], group_, bits_, 0, 0, 0);
  }

  int group_, bits_;
  bool mxfp4_;
};

// ---- y = x W^T ----

class QuantizedMatVec : public PackedMatrixPrimitive {
 public:
  using PackedMatrixPrimitive::PackedMatrixPrimitive;

  void eval_cpu(const std::vector<array>& in, array& out) override {
    const array &x = in[0], &w = in[1];
    for (size_t i = 1; i < in.size(); ++i)
      if (!in[i].flags().row_contiguous) throw std::invalid_argument("kvsplit quantized_matvec: weights must be row-contiguous");
    // x may be any view: its few rows are gathered into the permuted copy anyway.
    std::vector<int64_t> xrows = row_offsets(x);
    const int64_t xlast = x.strides()[x.ndim() - 1];
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    const int k = x.shape(-1), n = w.shape(0);
    const int rows = int(x.size() / k);
    PackedRows pw = rows_of(in, 1);
    auto& enc = mlx::core::cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    enc.set_output_array(out);
    enc.dispatch([xd = x.data<float>(), y = out.data<float>(), pw, k, n, rows, xrows = std::move(xrows), xlast,
                  group = group_, bits = bits_]() {
      const int ng = k / group;
      std::vector<float> xp(size_t(rows) * k), xsum(size_t(rows) * ng, 0.0f), xm(k);
      for (int m = 0; m < rows; ++m) {
        for (int e = 0; e < k; ++e) xm[e] = xd[xrows[m] + e * xlast];
        permute(xm.data(), k, bits, xp.data() + int64_t(m) * k);
        for (int e = 0; e < k; ++e) xsum[m * ng + e / group] += xm[e];
      }
      Pool& pool = Pool::get();
      const int chunk = std::max(16, (n + pool.size() * 8 - 1) / (pool.size() * 8));
      const int items = (n + chunk - 1) / chunk;
      pool.run(
          items,
          [&](int i) {
            const int r0 = i * chunk, r1 = std::min(n, r0 + chunk);
            matvec(xp.data(), xsum.data(), rows, k, pw, r0, r1, y, n);
          },
          int64_t(n) * pw.row_bytes >= kParallelBytes);
    });
  }

  const char* name() const override { return "KvsplitQuantizedMatVec"; }
};

// ---- W as f32 ----
// For many rows of x (prefill), y = x . dequantize(W)^T through BLAS: MLX's own CPU dequantize
// costs about 1.7 ns per element, twice the matmul it feeds at 64 rows. The kernels unpack a row
// in their permuted unit order; each row is put back in natural order through a small buffer
// (a gather of x into that order instead cost MLX's slow CPU `take` on every call).

class Dequantize : public PackedMatrixPrimitive {
 public:
  using PackedMatrixPrimitive::PackedMatrixPrimitive;

  void eval_cpu(const std::vector<array>& in, array& out) override {
    for (const array& a : in)
      if (!a.flags().row_contiguous) throw std::invalid_argument("kvsplit dequantize: inputs must be row-contiguous");
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    const int n = out.shape(0), k = out.shape(1);
    PackedRows pw = rows_of(in, 0);
    auto& enc = mlx::core::cpu::get_command_encoder(stream());
    enc.set_output_array(out);
    // One thread: the work is a few instructions per 8 elements, and woken pool workers would
    // spin on the cores BLAS needs for the matmul that follows (measured: 512-row prefill
    // 216 tok/s with the pool, against 281 before this primitive existed).
    enc.dispatch([y = out.data<float>(), pw, k, n, bits = bits_]() {
      const int per = phases_of(bits), unit = 8 * per;
      std::vector<float> row(k);
      for (int r = 0; r < n; ++r) {
        dequantize_rows(pw, k, r, r + 1, row.data());
        float* o = y + int64_t(r) * k;
        for (int u0 = 0; u0 < k; u0 += unit)
          for (int j = 0; j < per; ++j)
            for (int i = 0; i < 8; ++i) o[u0 + i * per + j] = row[u0 + j * 8 + i];
      }
    });
  }

  const char* name() const override { return "KvsplitDequantize"; }
};

// ---- decode attention over a packed cache ----

// `k_channels`: keys are stored per channel (K^T rows, groups of `k_group` tokens), and
// `tail` float tokens follow the packed ones.
// `dense`: no packed tokens, keys and values are 16-bit float rows (a dense cache; v_bits 8 makes
// the values' order the natural one).
struct AttnParams {
  int len, k_group, k_bits, v_group, v_bits;
  bool k_channels = false;
  int tail = 0;
  bool dense = false;
  // Query token i of L sits at position len - L + i and sees tokens 0..=that (a prefill chunk
  // whose own tokens are already in the cache). Per-token keys, no tail.
  bool causal = false;
  // Paged per-channel calls: float rows every sequence keeps before its tail (`--kv-sinks`),
  // not counted in the table's lengths.
  int lead = 0;
  // 0: plain scores; else Gemma 2's soft-capping of every scaled score (kernels.h).
  float softcap = 0.0f;
  // Per-channel keys: the body slot ranges [a, b) read instead of [0, len) (a ring's visible
  // window: b a multiple of k_group, a anywhere), empty for [0, len).
  std::vector<std::pair<int64_t, int64_t>> ranges;
};

// A run of tokens [t0, t1) of one head (`bh`, a (sequence, KV head) pair) in contiguous rows,
// packed (keys per token or per channel) or, for `Float`, float rows at tk / tv.
// `Half`: f16 rows at hk / hv (strides in the float fields).
struct AttnItem {
  enum Kind { Tokens, Channels, Float, Half };
  int bh;
  PackedRows k, v;
  int64_t t0, t1;
  Kind kind = Tokens;
  const float *tk = nullptr, *tv = nullptr;
  int64_t tk_stride = 0, tv_stride = 0;
  const uint16_t *hk = nullptr, *hv = nullptr;
};

// Work items of one head over the body's ranges: blocks of `block` tokens; with per-channel
// keys (`block` a multiple of the key group) cut at group edges, so only a range's first item
// can start inside a group.
void body_items(std::vector<AttnItem>& items, int head, const PackedRows& k, const PackedRows& v, const AttnParams& p,
                int64_t block) {
  auto add = [&](int64_t a, int64_t b) {
    for (int64_t t0 = a; t0 < b;) {
      const int64_t t1 = std::min(b, p.k_channels ? t0 / p.k_group * p.k_group + block : t0 + block);
      AttnItem it{head, k, v, t0, t1};
      it.kind = p.k_channels ? AttnItem::Channels : AttnItem::Tokens;
      items.push_back(it);
      t0 = t1;
    }
  };
  if (p.ranges.empty()) return add(0, p.len);
  for (auto [a, b] : p.ranges) add(a, b);
}

// Tokens the body's ranges hold.
int64_t range_tokens(const AttnParams& p) {
  if (p.ranges.empty()) return p.len;
  int64_t n = 0;
  for (auto [a, b] : p.ranges) n += b - a;
  return n;
}

// Reads `n` ranges [a, b) from `flat` (2n ints) after checking them against a per-channel body
// of `cap` slots in groups of `group` tokens.
std::vector<std::pair<int64_t, int64_t>> checked_ranges(const char* what, const int* flat, int n, int64_t cap, int group) {
  std::vector<std::pair<int64_t, int64_t>> r;
  require(n >= 0 && (n == 0 || flat != nullptr), std::string(what) + ": body ranges missing");
  for (int i = 0; i < n; ++i) {
    const int64_t a = flat[2 * i], b = flat[2 * i + 1];
    require(0 <= a && a < b && b <= cap && b % group == 0,
            std::string(what) + ": body range " + std::to_string(a) + ".." + std::to_string(b) +
                " must lie in 0.." + std::to_string(cap) + " and end on a key group of " + std::to_string(group));
    r.emplace_back(a, b);
  }
  return r;
}

// The query rows of every head: permuted for per-token keys' bits with per-group sums, and in
// natural order where per-channel keys or float tokens read them.
struct Queries {
  std::vector<float> qp, qsum, qn;
};

Queries permute_queries(const float* qd, const std::vector<int64_t>& qrows, int64_t qlast, int n, int d, const AttnParams& p) {
  Queries q;
  std::vector<float> qrow(d);
  const bool natural_only = p.k_channels || p.dense;
  if (natural_only || p.tail > 0) q.qn.resize(size_t(n) * d);
  // Per-channel groups run along tokens: k_group says nothing about head_dim there.
  const int kng = natural_only ? 0 : d / p.k_group;
  if (!natural_only) q.qp.resize(size_t(n) * d), q.qsum.assign(size_t(n) * kng, 0.0f);
  for (int64_t r = 0; r < n; ++r) {
    for (int e = 0; e < d; ++e) qrow[e] = qd[qrows[r] + e * qlast];
    if (!q.qn.empty()) std::copy(qrow.begin(), qrow.end(), q.qn.begin() + r * d);
    if (natural_only) continue;
    permute(qrow.data(), d, p.k_bits, q.qp.data() + r * d);
    for (int e = 0; e < d; ++e) q.qsum[r * kng + e / p.k_group] += qrow[e];
  }
  return q;
}

// Runs every item on the pool (items of one head must be adjacent), then merges each head's
// items with their running maxima and writes row r of head h to o[(h * rows + r) * d].
void attend_items(const Queries& q, const std::vector<AttnItem>& items, int heads, int rows, int d, const AttnParams& p,
                  float* o, bool parallel) {
  const int kng = p.k_channels || p.dense ? 0 : d / p.k_group;
  const int stride = rows * (d + 2);  // per item: m, l, then out
  std::vector<float> parts(items.size() * size_t(stride));
  Pool::get().run(int(items.size()), [&](int i) {
    const AttnItem& it = items[i];
    float* part = parts.data() + int64_t(i) * stride;
    if (it.t0 >= it.t1) {
      for (int r = 0; r < rows; ++r) part[r] = -INFINITY, part[rows + r] = 0.0f;
      return;
    }
    thread_local std::vector<float> scratch;
    const int64_t n = it.t1 - it.t0;
    float *m = part, *l = part + rows, *out = part + 2 * rows;
    switch (it.kind) {
      case AttnItem::Tokens:
        scratch.resize(size_t(rows) * (2 * n + d) + 2 * size_t(n));
        attend_block(q.qp.data() + int64_t(it.bh) * rows * d, q.qsum.data() + int64_t(it.bh) * rows * kng, rows, d,
                     it.k, it.v, it.t0, it.t1, m, l, out, scratch.data(), p.softcap);
        break;
      case AttnItem::Channels:
        // A first item may start inside its key group, which is scored whole.
        scratch.resize(size_t(channel_scratch(rows, d, n + it.t0 % it.k.group)));
        attend_block_channels(q.qn.data() + int64_t(it.bh) * rows * d, rows, d, it.k, it.v, it.t0, it.t1, m, l, out,
                              scratch.data(), p.softcap);
        break;
      case AttnItem::Float:
        scratch.resize(size_t(rows) * n + d);
        attend_float_block(q.qn.data() + int64_t(it.bh) * rows * d, rows, d, it.tk + it.t0 * it.tk_stride,
                           it.tk_stride, it.tv + it.t0 * it.tv_stride, it.tv_stride, int(n), p.v_bits, m, l, out,
                           scratch.data(), p.softcap);
        break;
      case AttnItem::Half:
        scratch.resize(size_t(half_scratch(rows, d, n)) + d);
        attend_half_block(q.qn.data() + int64_t(it.bh) * rows * d, rows, d, it.hk + it.t0 * it.tk_stride, it.tk_stride,
                          it.hv + it.t0 * it.tv_stride, it.tv_stride, int(n), m, l, out, scratch.data(), p.softcap);
        // f16 rows beside packed values (a per-channel cache's tail): their output joins the
        // packed items' merge in the values' permuted order. A dense cache has no packed values.
        if (!p.dense) {
          float* nat = scratch.data() + half_scratch(rows, d, n);
          for (int r = 0; r < rows; ++r) {
            std::copy(out + int64_t(r) * d, out + int64_t(r + 1) * d, nat);
            permute(nat, d, p.v_bits, out + int64_t(r) * d);
          }
        }
        break;
    }
  }, parallel);
  std::vector<float> acc(d);
  size_t first = 0;
  for (int h = 0; h < heads; ++h) {
    size_t last = first;
    while (last < items.size() && items[last].bh == h) ++last;
    for (int r = 0; r < rows; ++r) {
      float mx = -INFINITY;
      for (size_t c = first; c < last; ++c) mx = std::max(mx, parts[c * stride + r]);
      std::fill(acc.begin(), acc.end(), 0.0f);
      float den = 0.0f;
      for (size_t c = first; c < last; ++c) {
        const float* part = parts.data() + c * stride;
        if (part[rows + r] == 0.0f) continue;
        const float a = std::exp(part[r] - mx);
        den += a * part[rows + r];
        const float* po = part + 2 * rows + int64_t(r) * d;
        for (int e = 0; e < d; ++e) acc[e] += a * po[e];
      }
      for (float& v : acc) v /= den;
      unpermute(acc.data(), d, p.v_bits, o + (int64_t(h) * rows + r) * d);
    }
    first = last;
  }
}

// Tokens per work item when `bh` heads attend over `t` tokens: enough blocks for every thread
// to get several, none shorter than 64 tokens or longer than 2048.
int64_t token_block(int64_t t, int bh) {
  int64_t per_head = std::max<int64_t>(1, (int64_t(Pool::get().size()) * 4 + bh - 1) / bh);
  per_head = std::min<int64_t>(per_head, (t + 63) / 64);
  per_head = std::max<int64_t>(per_head, (t + 2047) / 2048);
  return (t + per_head - 1) / per_head;
}

// Query tokens per work item of a causal prefill: rep * kCausalTile rows share every block they
// widen (48 rows for SmolLM2's rep 3), and a 512-token chunk gives each of 3 KV heads 32 items
// to spread over the threads.
constexpr int kCausalTile = 16;
// Tokens per key block of a causal item: a block's scores (rows x 256 f32) stay in L2.
constexpr int64_t kCausalBlock = 256;

// Causal prefill over a packed per-token or a 16-bit dense cache: work item = (head, tile of
// query tokens). The tile's first token at position P0 sees tokens [0, P0] like every later row
// of the tile, so [0, P0) runs in unmasked blocks and [P0, P1) as one masked block, all merged
// in the item by their running maxima: no partial results leave the item. Each block is widened
// to f32 once per tile (1/rows of the multiply-adds) and multiplied in register tiles, with no
// horizontal sums.
void attend_causal(const float* qd, const std::vector<int64_t>& qrows, int64_t qlast, int bh, int rep, int l, int d,
                   const std::vector<TileSource>& heads, const AttnParams& p, float* o, bool parallel) {
  // Rows in tile order (head, token, query head) so a tile's rows are contiguous.
  std::vector<int64_t> tiled(qrows.size());
  for (int h = 0; h < bh; ++h)
    for (int i = 0; i < l; ++i)
      for (int j = 0; j < rep; ++j) tiled[(int64_t(h) * l + i) * rep + j] = qrows[(int64_t(h) * rep + j) * l + i];
  const Queries q = permute_queries(qd, tiled, qlast, bh * rep * l, d, p);
  const int tiles = (l + kCausalTile - 1) / kCausalTile;
  Pool::get().run(bh * tiles, [&](int item) {
    const int h = item / tiles, i0 = (item % tiles) * kCausalTile, i1 = std::min(l, i0 + kCausalTile);
    const int rows = rep * (i1 - i0);
    const int64_t first = p.len - l + i0, end = p.len - l + i1;
    // Packed keys read the queries permuted for their bits; f16 rows read them as they are.
    const float* qp = (p.dense ? q.qn : q.qp).data() + (int64_t(h) * l + i0) * rep * d;
    const TileSource& src = heads[h];
    thread_local std::vector<float> scratch, state;
    const int64_t most = std::max<int64_t>(kCausalBlock, end - first);
    scratch.resize(size_t(tile_scratch(rows, d, most)));
    // Running max, denominator and output of the item, then the block's own.
    state.assign(size_t(rows) * (d + 2) * 2, 0.0f);
    float *m = state.data(), *den = m + rows, *acc = den + rows;
    float *bm = acc + int64_t(rows) * d, *bl = bm + rows, *bo = bl + rows;
    std::fill(m, m + rows, -INFINITY);
    auto merge = [&] {
      for (int r = 0; r < rows; ++r) {
        const float mx = std::max(m[r], bm[r]);
        const float a = std::exp(m[r] - mx), b = std::exp(bm[r] - mx);
        den[r] = den[r] * a + bl[r] * b;
        m[r] = mx;
        float* ar = acc + int64_t(r) * d;
        const float* br = bo + int64_t(r) * d;
        for (int e = 0; e < d; ++e) ar[e] = ar[e] * a + br[e] * b;
      }
    };
    for (int64_t t0 = 0; t0 < first; t0 += kCausalBlock) {
      attend_tile(qp, rows, rep, d, src, t0, std::min(first, t0 + kCausalBlock), -1, bm, bl, bo, scratch.data(), p.softcap);
      merge();
    }
    attend_tile(qp, rows, rep, d, src, first, end, first, bm, bl, bo, scratch.data(), p.softcap);
    merge();
    for (int r = 0; r < rows; ++r) {
      float* ar = acc + int64_t(r) * d;
      for (int e = 0; e < d; ++e) ar[e] /= den[r];
      const int i = i0 + r / rep, j = r % rep;
      unpermute(ar, d, p.v_bits, o + ((int64_t(h) * rep + j) * l + i) * d);
    }
  }, parallel);
}

// Queues attend_causal for `q` (in[0]) over `heads` on the primitive's stream.
void dispatch_causal(Stream st, const array& q, std::vector<TileSource> heads, int hkv, const AttnParams& p,
                     array& out) {
  std::vector<int64_t> qrows = row_offsets(q);
  const int64_t qlast = q.strides()[3];
  const int b = q.shape(0), hq = q.shape(1), l = q.shape(2), d = q.shape(3);
  const int rep = hq / hkv;
  auto& enc = mlx::core::cpu::get_command_encoder(st);
  enc.set_input_array(q);
  enc.set_output_array(out);
  enc.dispatch([qd = q.data<float>(), o = out.data<float>(), heads = std::move(heads), p, rep, l, d,
                qrows = std::move(qrows), qlast, bh = b * hkv]() {
    // Multiply-adds of the chunk: each query row against about len - L/2 tokens.
    const int64_t work = int64_t(bh) * rep * l * (p.len - l / 2) * d;
    attend_causal(qd, qrows, qlast, bh, rep, l, d, heads, p, o, work >= kParallelBytes);
  });
}

class QuantizedDecodeAttention : public CpuPrimitive {
 public:
  QuantizedDecodeAttention(Stream s, AttnParams p) : CpuPrimitive(s), p_(p) {}

  void eval_cpu(const std::vector<array>& in, array& out) override {
    if (p_.causal) return eval_causal(in, out);
    const array& q = in[0];
    std::vector<int64_t> qrows = row_offsets(q);  // [B, Hq, L] rows of any view
    const int64_t qlast = q.strides()[3];
    for (size_t i = 1; i < in.size(); ++i) check_last_dense("kvsplit decode attention: cache", in[i]);
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    const int b = q.shape(0), hq = q.shape(1), l = q.shape(2), d = q.shape(3);
    const int hkv = in[1].shape(1), rep = hq / hkv, rows = rep * l;
    const int bh = b * hkv;
    int64_t block = token_block(std::max<int64_t>(range_tokens(p_), 1), bh);
    // Per-channel codes can only be cut between token groups (len is a whole number of them).
    if (p_.k_channels) block = (block + p_.k_group - 1) / p_.k_group * p_.k_group;
    std::vector<AttnItem> items;
    for (int bi = 0; bi < b; ++bi) {
      for (int h = 0; h < hkv; ++h) {
        auto off = [&](const array& a) { return int64_t(bi) * a.strides()[0] + int64_t(h) * a.strides()[1]; };
        // Axis 2 holds tokens in the per-token layout and channels (K^T rows) per channel.
        PackedRows k = packed_rows(in[1], in[2], in[3], p_.k_group, p_.k_bits, off(in[1]), off(in[2]), 2);
        PackedRows v = packed_rows(in[4], in[5], in[6], p_.v_group, p_.v_bits, off(in[4]), off(in[5]), 2);
        body_items(items, bi * hkv + h, k, v, p_, block);
        if (p_.tail > 0) {
          const array &tk = in[7], &tv = in[8];
          AttnItem it{bi * hkv + h, k, v, 0, p_.tail};
          it.kind = AttnItem::Float;
          it.tk = tk.data<float>() + off(tk);
          it.tv = tv.data<float>() + off(tv);
          it.tk_stride = tk.strides()[2];
          it.tv_stride = tv.strides()[2];
          items.push_back(it);
        }
      }
    }
    auto& enc = mlx::core::cpu::get_command_encoder(stream());
    enc.set_input_array(q);
    if (p_.tail > 0) enc.set_input_array(in[7]), enc.set_input_array(in[8]);
    enc.set_output_array(out);
    enc.dispatch([qd = q.data<float>(), o = out.data<float>(), items = std::move(items), p = p_, rows, d,
                  qrows = std::move(qrows), qlast, bh]() {
      const Queries qs = permute_queries(qd, qrows, qlast, bh * rows, d, p);
      const int64_t bytes = (p.len * int64_t(p.k_bits + p.v_bits) / 8 + int64_t(p.tail) * 8) * bh * d;
      attend_items(qs, items, bh, rows, d, p, o, bytes >= kParallelBytes);
    });
  }

  const char* name() const override { return "KvsplitQuantizedDecodeAttention"; }

  bool is_equivalent(const Primitive& other) const override {
    auto& o = static_cast<const QuantizedDecodeAttention&>(other).p_;
    return p_.len == o.len && p_.k_group == o.k_group && p_.k_bits == o.k_bits && p_.v_group == o.v_group &&
           p_.v_bits == o.v_bits && p_.k_channels == o.k_channels && p_.tail == o.tail && p_.causal == o.causal &&
           p_.softcap == o.softcap;
  }

 private:
  void eval_causal(const std::vector<array>& in, array& out) {
    for (size_t i = 1; i < in.size(); ++i) check_last_dense("kvsplit prefill attention: cache", in[i]);
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    const int b = in[0].shape(0), hkv = in[1].shape(1);
    std::vector<TileSource> heads;
    for (int bi = 0; bi < b; ++bi) {
      for (int h = 0; h < hkv; ++h) {
        auto off = [&](const array& a) { return int64_t(bi) * a.strides()[0] + int64_t(h) * a.strides()[1]; };
        TileSource src;
        src.k = packed_rows(in[1], in[2], in[3], p_.k_group, p_.k_bits, off(in[1]), off(in[2]), 2);
        src.v = packed_rows(in[4], in[5], in[6], p_.v_group, p_.v_bits, off(in[4]), off(in[5]), 2);
        heads.push_back(src);
      }
    }
    dispatch_causal(stream(), in[0], std::move(heads), hkv, p_, out);
  }

  AttnParams p_;
};

// One token's row of D floats quantized as MLX's CPU `quantize` does (same formulas, order and
// rounding, so the codes and the f16 scales match `mx.quantize` then `astype(float16)` bit for
// bit): per group the min and max, a signed scale from the edge of larger magnitude, codes
// rint((x - bias) / scale) clamped to 2^bits - 1, packed as MLX's little-endian bit stream.
template <typename S>
void quantize_token(const float* x, int d, int group, int bits, uint8_t* codes, S* scales, S* biases) {
  const float n_bins = float((1 << bits) - 1);
  std::fill(codes, codes + int64_t(d) * bits / 8, uint8_t(0));
  for (int g = 0; g < d / group; ++g) {
    const float* w = x + int64_t(g) * group;
    float w_min = std::numeric_limits<float>::infinity(), w_max = -w_min;
    for (int j = 0; j < group; ++j) w_max = std::max(w_max, w[j]), w_min = std::min(w_min, w[j]);
    const bool mask = std::abs(w_min) > std::abs(w_max);
    float scale = std::max((w_max - w_min) / n_bins, 1e-7f);
    scale = mask ? scale : -scale;
    const float edge = mask ? w_min : w_max;
    const float q0 = std::rint(edge / scale);
    float bias = 0;
    if (q0 != 0) scale = edge / q0, bias = edge;
    scales[g] = static_cast<S>(scale);
    biases[g] = static_cast<S>(bias);
    for (int j = 0; j < group; ++j) {
      uint32_t c = uint32_t(std::min(std::max(std::rint((w[j] - bias) / scale), 0.0f), n_bins));
      for (int64_t p = int64_t(g * group + j) * bits, left = bits; left > 0;) {
        const int off = int(p % 8), take = std::min<int>(8 - off, int(left));
        codes[p / 8] |= uint8_t((c & ((1u << take) - 1)) << off);
        c >>= take, p += take, left -= take;
      }
    }
  }
}

// The decode step of a packed per-token cache: the new token's K and V (`[B, Hkv, 1, D]` f32)
// are quantized into row `len - 1` of the cache buffers, in place, then every query attends over
// the first `len` tokens as QuantizedDecodeAttention does, all in one op: the MLX-ops write is a
// `quantize` and three slice updates each for K and V. The write happens on the stream, in order
// after every earlier reader of the buffers, so nothing reads a half-written row.
class QuantizedDecodeStep : public CpuPrimitive {
 public:
  QuantizedDecodeStep(Stream s, AttnParams p) : CpuPrimitive(s), p_(p) {}

  void eval_cpu(const std::vector<array>& in, array& out) override {
    const array& q = in[0];
    std::vector<int64_t> qrows = row_offsets(q);
    const int64_t qlast = q.strides()[3];
    for (size_t i = 1; i < in.size(); ++i) check_last_dense("kvsplit decode step: cache", in[i]);
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    const int b = q.shape(0), hq = q.shape(1), l = q.shape(2), d = q.shape(3);
    const int hkv = in[1].shape(1), rows = hq / hkv * l, bh = b * hkv;
    const int64_t t = p_.len, slot = t - 1;
    const int64_t block = token_block(t, bh);
    std::vector<AttnItem> items;
    // Where each (sequence, head) row `slot` of K and V goes, and the new token's floats.
    struct Write {
      uint8_t* codes;
      void *scales, *biases;
      const float* x;
      int group, bits;
    };
    std::vector<Write> writes;
    const bool f16 = in[2].dtype() == mlx::core::float16;
    for (int bi = 0; bi < b; ++bi) {
      for (int h = 0; h < hkv; ++h) {
        auto off = [&](const array& a) { return int64_t(bi) * a.strides()[0] + int64_t(h) * a.strides()[1]; };
        PackedRows k = packed_rows(in[1], in[2], in[3], p_.k_group, p_.k_bits, off(in[1]), off(in[2]), 2);
        PackedRows v = packed_rows(in[4], in[5], in[6], p_.v_group, p_.v_bits, off(in[4]), off(in[5]), 2);
        for (int64_t t0 = 0; t0 < t; t0 += block) items.push_back(AttnItem{bi * hkv + h, k, v, t0, std::min(t, t0 + block)});
        for (int kv = 0; kv < 2; ++kv) {
          const PackedRows& r = kv == 0 ? k : v;
          const array& x = in[7 + kv];
          const int64_t sb = slot * r.sb_stride * (f16 ? 2 : 4);
          writes.push_back(Write{const_cast<uint8_t*>(r.w) + slot * r.row_bytes,
                                 const_cast<char*>(static_cast<const char*>(r.scales)) + sb,
                                 const_cast<char*>(static_cast<const char*>(r.biases)) + sb,
                                 x.data<float>() + off(x), r.group, r.bits});
        }
      }
    }
    auto& enc = mlx::core::cpu::get_command_encoder(stream());
    for (const array& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([qd = q.data<float>(), o = out.data<float>(), items = std::move(items), writes = std::move(writes),
                  p = p_, rows, d, qrows = std::move(qrows), qlast, bh, f16]() {
      for (const Write& w : writes) {
        if (f16) {
          quantize_token(w.x, d, w.group, w.bits, w.codes, static_cast<mlx::core::float16_t*>(w.scales),
                         static_cast<mlx::core::float16_t*>(w.biases));
        } else {
          quantize_token(w.x, d, w.group, w.bits, w.codes, static_cast<float*>(w.scales), static_cast<float*>(w.biases));
        }
      }
      const Queries qs = permute_queries(qd, qrows, qlast, bh * rows, d, p);
      const int64_t bytes = p.len * int64_t(p.k_bits + p.v_bits) / 8 * bh * d;
      attend_items(qs, items, bh, rows, d, p, o, bytes >= kParallelBytes);
    });
  }

  const char* name() const override { return "KvsplitQuantizedDecodeStep"; }

  // Never merged with another step: each writes a token.
  bool is_equivalent(const Primitive&) const override { return false; }

 private:
  AttnParams p_;
};

// x <- x H / sqrt(d) for `rows` rows of d floats (d a power of two): H is the Sylvester
// Hadamard matrix (H[i][j] = (-1)^popcount(i & j), symmetric), as mlx-kv's `rotation::hadamard`,
// by the fast transform: d log d adds instead of a d x d product.
void hadamard_rows(float* x, int rows, int d) {
  const float s = 1.0f / std::sqrt(float(d));
  for (int r = 0; r < rows; ++r) {
    float* v = x + int64_t(r) * d;
    for (int h = 1; h < d; h <<= 1)
      for (int i = 0; i < d; i += 2 * h)
        for (int j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = a + b, v[j + h] = a - b;
        }
    for (int e = 0; e < d; ++e) v[e] *= s;
  }
}

// Rows of a float run (a tail or sink buffer), f32 or f16.
struct FloatRows {
  const array* a = nullptr;
  bool f16 = false;
};

// The decode step of a cache with per-channel keys: the new token's K and V (`[B, Hkv, 1, D]`
// f32, unrotated) enter the stored frame (Hadamard-rotated where `rot` says: bit 0 keys, bit 1
// values) and are written into row `row` of the float tail buffers (f32 or f16, rounded as
// `astype` rounds), in place; then every query (f32, scaled, unrotated: rotated here when keys
// are) attends over the sink rows, the packed body's `len` tokens and tail rows 0..=row, and the
// output leaves the values' frame. One op where MLX ops took four rotation products, two tail
// writes with their casts, two tail reads with theirs and two joins of sinks and tail per layer.
class ChannelDecodeStep : public CpuPrimitive {
 public:
  ChannelDecodeStep(Stream s, AttnParams p, int row, int sinks, int rot) : CpuPrimitive(s), p_(p), row_(row), sinks_(sinks), rot_(rot) {}

  void eval_cpu(const std::vector<array>& in, array& out) override {
    const array &q = in[0], &kn = in[1], &vn = in[2], &tk = in[9], &tv = in[10];
    std::vector<int64_t> qrows = row_offsets(q);
    const int64_t qlast = q.strides()[3];
    for (size_t i = 1; i < in.size(); ++i) check_last_dense("kvsplit channel decode step: cache", in[i]);
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    const int b = q.shape(0), hq = q.shape(1), d = q.shape(3);
    const int hkv = in[3].shape(1), rows = hq / hkv, bh = b * hkv;
    int64_t block = token_block(std::max<int64_t>(range_tokens(p_), 1), bh);
    block = (block + p_.k_group - 1) / p_.k_group * p_.k_group;
    const bool tail16 = tk.dtype() == mlx::core::float16;
    const bool sink16 = sinks_ > 0 && in[11].dtype() == mlx::core::float16;
    std::vector<AttnItem> items;
    struct Write {
      void* dst;
      const float* x;
      bool value;
    };
    std::vector<Write> writes;
    for (int bi = 0; bi < b; ++bi) {
      for (int h = 0; h < hkv; ++h) {
        auto off = [&](const array& a) { return int64_t(bi) * a.strides()[0] + int64_t(h) * a.strides()[1]; };
        PackedRows k = packed_rows(in[3], in[4], in[5], p_.k_group, p_.k_bits, off(in[3]), off(in[4]), 2);
        PackedRows v = packed_rows(in[6], in[7], in[8], p_.v_group, p_.v_bits, off(in[6]), off(in[7]), 2);
        const int head = bi * hkv + h;
        body_items(items, head, k, v, p_, block);
        // Float runs: the sinks, then the tail with the new row.
        for (int run = sinks_ > 0 ? 0 : 1; run < 2; ++run) {
          const array &rk = run == 0 ? in[11] : tk, &rv = run == 0 ? in[12] : tv;
          const bool half = run == 0 ? sink16 : tail16;
          AttnItem it{head, k, v, 0, run == 0 ? sinks_ : row_ + 1};
          it.kind = half ? AttnItem::Half : AttnItem::Float;
          if (half) {
            it.hk = reinterpret_cast<const uint16_t*>(rk.data<mlx::core::float16_t>()) + off(rk);
            it.hv = reinterpret_cast<const uint16_t*>(rv.data<mlx::core::float16_t>()) + off(rv);
          } else {
            it.tk = rk.data<float>() + off(rk);
            it.tv = rv.data<float>() + off(rv);
          }
          it.tk_stride = rk.strides()[2];
          it.tv_stride = rv.strides()[2];
          items.push_back(it);
        }
        for (int kv = 0; kv < 2; ++kv) {
          const array &buf = kv == 0 ? tk : tv, &x = kv == 0 ? kn : vn;
          const int64_t at = off(buf) + int64_t(row_) * buf.strides()[2];
          void* dst = tail16 ? static_cast<void*>(const_cast<mlx::core::float16_t*>(buf.data<mlx::core::float16_t>()) + at)
                             : static_cast<void*>(const_cast<float*>(buf.data<float>()) + at);
          writes.push_back(Write{dst, x.data<float>() + off(x), kv == 1});
        }
      }
    }
    auto& enc = mlx::core::cpu::get_command_encoder(stream());
    for (const array& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([qd = q.data<float>(), o = out.data<float>(), items = std::move(items), writes = std::move(writes),
                  p = p_, rows, d, qrows = std::move(qrows), qlast, bh, tail16, rot = rot_]() {
      std::vector<float> x(d);
      for (const Write& w : writes) {
        std::copy(w.x, w.x + d, x.data());
        if (rot & (w.value ? 2 : 1)) hadamard_rows(x.data(), 1, d);
        if (tail16) {
          auto* dst = static_cast<mlx::core::float16_t*>(w.dst);
          for (int e = 0; e < d; ++e) dst[e] = static_cast<mlx::core::float16_t>(x[e]);
        } else {
          std::copy(x.begin(), x.end(), static_cast<float*>(w.dst));
        }
      }
      // The queries in the keys' frame, as contiguous rows.
      const int n = bh * rows;
      std::vector<float> qn(size_t(n) * d);
      std::vector<int64_t> offs(n);
      for (int r = 0; r < n; ++r) {
        for (int e = 0; e < d; ++e) qn[int64_t(r) * d + e] = qd[qrows[r] + e * qlast];
        offs[r] = int64_t(r) * d;
      }
      if (rot & 1) hadamard_rows(qn.data(), n, d);
      const Queries qs = permute_queries(qn.data(), offs, 1, n, d, p);
      const int64_t bytes = (p.len * int64_t(p.k_bits + p.v_bits) / 8 + int64_t(p.tail) * 8) * bh * d;
      attend_items(qs, items, bh, rows, d, p, o, bytes >= kParallelBytes);
      if (rot & 2) hadamard_rows(o, n, d);
    });
  }

  const char* name() const override { return "KvsplitChannelDecodeStep"; }

  // Never merged with another step: each writes a token.
  bool is_equivalent(const Primitive&) const override { return false; }

 private:
  AttnParams p_;
  int row_, sinks_, rot_;
};

// Decode attention over a 16-bit dense cache (`[B, Hkv, cap, D]` f16 K and V, the first `len`
// tokens valid), every query seeing every token: the same blocks, threads and merge as the
// packed caches, so a dense cache decodes on the fast path instead of widening its window.
class DenseDecodeAttention : public CpuPrimitive {
 public:
  DenseDecodeAttention(Stream s, AttnParams p) : CpuPrimitive(s), p_(p) {}

  void eval_cpu(const std::vector<array>& in, array& out) override {
    const array &q = in[0], &k = in[1], &v = in[2];
    std::vector<int64_t> qrows = row_offsets(q);
    const int64_t qlast = q.strides()[3];
    check_last_dense("kvsplit dense decode attention: keys", k);
    check_last_dense("kvsplit dense decode attention: values", v);
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    const auto* kh = reinterpret_cast<const uint16_t*>(k.data<mlx::core::float16_t>());
    const auto* vh = reinterpret_cast<const uint16_t*>(v.data<mlx::core::float16_t>());
    if (p_.causal) {
      std::vector<TileSource> heads;
      for (int bi = 0; bi < q.shape(0); ++bi) {
        for (int h = 0; h < k.shape(1); ++h) {
          TileSource src;
          src.hk = kh + int64_t(bi) * k.strides()[0] + int64_t(h) * k.strides()[1];
          src.hv = vh + int64_t(bi) * v.strides()[0] + int64_t(h) * v.strides()[1];
          src.k_stride = k.strides()[2];
          src.v_stride = v.strides()[2];
          heads.push_back(src);
        }
      }
      auto& enc = mlx::core::cpu::get_command_encoder(stream());
      enc.set_input_array(k);
      enc.set_input_array(v);
      return dispatch_causal(stream(), q, std::move(heads), k.shape(1), p_, out);
    }
    const int b = q.shape(0), hq = q.shape(1), l = q.shape(2), d = q.shape(3);
    const int hkv = k.shape(1), rows = hq / hkv * l, bh = b * hkv;
    const int64_t t = p_.len;
    const int64_t block = token_block(t, bh);
    std::vector<AttnItem> items;
    const auto* kd = reinterpret_cast<const uint16_t*>(k.data<mlx::core::float16_t>());
    const auto* vd = reinterpret_cast<const uint16_t*>(v.data<mlx::core::float16_t>());
    for (int bi = 0; bi < b; ++bi) {
      for (int h = 0; h < hkv; ++h) {
        for (int64_t t0 = 0; t0 < t; t0 += block) {
          AttnItem it{bi * hkv + h, {}, {}, t0, std::min(t, t0 + block)};
          it.kind = AttnItem::Half;
          it.hk = kd + int64_t(bi) * k.strides()[0] + int64_t(h) * k.strides()[1];
          it.hv = vd + int64_t(bi) * v.strides()[0] + int64_t(h) * v.strides()[1];
          it.tk_stride = k.strides()[2];
          it.tv_stride = v.strides()[2];
          items.push_back(it);
        }
      }
    }
    auto& enc = mlx::core::cpu::get_command_encoder(stream());
    enc.set_input_array(q);
    enc.set_input_array(k);
    enc.set_input_array(v);
    enc.set_output_array(out);
    enc.dispatch([qd = q.data<float>(), o = out.data<float>(), items = std::move(items), p = p_, rows, d,
                  qrows = std::move(qrows), qlast, bh]() {
      const Queries qs = permute_queries(qd, qrows, qlast, bh * rows, d, p);
      const int64_t bytes = p.len * int64_t(4) * bh * d;
      attend_items(qs, items, bh, rows, d, p, o, bytes >= kParallelBytes);
    });
  }

  const char* name() const override { return "KvsplitDenseDecodeAttention"; }

  bool is_equivalent(const Primitive& other) const override {
    auto& o = static_cast<const DenseDecodeAttention&>(other).p_;
    return p_.len == o.len && p_.causal == o.causal && p_.softcap == o.softcap;
  }

 private:
  AttnParams p_;
};

// Decode attention of S sequences over a block pool (mlx-kv `pool.rs`): caches `[blocks, Hkv,
// BLOCK, ...]` shared by every sequence, and a table `[S, 1 + max_blocks]` holding each
// sequence's length then its block ids. Each (sequence, head, block) is one work item, so one
// op per layer serves the whole batch whatever the lengths. With per-channel keys a block's keys
// are `[Hkv, D, BLOCK...]` channel rows holding whole groups of `k_group` tokens; a sequence's
// last `len % k_group` tokens are not in the blocks yet but in its float K/V tail (row s of
// `[S, Hkv, T, D]`, the first `len % k_group` slots).
class PagedDecodeAttention : public CpuPrimitive {
 public:
  PagedDecodeAttention(Stream s, AttnParams p) : CpuPrimitive(s), p_(p) {}

  void eval_cpu(const std::vector<array>& in, array& out) override {
    const array& q = in[0];
    const array& table = in[7];
    std::vector<int64_t> qrows = row_offsets(q);
    const int64_t qlast = q.strides()[3];
    for (size_t i = 1; i < 7; ++i) check_last_dense("kvsplit paged attention: pool", in[i]);
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    const int s = q.shape(0), hq = q.shape(1), d = q.shape(3);
    // Rows per (block, head): tokens for values, and for keys tokens or channels.
    const int hkv = in[1].shape(1), rows = hq / hkv, block = in[4].shape(2), krows = in[1].shape(2), nb = in[1].shape(0);
    const int width = table.shape(1);
    // Row offsets of block 0, head 0; a block's head h starts `(id * hkv + h) * rows` later.
    PackedRows k0 = packed_rows(in[1], in[2], in[3], p_.k_group, p_.k_bits, 0, 0, 2);
    PackedRows v0 = packed_rows(in[4], in[5], in[6], p_.v_group, p_.v_bits, 0, 0, 2);
    const float *tk = nullptr, *tv = nullptr;
    std::array<int64_t, 3> tks{}, tvs{};
    auto& enc = mlx::core::cpu::get_command_encoder(stream());
    enc.set_input_array(q);
    enc.set_input_array(table);
    if (p_.tail > 0) {
      tk = in[8].data<float>(), tv = in[9].data<float>();
      for (int i = 0; i < 3; ++i) tks[i] = in[8].strides()[i], tvs[i] = in[9].strides()[i];
      enc.set_input_array(in[8]), enc.set_input_array(in[9]);
    }
    enc.set_output_array(out);
    enc.dispatch([qd = q.data<float>(), td = table.data<int32_t>(), o = out.data<float>(), k0, v0, p = p_, rows, d, s, hkv,
                  block, krows, nb, width, tk, tv, tks, tvs, qrows = std::move(qrows), qlast]() {
      std::vector<AttnItem> items;
      int64_t tokens = 0;
      const size_t ke = k0.f16 ? 2 : 4, ve = v0.f16 ? 2 : 4;
      for (int si = 0; si < s; ++si) {
        const int64_t len = td[int64_t(si) * width];
        // Tokens still in the float tail (per-channel keys only), and those in the blocks; the
        // tail's rows start with the sequence's `lead` sink tokens.
        const int64_t n_group = p.k_channels ? len % p.k_group : 0;
        const int64_t n_tail = p.lead + n_group;
        const int64_t packed = len - n_group;
        // The Rust side builds the table; a bad row (checked again here, as an exception cannot
        // leave a dispatched task) gets no items, so its output rows come out NaN, not garbage.
        if (len + p.lead < 1 || (packed + block - 1) / block > width - 1 || n_tail > p.tail) continue;
        tokens += len + p.lead;
        for (int h = 0; h < hkv; ++h) {
          for (int64_t j = 0; j * block < packed; ++j) {
            const int64_t id = td[int64_t(si) * width + 1 + j];
            if (id < 0 || id >= nb) continue;
            const int64_t krow = (id * hkv + h) * krows, vrow = (id * hkv + h) * block;
            PackedRows k = k0, v = v0;
            k.w += krow * k.row_bytes;
            v.w += vrow * v.row_bytes;
            k.scales = static_cast<const char*>(k.scales) + krow * k.sb_stride * ke;
            k.biases = static_cast<const char*>(k.biases) + krow * k.sb_stride * ke;
            v.scales = static_cast<const char*>(v.scales) + vrow * v.sb_stride * ve;
            v.biases = static_cast<const char*>(v.biases) + vrow * v.sb_stride * ve;
            AttnItem it{si * hkv + h, k, v, 0, std::min<int64_t>(block, packed - j * block)};
            it.kind = p.k_channels ? AttnItem::Channels : AttnItem::Tokens;
            items.push_back(it);
          }
          if (n_tail > 0) {
            AttnItem it{si * hkv + h, k0, v0, 0, n_tail};
            it.kind = AttnItem::Float;
            it.tk = tk + si * tks[0] + h * tks[1];
            it.tv = tv + si * tvs[0] + h * tvs[1];
            it.tk_stride = tks[2];
            it.tv_stride = tvs[2];
            items.push_back(it);
          }
        }
      }
      const Queries qs = permute_queries(qd, qrows, qlast, s * hkv * rows, d, p);
      const int64_t bytes = tokens * hkv * (int64_t(d) * (p.k_bits + p.v_bits) / 8);
      attend_items(qs, items, s * hkv, rows, d, p, o, bytes >= kParallelBytes);
    });
  }

  const char* name() const override { return "KvsplitPagedDecodeAttention"; }

  bool is_equivalent(const Primitive& other) const override {
    auto& o = static_cast<const PagedDecodeAttention&>(other).p_;
    return p_.k_group == o.k_group && p_.k_bits == o.k_bits && p_.v_group == o.v_group && p_.v_bits == o.v_bits &&
           p_.k_channels == o.k_channels && p_.tail == o.tail && p_.lead == o.lead && p_.softcap == o.softcap;
  }

 private:
  AttnParams p_;
};

}  // namespace
}  // namespace kvsplit

using namespace kvsplit;
using mlx::core::array;

std::string& kvsplit::last_error() {
  thread_local std::string msg;
  return msg;
}

extern "C" const char* kvsplit_ext_last_error(void) {
  return kvsplit::last_error().c_str();
}

extern "C" int kvsplit_ext_cpu_threads(void) {
  return Pool::get().size();
}

extern "C" int kvsplit_ext_configure(int threads, bool force_generic) {
  g_force_generic.store(force_generic);
  int want = threads >= 1 ? std::min(threads, 256) : 0;
  if (Pool::started()) {
    int have = Pool::get().size();
    int asked = want >= 1 ? want : int(std::max(1u, std::thread::hardware_concurrency()));
    if (have != asked) {
      kvsplit::last_error() = "the CPU kernels' thread pool already runs " + std::to_string(have) +
                              " threads; the thread count can only be chosen before the first kernel call";
      return 1;
    }
    return 0;
  }
  g_threads.store(want);
  return 0;
}

extern "C" int kvsplit_cpu_quantized_matvec(mlx_array* res, const mlx_array x_, const mlx_array w_,
                                            const mlx_array scales_, const mlx_array biases_, int group_size, int bits,
                                            const mlx_stream s_) {
  return guarded([&] {
    const char* what = "kvsplit quantized_matvec";
    const array &x = mlx_array_get_(x_), &w = mlx_array_get_(w_);
    const array &s = mlx_array_get_(scales_), &b = mlx_array_get_(biases_);
    const Stream st = mlx_stream_get_(s_);
    require(x.ndim() >= 1 && w.ndim() == 2, std::string(what) + ": x must be [..., K] and w [N, K*bits/32]");
    check_bits_group(what, bits, group_size, x.shape(-1));
    const int k = x.shape(-1), n = w.shape(0);
    require(w.dtype() == mlx::core::uint32 && int64_t(w.shape(1)) * 32 == int64_t(k) * bits,
            std::string(what) + ": w must be uint32 [N, K*bits/32] for K = " + std::to_string(k));
    require(s.shape() == b.shape() && s.ndim() == 2 && s.shape(0) == n && s.shape(1) == k / group_size,
            std::string(what) + ": scales and biases must be [N, K/group]");
    check_scale_dtype(what, s, b);
    require(x.dtype() == mlx::core::float32, std::string(what) + ": x must be float32");
    auto shape = x.shape();
    shape.back() = n;
    array out(shape, mlx::core::float32, std::make_shared<QuantizedMatVec>(st, group_size, bits), {x, w, s, b});
    mlx_array_set_(*res, out);
  });
}

// MXFP4 `w` (uint32 [N, K/8]) with e8m0 `scales` (uint8 [N, K/32]): the packed matvec and the
// f32 dequantization, as for affine weights.
namespace {
void check_mxfp4(const char* what, const array& w, const array& s, int k) {
  const int n = w.shape(0);
  require(w.ndim() == 2 && w.dtype() == mlx::core::uint32 && k % 32 == 0 && int64_t(w.shape(1)) * 8 == k,
          std::string(what) + ": w must be uint32 [N, K/8] with K a multiple of 32, K = " + std::to_string(k));
  require(s.ndim() == 2 && s.dtype() == mlx::core::uint8 && s.shape(0) == n && s.shape(1) == k / 32,
          std::string(what) + ": scales must be uint8 [N, K/32]");
}
}  // namespace

extern "C" int kvsplit_cpu_mxfp4_matvec(mlx_array* res, const mlx_array x_, const mlx_array w_,
                                        const mlx_array scales_, const mlx_stream s_) {
  return guarded([&] {
    const char* what = "kvsplit mxfp4 matvec";
    const array &x = mlx_array_get_(x_), &w = mlx_array_get_(w_), &s = mlx_array_get_(scales_);
    require(x.ndim() >= 1 && x.dtype() == mlx::core::float32, std::string(what) + ": x must be float32 [..., K]");
    check_mxfp4(what, w, s, x.shape(-1));
    auto shape = x.shape();
    shape.back() = w.shape(0);
    array out(shape, mlx::core::float32, std::make_shared<QuantizedMatVec>(mlx_stream_get_(s_), 32, 4, true), {x, w, s});
    mlx_array_set_(*res, out);
  });
}

extern "C" int kvsplit_cpu_mxfp4_dequantize(mlx_array* res, const mlx_array w_, const mlx_array scales_,
                                            const mlx_stream s_) {
  return guarded([&] {
    const char* what = "kvsplit mxfp4 dequantize";
    const array &w = mlx_array_get_(w_), &s = mlx_array_get_(scales_);
    require(w.ndim() == 2, std::string(what) + ": w must be uint32 [N, K/8]");
    const int k = w.shape(1) * 8;
    check_mxfp4(what, w, s, k);
    array out({w.shape(0), k}, mlx::core::float32, std::make_shared<Dequantize>(mlx_stream_get_(s_), 32, 4, true), {w, s});
    mlx_array_set_(*res, out);
  });
}

extern "C" int kvsplit_cpu_dequantize(mlx_array* res, const mlx_array w_, const mlx_array scales_,
                                               const mlx_array biases_, int group_size, int bits, const mlx_stream s_) {
  return guarded([&] {
    const char* what = "kvsplit dequantize";
    const array &w = mlx_array_get_(w_), &s = mlx_array_get_(scales_), &b = mlx_array_get_(biases_);
    const Stream st = mlx_stream_get_(s_);
    require(w.ndim() == 2 && w.dtype() == mlx::core::uint32, std::string(what) + ": w must be uint32 [N, K*bits/32]");
    require(bits == 2 || bits == 3 || bits == 4 || bits == 6 || bits == 8,
            std::string(what) + ": bits must be 2, 3, 4, 6 or 8, got " + std::to_string(bits));
    const int n = w.shape(0);
    const int64_t k64 = int64_t(w.shape(1)) * 32 / bits;
    require(k64 <= INT32_MAX, std::string(what) + ": rows too long");
    const int k = int(k64);
    check_bits_group(what, bits, group_size, k);
    require(s.shape() == b.shape() && s.ndim() == 2 && s.shape(0) == n && s.shape(1) == k / group_size,
            std::string(what) + ": scales and biases must be [N, K/group]");
    check_scale_dtype(what, s, b);
    array out({n, k}, mlx::core::float32, std::make_shared<Dequantize>(st, group_size, bits), {w, s, b});
    mlx_array_set_(*res, out);
  });
}

extern "C" int kvsplit_cpu_quantized_decode_attention(mlx_array* res, const mlx_array q_, const mlx_array kw_,
                                                      const mlx_array ks_, const mlx_array kb_, const mlx_array vw_,
                                                      const mlx_array vs_, const mlx_array vb_, int len, int k_group,
                                                      int k_bits, int v_group, int v_bits, bool k_per_channel,
                                                      const mlx_array tail_k_, const mlx_array tail_v_, bool causal,
                                                      float softcap, const int* ranges, int n_ranges,
                                                      const mlx_stream s_) {
  return guarded([&] {
    const char* what = "kvsplit decode attention";
    const array& q = mlx_array_get_(q_);
    const array &kw = mlx_array_get_(kw_), &ks = mlx_array_get_(ks_), &kb = mlx_array_get_(kb_);
    const array &vw = mlx_array_get_(vw_), &vs = mlx_array_get_(vs_), &vb = mlx_array_get_(vb_);
    const Stream st = mlx_stream_get_(s_);
    require(q.ndim() == 4 && q.dtype() == mlx::core::float32, std::string(what) + ": q must be float32 [B, Hq, L, D]");
    const int b = q.shape(0), hq = q.shape(1), d = q.shape(3);
    check_bits_group("kvsplit decode attention (values)", v_bits, v_group, d);
    for (const array* w : {&kw, &vw})
      require(w->ndim() == 4 && w->dtype() == mlx::core::uint32 && w->shape(0) == b && w->shape(1) == kw.shape(1),
              std::string(what) + ": packed cache buffers must be uint32 [B, Hkv, ...]");
    const int hkv = kw.shape(1), cap = vw.shape(2);
    require(hkv > 0 && hq % hkv == 0, std::string(what) + ": query heads must be a multiple of KV heads");
    require(int64_t(vw.shape(3)) * 32 == int64_t(d) * v_bits,
            std::string(what) + ": values must be [B, Hkv, capacity, D*bits/32]");
    if (k_per_channel) {
      const int64_t kcap = int64_t(kw.shape(3)) * 32 / k_bits;
      check_bits_group("kvsplit decode attention (per-channel keys)", k_bits, k_group, int(kcap));
      require(kw.shape(2) == d && kcap * k_bits == int64_t(kw.shape(3)) * 32 && kcap >= len,
              std::string(what) + ": per-channel keys must be uint32 [B, Hkv, D, capacity*bits/32]");
      require(len % k_group == 0, std::string(what) + ": per-channel keys hold whole groups of " +
                                      std::to_string(k_group) + " tokens, not " + std::to_string(len));
      require(ks.shape() == kb.shape() && ks.ndim() == 4 && ks.shape(0) == b && ks.shape(1) == hkv &&
                  ks.shape(2) == d && ks.shape(3) == kcap / k_group,
              std::string(what) + ": per-channel key scales and biases must be [B, Hkv, D, capacity/group]");
    } else {
      check_bits_group("kvsplit decode attention (keys)", k_bits, k_group, d);
      require(kw.shape(2) == cap && int64_t(kw.shape(3)) * 32 == int64_t(d) * k_bits,
              std::string(what) + ": keys must be [B, Hkv, capacity, D*bits/32] like the values");
      require(ks.shape() == kb.shape() && ks.ndim() == 4 && ks.shape(0) == b && ks.shape(1) == hkv &&
                  ks.shape(2) == cap && ks.shape(3) == d / k_group,
              std::string(what) + ": scales and biases must be [B, Hkv, capacity, D/group]");
    }
    check_scale_dtype(what, ks, kb);
    require(vs.shape() == vb.shape() && vs.ndim() == 4 && vs.shape(0) == b && vs.shape(1) == hkv &&
                vs.shape(2) == cap && vs.shape(3) == d / v_group,
            std::string(what) + ": scales and biases must be [B, Hkv, capacity, D/group]");
    check_scale_dtype(what, vs, vb);
    require(len >= 1 && len <= cap, std::string(what) + ": len " + std::to_string(len) + " outside 1.." +
                                        std::to_string(cap));
    std::vector<array> inputs{q, kw, ks, kb, vw, vs, vb};
    int tail = 0;
    if (tail_k_.ctx != nullptr || tail_v_.ctx != nullptr) {
      require(tail_k_.ctx != nullptr && tail_v_.ctx != nullptr, std::string(what) + ": a float tail needs both K and V");
      const array &tk = mlx_array_get_(tail_k_), &tv = mlx_array_get_(tail_v_);
      require(tk.ndim() == 4 && tk.dtype() == mlx::core::float32 && tk.shape() == tv.shape() &&
                  tv.dtype() == mlx::core::float32 && tk.shape(0) == b && tk.shape(1) == hkv && tk.shape(3) == d,
              std::string(what) + ": the float tail must be float32 K and V [B, Hkv, n, D]");
      tail = tk.shape(2);
      if (tail > 0) inputs.push_back(tk), inputs.push_back(tv);
    }
    AttnParams p{len, k_group, k_bits, v_group, v_bits, k_per_channel, tail};
    p.softcap = checked_softcap(what, softcap);
    if (n_ranges > 0) {
      require(!causal, std::string(what) + ": body ranges are for decode, not a causal chunk");
      p.ranges = checked_ranges(what, ranges, n_ranges, len, k_per_channel ? k_group : 1);
    }
    if (causal) {
      require(!k_per_channel && tail == 0,
              std::string(what) + ": a causal (prefill) call reads per-token keys and no float tail");
      require(q.shape(2) <= len, std::string(what) + ": a causal chunk of " + std::to_string(q.shape(2)) +
                                     " queries needs its own tokens in the cache (len " + std::to_string(len) + ")");
      p.causal = true;
    }
    array out(q.shape(), mlx::core::float32, std::make_shared<QuantizedDecodeAttention>(st, p), std::move(inputs));
    mlx_array_set_(*res, out);
  });
}

extern "C" int kvsplit_cpu_quantized_decode_step(mlx_array* res, const mlx_array q_, const mlx_array k_new_,
                                                 const mlx_array v_new_, const mlx_array kw_, const mlx_array ks_,
                                                 const mlx_array kb_, const mlx_array vw_, const mlx_array vs_,
                                                 const mlx_array vb_, int slot, int k_group, int k_bits, int v_group,
                                                 int v_bits, float softcap, const mlx_stream s_) {
  return guarded([&] {
    const char* what = "kvsplit decode step";
    const array& q = mlx_array_get_(q_);
    const array &kn = mlx_array_get_(k_new_), &vn = mlx_array_get_(v_new_);
    const array &kw = mlx_array_get_(kw_), &ks = mlx_array_get_(ks_), &kb = mlx_array_get_(kb_);
    const array &vw = mlx_array_get_(vw_), &vs = mlx_array_get_(vs_), &vb = mlx_array_get_(vb_);
    require(q.ndim() == 4 && q.dtype() == mlx::core::float32 && q.shape(2) == 1,
            std::string(what) + ": q must be float32 [B, Hq, 1, D]");
    const int b = q.shape(0), hq = q.shape(1), d = q.shape(3);
    check_bits_group("kvsplit decode step (keys)", k_bits, k_group, d);
    check_bits_group("kvsplit decode step (values)", v_bits, v_group, d);
    for (const array* w : {&kw, &vw})
      require(w->ndim() == 4 && w->dtype() == mlx::core::uint32 && w->shape(0) == b && w->shape(1) == kw.shape(1),
              std::string(what) + ": packed cache buffers must be uint32 [B, Hkv, ...]");
    const int hkv = kw.shape(1), cap = kw.shape(2);
    require(hkv > 0 && hq % hkv == 0, std::string(what) + ": query heads must be a multiple of KV heads");
    require(vw.shape(2) == cap && int64_t(kw.shape(3)) * 32 == int64_t(d) * k_bits &&
                int64_t(vw.shape(3)) * 32 == int64_t(d) * v_bits,
            std::string(what) + ": keys and values must be [B, Hkv, capacity, D*bits/32]");
    for (auto [s, bi, g] : {std::tuple{&ks, &kb, k_group}, std::tuple{&vs, &vb, v_group}}) {
      require(s->shape() == bi->shape() && s->ndim() == 4 && s->shape(0) == b && s->shape(1) == hkv &&
                  s->shape(2) == cap && s->shape(3) == d / g && s->dtype() == ks.dtype() && bi->dtype() == ks.dtype(),
              std::string(what) + ": scales and biases must be [B, Hkv, capacity, D/group], all of one dtype");
    }
    check_scale_dtype(what, ks, kb);
    for (const array* x : {&kn, &vn})
      require(x->ndim() == 4 && x->dtype() == mlx::core::float32 && x->shape(0) == b && x->shape(1) == hkv &&
                  x->shape(2) == 1 && x->shape(3) == d,
              std::string(what) + ": the new key and value must be float32 [B, Hkv, 1, D]");
    require(slot >= 0 && slot < cap,
            std::string(what) + ": slot " + std::to_string(slot) + " outside 0.." + std::to_string(cap - 1));
    AttnParams p{slot + 1, k_group, k_bits, v_group, v_bits};
    p.softcap = checked_softcap(what, softcap);
    array out(q.shape(), mlx::core::float32, std::make_shared<QuantizedDecodeStep>(mlx_stream_get_(s_), p),
              {q, kw, ks, kb, vw, vs, vb, kn, vn});
    mlx_array_set_(*res, out);
  });
}

extern "C" int kvsplit_cpu_channel_decode_step(mlx_array* res, const mlx_array q_, const mlx_array k_new_,
                                               const mlx_array v_new_, const mlx_array kw_, const mlx_array ks_,
                                               const mlx_array kb_, const mlx_array vw_, const mlx_array vs_,
                                               const mlx_array vb_, const mlx_array tail_k_, const mlx_array tail_v_,
                                               const mlx_array sink_k_, const mlx_array sink_v_, int len, int row,
                                               int k_group, int k_bits, int v_group, int v_bits, int rot, float softcap,
                                               const int* ranges, int n_ranges, const mlx_stream s_) {
  return guarded([&] {
    const char* what = "kvsplit channel decode step";
    const array& q = mlx_array_get_(q_);
    const array &kn = mlx_array_get_(k_new_), &vn = mlx_array_get_(v_new_);
    const array &kw = mlx_array_get_(kw_), &ks = mlx_array_get_(ks_), &kb = mlx_array_get_(kb_);
    const array &vw = mlx_array_get_(vw_), &vs = mlx_array_get_(vs_), &vb = mlx_array_get_(vb_);
    const array &tk = mlx_array_get_(tail_k_), &tv = mlx_array_get_(tail_v_);
    require(q.ndim() == 4 && q.dtype() == mlx::core::float32 && q.shape(2) == 1,
            std::string(what) + ": q must be float32 [B, Hq, 1, D]");
    const int b = q.shape(0), hq = q.shape(1), d = q.shape(3);
    require(d > 0 && (d & (d - 1)) == 0 && d % 8 == 0, std::string(what) + ": head_dim must be a power of two, at least 8");
    check_bits_group("kvsplit channel decode step (values)", v_bits, v_group, d);
    for (const array* w : {&kw, &vw})
      require(w->ndim() == 4 && w->dtype() == mlx::core::uint32 && w->shape(0) == b && w->shape(1) == kw.shape(1),
              std::string(what) + ": packed cache buffers must be uint32 [B, Hkv, ...]");
    const int hkv = kw.shape(1), cap = vw.shape(2);
    require(hkv > 0 && hq % hkv == 0, std::string(what) + ": query heads must be a multiple of KV heads");
    const int64_t kcap = int64_t(kw.shape(3)) * 32 / k_bits;
    check_bits_group("kvsplit channel decode step (per-channel keys)", k_bits, k_group, int(kcap));
    require(kw.shape(2) == d && kcap * k_bits == int64_t(kw.shape(3)) * 32 && kcap >= len && len >= 0 &&
                len % k_group == 0,
            std::string(what) + ": per-channel keys must be uint32 [B, Hkv, D, capacity*bits/32] holding whole groups");
    require(ks.shape() == kb.shape() && ks.ndim() == 4 && ks.shape(0) == b && ks.shape(1) == hkv && ks.shape(2) == d &&
                ks.shape(3) == kcap / k_group,
            std::string(what) + ": per-channel key scales and biases must be [B, Hkv, D, capacity/group]");
    check_scale_dtype(what, ks, kb);
    require(int64_t(vw.shape(3)) * 32 == int64_t(d) * v_bits && vs.shape() == vb.shape() && vs.ndim() == 4 &&
                vs.shape(0) == b && vs.shape(1) == hkv && vs.shape(2) == cap && vs.shape(3) == d / v_group && cap >= len,
            std::string(what) + ": values must be [B, Hkv, capacity, D*bits/32], scales [B, Hkv, capacity, D/group]");
    check_scale_dtype(what, vs, vb);
    for (const array* x : {&kn, &vn})
      require(x->ndim() == 4 && x->dtype() == mlx::core::float32 && x->shape(0) == b && x->shape(1) == hkv &&
                  x->shape(2) == 1 && x->shape(3) == d,
              std::string(what) + ": the new key and value must be float32 [B, Hkv, 1, D]");
    auto float_run = [&](const array& k, const array& v, const char* name) {
      require(k.ndim() == 4 && k.shape() == v.shape() && k.dtype() == v.dtype() &&
                  (k.dtype() == mlx::core::float32 || k.dtype() == mlx::core::float16) && k.shape(0) == b &&
                  k.shape(1) == hkv && k.shape(3) == d,
              std::string(what) + ": " + name + " must be float32 or float16 K and V [B, Hkv, n, D]");
    };
    float_run(tk, tv, "the tail buffers");
    require(row >= 0 && row < tk.shape(2),
            std::string(what) + ": tail row " + std::to_string(row) + " outside 0.." + std::to_string(tk.shape(2) - 1));
    require(rot >= 0 && rot <= 3, std::string(what) + ": rot must be 0..3 (bit 0 keys, bit 1 values)");
    std::vector<array> inputs{q, kn, vn, kw, ks, kb, vw, vs, vb, tk, tv};
    int sinks = 0;
    if (sink_k_.ctx != nullptr || sink_v_.ctx != nullptr) {
      require(sink_k_.ctx != nullptr && sink_v_.ctx != nullptr, std::string(what) + ": sinks need both K and V");
      const array &sk = mlx_array_get_(sink_k_), &sv = mlx_array_get_(sink_v_);
      float_run(sk, sv, "the sink rows");
      sinks = sk.shape(2);
      if (sinks > 0) inputs.push_back(sk), inputs.push_back(sv);
    }
    AttnParams p{len, k_group, k_bits, v_group, v_bits, true, row + 1 + sinks};
    p.softcap = checked_softcap(what, softcap);
    p.ranges = checked_ranges(what, ranges, n_ranges, len, k_group);
    array out(q.shape(), mlx::core::float32,
              std::make_shared<ChannelDecodeStep>(mlx_stream_get_(s_), p, row, sinks, rot), std::move(inputs));
    mlx_array_set_(*res, out);
  });
}

extern "C" int kvsplit_cpu_dense_decode_attention(mlx_array* res, const mlx_array q_, const mlx_array k_,
                                                  const mlx_array v_, int len, bool causal, float softcap,
                                                  const mlx_stream s_) {
  return guarded([&] {
    const char* what = "kvsplit dense decode attention";
    const array &q = mlx_array_get_(q_), &k = mlx_array_get_(k_), &v = mlx_array_get_(v_);
    require(q.ndim() == 4 && q.dtype() == mlx::core::float32, std::string(what) + ": q must be float32 [B, Hq, L, D]");
    const int b = q.shape(0), hq = q.shape(1), d = q.shape(3);
    require(k.ndim() == 4 && k.dtype() == mlx::core::float16 && v.dtype() == mlx::core::float16 && k.shape() == v.shape() &&
                k.shape(0) == b && k.shape(3) == d,
            std::string(what) + ": keys and values must be float16 [B, Hkv, capacity, D] like q's batch and head_dim");
    const int hkv = k.shape(1);
    require(hkv > 0 && hq % hkv == 0, std::string(what) + ": query heads must be a multiple of KV heads");
    require(d % 8 == 0, std::string(what) + ": head_dim " + std::to_string(d) + " is not a multiple of 8");
    require(len >= 1 && len <= k.shape(2),
            std::string(what) + ": len " + std::to_string(len) + " outside 1.." + std::to_string(k.shape(2)));
    AttnParams p{len, d, 8, d, 8};
    p.dense = true;
    p.softcap = checked_softcap(what, softcap);
    if (causal) {
      require(q.shape(2) <= len, std::string(what) + ": a causal chunk of " + std::to_string(q.shape(2)) +
                                     " queries needs its own tokens in the cache (len " + std::to_string(len) + ")");
      p.causal = true;
    }
    array out(q.shape(), mlx::core::float32, std::make_shared<DenseDecodeAttention>(mlx_stream_get_(s_), p), {q, k, v});
    mlx_array_set_(*res, out);
  });
}

extern "C" int kvsplit_cpu_paged_decode_attention(mlx_array* res, const mlx_array q_, const mlx_array kw_,
                                                  const mlx_array ks_, const mlx_array kb_, const mlx_array vw_,
                                                  const mlx_array vs_, const mlx_array vb_, const mlx_array table_,
                                                  int k_group, int k_bits, int v_group, int v_bits, bool k_per_channel,
                                                  const mlx_array tail_k_, const mlx_array tail_v_, int lead,
                                                  float softcap, const mlx_stream s_) {
  return guarded([&] {
    const char* what = "kvsplit paged attention";
    const array& q = mlx_array_get_(q_);
    const array &kw = mlx_array_get_(kw_), &ks = mlx_array_get_(ks_), &kb = mlx_array_get_(kb_);
    const array &vw = mlx_array_get_(vw_), &vs = mlx_array_get_(vs_), &vb = mlx_array_get_(vb_);
    const array& table = mlx_array_get_(table_);
    const Stream st = mlx_stream_get_(s_);
    require(q.ndim() == 4 && q.dtype() == mlx::core::float32 && q.shape(2) == 1,
            std::string(what) + ": q must be float32 [S, Hq, 1, D]");
    const int s = q.shape(0), hq = q.shape(1), d = q.shape(3);
    check_bits_group("kvsplit paged attention (values)", v_bits, v_group, d);
    for (const array* w : {&kw, &vw})
      require(w->ndim() == 4 && w->dtype() == mlx::core::uint32 && w->shape(0) == vw.shape(0) &&
                  w->shape(1) == vw.shape(1) && w->flags().row_contiguous,
              std::string(what) + ": pool arrays must be contiguous uint32 [blocks, Hkv, ...]");
    const int block = vw.shape(2);
    require(int64_t(vw.shape(3)) * 32 == int64_t(d) * v_bits,
            std::string(what) + ": values must be [blocks, Hkv, BLOCK, D*bits/32]");
    // Keys: [blocks, Hkv, BLOCK, D*bits/32] by token, or [blocks, Hkv, D, BLOCK*bits/32] by channel.
    const int k_rows = k_per_channel ? d : block, k_along = k_per_channel ? block : d;
    if (k_per_channel) {
      check_bits_group("kvsplit paged attention (per-channel keys)", k_bits, k_group, block);
    } else {
      check_bits_group("kvsplit paged attention (keys)", k_bits, k_group, d);
    }
    require(kw.shape(2) == k_rows && int64_t(kw.shape(3)) * 32 == int64_t(k_along) * k_bits,
            std::string(what) + (k_per_channel ? ": per-channel keys must be [blocks, Hkv, D, BLOCK*bits/32]"
                                               : ": keys must be [blocks, Hkv, BLOCK, D*bits/32]"));
    const int hkv = kw.shape(1);
    require(hkv > 0 && hq % hkv == 0, std::string(what) + ": query heads must be a multiple of KV heads");
    for (auto [s2, bi, g, r, a] : {std::tuple{&ks, &kb, k_group, k_rows, k_along}, std::tuple{&vs, &vb, v_group, block, d}}) {
      require(s2->shape() == bi->shape() && s2->ndim() == 4 && s2->shape(0) == kw.shape(0) && s2->shape(1) == hkv &&
                  s2->shape(2) == r && s2->shape(3) == a / g && s2->flags().row_contiguous &&
                  bi->flags().row_contiguous,
              std::string(what) + ": scales and biases must be contiguous and match their codes' groups");
      check_scale_dtype(what, *s2, *bi);
    }
    require(table.ndim() == 2 && table.dtype() == mlx::core::int32 && table.shape(0) == s && table.shape(1) >= 2 &&
                table.flags().row_contiguous,
            std::string(what) + ": table must be contiguous int32 [S, 1 + max_blocks]");
    std::vector<array> inputs{q, kw, ks, kb, vw, vs, vb, table};
    int tail = 0;
    if (tail_k_.ctx != nullptr || tail_v_.ctx != nullptr) {
      require(k_per_channel, std::string(what) + ": a float tail goes with per-channel keys only");
      require(tail_k_.ctx != nullptr && tail_v_.ctx != nullptr, std::string(what) + ": a float tail needs both K and V");
      const array &tk = mlx_array_get_(tail_k_), &tv = mlx_array_get_(tail_v_);
      require(tk.ndim() == 4 && tk.dtype() == mlx::core::float32 && tk.shape() == tv.shape() &&
                  tv.dtype() == mlx::core::float32 && tk.shape(0) == s && tk.shape(1) == hkv && tk.shape(3) == d &&
                  tk.strides()[3] == 1 && tv.strides()[3] == 1,
              std::string(what) + ": the float tails must be float32 K and V [S, Hkv, n, D], rows dense");
      tail = tk.shape(2);
      if (tail > 0) inputs.push_back(tk), inputs.push_back(tv);
    }
    require(lead >= 0 && lead <= tail, std::string(what) + ": " + std::to_string(lead) +
                                           " sink rows do not fit a float tail of " + std::to_string(tail));
    AttnParams p{0, k_group, k_bits, v_group, v_bits, k_per_channel, tail};
    p.lead = lead;
    p.softcap = checked_softcap(what, softcap);
    array out(q.shape(), mlx::core::float32, std::make_shared<PagedDecodeAttention>(st, p), std::move(inputs));
    mlx_array_set_(*res, out);
  });
}

// MLX's distributed layer (ring, MPI, NCCL, JACCL backends) behind C entry points that report
// errors as a return code and our per-thread message. mlx-c binds the same calls
// (`mlx_distributed_*`), but reports failures through one process-wide error handler that mlx-rs
// owns and does not expose, so a failed `init` (a bad hostfile, a peer that never connects)
// could not be told to the user; here the exception's text reaches the caller.

#include <memory>

#include "ext_common.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/stream.h"
#include "mlx/distributed/distributed.h"
#include "mlx/distributed/ops.h"

namespace dist = mlx::core::distributed;
using kvsplit::guarded;
using mlx::core::array;

extern "C" bool kvsplit_dist_is_available(const char* backend) {
  try {
    return dist::is_available(backend);
  } catch (const std::exception&) {
    return false;
  }
}

extern "C" int kvsplit_dist_init(const char* backend, bool strict, void** group) {
  return guarded([&] { *group = new dist::Group(dist::init(strict, backend)); });
}

extern "C" void kvsplit_dist_free(void* group) {
  delete static_cast<dist::Group*>(group);
}

extern "C" int kvsplit_dist_rank(const void* group) {
  return static_cast<const dist::Group*>(group)->rank();
}

extern "C" int kvsplit_dist_size(const void* group) {
  return static_cast<const dist::Group*>(group)->size();
}

extern "C" int kvsplit_dist_split(const void* group, int color, int key, void** out) {
  return guarded([&] { *out = new dist::Group(static_cast<const dist::Group*>(group)->split(color, key)); });
}

namespace {
// The op's stream: the default device's (a CPU group runs on the CPU stream whatever it is).
template <class F>
int op(mlx_array* res, const void* group, F&& f) {
  return guarded([&] {
    const dist::Group& g = *static_cast<const dist::Group*>(group);
    mlx_array_set_(*res, f(g));
  });
}
}  // namespace

extern "C" int kvsplit_dist_all_sum(mlx_array* res, const mlx_array x, const void* group) {
  return op(res, group, [&](const dist::Group& g) { return dist::all_sum(mlx_array_get_(x), g); });
}

extern "C" int kvsplit_dist_all_gather(mlx_array* res, const mlx_array x, const void* group) {
  return op(res, group, [&](const dist::Group& g) { return dist::all_gather(mlx_array_get_(x), g); });
}

extern "C" int kvsplit_dist_send(mlx_array* res, const mlx_array x, int dst, const void* group) {
  return op(res, group, [&](const dist::Group& g) { return dist::send(mlx_array_get_(x), dst, g); });
}

extern "C" int kvsplit_dist_recv_like(mlx_array* res, const mlx_array like, int src, const void* group) {
  return op(res, group, [&](const dist::Group& g) { return dist::recv_like(mlx_array_get_(like), src, g); });
}

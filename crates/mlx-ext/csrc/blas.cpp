// Which OpenBLAS kernels MLX's CPU matmuls run on. setup.sh puts Debian's OpenBLAS (a
// DYNAMIC_ARCH build) under the mlx-cpu wheel's BLAS names; at load it picks kernels for the CPU
// it recognises. Debian bookworm's 0.3.21 does not recognise Sapphire Rapids (nor some CPUs a
// hypervisor reports generically) and falls back to its Prescott kernels, SSE3 only: on the
// project's AVX-512 Xeon a 4000-token prefill then spent 41% of its time in
// sgemm_kernel_PRESCOTT, and ran at 0.66x of the same prefill on the SkylakeX kernels.
//
// The library reads OPENBLAS_CORETYPE once, when it is loaded (before main), so the choice is
// redone here through its own exported re-initialisation, before the first matmul, and only
// where it fell back to Prescott on a CPU that has AVX-512 or AVX2: a CPU it recognises, a user's
// own OPENBLAS_CORETYPE, or another BLAS (no such symbols) are left alone.
#include <dlfcn.h>
#include <strings.h>

#include <cstdlib>
#include <string>

namespace {

using CoreName = char* (*)();
using Hook = void (*)();

std::string g_note;

// The kernel family to ask for on this CPU, or nullptr where Prescott is already the best.
const char* wanted_core() {
#if defined(__x86_64__) || defined(_M_X64)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return "SkylakeX";
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
  return nullptr;
}

}  // namespace

extern "C" const char* kvsplit_blas_select(void) {
  static const bool done = [] {
    auto corename = reinterpret_cast<CoreName>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
    if (!corename) return true;  // not OpenBLAS: g_note stays empty
    std::string before = corename();
    auto quit = reinterpret_cast<Hook>(dlsym(RTLD_DEFAULT, "gotoblas_dynamic_quit"));
    auto init = reinterpret_cast<Hook>(dlsym(RTLD_DEFAULT, "gotoblas_dynamic_init"));
    const char* want = wanted_core();
    if (strcasecmp(before.c_str(), "prescott") == 0 && want && quit && init && !std::getenv("OPENBLAS_CORETYPE")) {
      setenv("OPENBLAS_CORETYPE", want, 0);
      quit();
      init();
      g_note = std::string("OpenBLAS ") + corename() + " kernels (its detection fell back to " + before + ")";
    } else {
      g_note = "OpenBLAS " + before + " kernels";
    }
    return true;
  }();
  (void)done;
  return g_note.c_str();
}

/* Pre-included (-include) when compiling mlx-c and when running bindgen on Linux/x86.
 * Two gaps are closed here; see ../README.md for why each one exists. */
#ifndef KVSPLIT_MLX_COMPAT_H
#define KVSPLIT_MLX_COMPAT_H

#if !defined(__aarch64__)
/* mlx-c's half.h only defines the 16-bit float types on aarch64, yet mlx-rs calls
 * mlx_array_{item,data}_{float16,bfloat16}. */
#ifdef __cplusplus
/* In C++ use MLX's own storage types, so item<T>() and data<T>() instantiate. */
#include <mlx/types/half_types.h>
typedef mlx::core::float16_t float16_t;
typedef mlx::core::bfloat16_t bfloat16_t;
#else
/* bindgen maps _Float16 to __BindgenFloat16(pub u16), the newtype mlx-rs reads via `.0`. */
typedef _Float16 float16_t;
typedef unsigned short bfloat16_t;
#endif
#define HAS_FLOAT16
#define HAS_BFLOAT16
#endif

#if defined(__cplusplus) && !__has_include(<format>)
/* libstdc++ 12 has no <format>; mlx-c uses std::format with bare "{}" placeholders only. */
#include <sstream>
#include <string>
#include <string_view>
namespace std {
inline void kvsplit_format_rest(std::ostringstream& os, std::string_view fmt) {
  os << fmt;
}
template <typename T, typename... Rest>
void kvsplit_format_rest(std::ostringstream& os, std::string_view fmt, const T& value,
                         const Rest&... rest) {
  auto at = fmt.find("{}");
  if (at == std::string_view::npos) {
    os << fmt;
    return;
  }
  os << fmt.substr(0, at) << value;
  kvsplit_format_rest(os, fmt.substr(at + 2), rest...);
}
template <typename... Args>
std::string format(std::string_view fmt, const Args&... args) {
  std::ostringstream os;
  kvsplit_format_rest(os, fmt, args...);
  return os.str();
}
}  // namespace std
#endif

#endif

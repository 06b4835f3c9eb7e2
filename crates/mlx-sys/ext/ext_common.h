// What every primitive's C entry point shares: errors become a return code and a per-thread
// message instead of crossing the C boundary as exceptions.
#pragma once

#include <stdexcept>
#include <string>

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

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

}  // namespace kvsplit

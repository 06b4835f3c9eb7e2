//! Host-side time spent in `mlx_kv::KvCache::update_and_attend` and inside MLX's custom-kernel apply,
//! with `--host-profile` (for telling graph-building cost apart by layer part), and each new
//! custom-kernel launch configuration as it is first built (MLX compiles a kernel the first time
//! its template arguments are seen, which can land in the middle of a timed run).

use std::sync::atomic::{AtomicU64, Ordering};
static LAYER_NS: AtomicU64 = AtomicU64::new(0);
static APPLY_NS: AtomicU64 = AtomicU64::new(0);

pub fn enabled() -> bool {
    crate::options::current().host_profile
}

pub fn add_layer(ns: u64) {
    LAYER_NS.fetch_add(ns, Ordering::Relaxed);
}

pub(crate) fn add_apply(ns: u64) {
    APPLY_NS.fetch_add(ns, Ordering::Relaxed);
}

/// (seconds in update_and_attend, seconds in custom-kernel apply) since the last call.
pub fn take() -> (f64, f64) {
    (LAYER_NS.swap(0, Ordering::Relaxed) as f64 * 1e-9, APPLY_NS.swap(0, Ordering::Relaxed) as f64 * 1e-9)
}

/// Reports a launch configuration of a custom kernel built for the first time in this thread
/// (a new set of template arguments is an NVRTC compile when MLX evaluates it), stamped with
/// Unix seconds so that it can be set beside bench's repeats and MLX's PTX cache file times.
pub(crate) fn new_launch(stem: &str, variant: &str, ints: &[(&str, i32)], types: &[(&str, mlx_rs::Dtype)], grid: (i32, i32)) {
    let now = unix_now();
    let ints: Vec<String> = ints.iter().map(|(n, v)| format!("{n}={v}")).collect();
    let types: Vec<String> = types.iter().map(|(n, d)| format!("{n}={d:?}")).collect();
    eprintln!("host-profile: {now:.3} new launch {stem}{} [{} {}] grid {grid:?}", if variant.is_empty() { String::new() } else { format!(" ({})", variant.replace("#define ", "").trim().replace('\n', ", ")) }, ints.join(" "), types.join(" "));
}

/// Unix time in seconds, the stamp of every `--host-profile` line.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

//! Host-side time spent in `KvCache::update_and_attend` and inside MLX's custom-kernel apply,
//! with `--host-profile` (for telling graph-building cost apart by layer part).

use std::sync::atomic::{AtomicU64, Ordering};
static LAYER_NS: AtomicU64 = AtomicU64::new(0);
static APPLY_NS: AtomicU64 = AtomicU64::new(0);

pub fn enabled() -> bool {
    mlx_ext::options::current().host_profile
}

pub(crate) fn add_layer(ns: u64) {
    LAYER_NS.fetch_add(ns, Ordering::Relaxed);
}

pub(crate) fn add_apply(ns: u64) {
    APPLY_NS.fetch_add(ns, Ordering::Relaxed);
}

/// (seconds in update_and_attend, seconds in custom-kernel apply) since the last call.
pub fn take() -> (f64, f64) {
    (LAYER_NS.swap(0, Ordering::Relaxed) as f64 * 1e-9, APPLY_NS.swap(0, Ordering::Relaxed) as f64 * 1e-9)
}

//! Raw bindings to mlx-c 0.7.0, generated with the same bindgen settings as upstream mlx-sys
//! so that `mlx-rs` 0.33 compiles against them unchanged.
#![allow(non_upper_case_globals)]
#![allow(non_camel_case_types)]
#![allow(non_snake_case)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// `mlx_rs::random::RandomState::new` seeds from this Darwin clock; other platforms lack it.
#[cfg(not(target_os = "macos"))]
#[no_mangle]
pub extern "C" fn mach_approximate_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

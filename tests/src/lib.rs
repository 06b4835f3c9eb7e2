//! Cross-crate tests, and the backend conformance suite: every MLX op the engine relies on,
//! compared with a float64 reference computed in Rust, against named, derived tolerances.
//!
//! The suite exists because MLX backends differ: MLX 0.32.2's CUDA backend gets 4-D/5-D
//! `quantized_matmul` and `quantize` of transposed input wrong while CPU gets them right
//! (shared PLATFORM.md). The engine only uses shapes this suite shows correct on the backend
//! in use; `tests/tests/conformance.rs` checks exactly that.

pub mod cases;
pub mod conformance;
pub mod reference;
pub mod report;
pub mod tolerance;

pub use conformance::{all_cases, run_case, run_cases, run_suite, Case, Tamper};
pub use report::{render_csv, render_markdown, CaseResult, RunInfo};

/// The version of the libmlx loaded at run time (not the one linked at build time: the GPU
/// run swaps libmlx.so through LD_LIBRARY_PATH).
pub fn mlx_version() -> String {
    // SAFETY: mlx_string_new returns an owned empty string that mlx_version fills; its data is a
    // NUL-terminated buffer owned by the string, copied out before the string is freed.
    unsafe {
        let mut s = mlx_sys::mlx_string_new();
        let version = if mlx_sys::mlx_version(&mut s) == 0 {
            let data = mlx_sys::mlx_string_data(s);
            if data.is_null() {
                "unknown".to_string()
            } else {
                std::ffi::CStr::from_ptr(data)
                    .to_string_lossy()
                    .into_owned()
            }
        } else {
            "unknown".to_string()
        };
        mlx_sys::mlx_string_free(s);
        version
    }
}

/// Backend name and MLX version of this process, for table headers and CSV rows.
pub fn run_info() -> RunInfo {
    RunInfo {
        backend: mlx_kv::Backend::current().name().to_string(),
        mlx_version: mlx_version(),
    }
}

//! Compiles our MLX primitives (`csrc/`) against the MLX and mlx-c that `crates/mlx-sys` built
//! with (it exports their include paths). Kept out of mlx-sys so that editing a primitive
//! rebuilds this crate and its dependents, not mlx-rs.
//!
//! The kernels are compiled twice on x86-64, once for AVX2+FMA+F16C (chosen at run time when the
//! CPU has them) and once for the baseline, so the binary runs on any x86-64.

use std::env;
use std::path::PathBuf;

fn main() {
    let dep = |key: &str| env::var(format!("DEP_MLX_{key}")).ok().map(PathBuf::from);
    let (Some(mlx_include), Some(mlxc_include)) = (dep("MLX_INCLUDE"), dep("MLXC_INCLUDE")) else {
        eprintln!("mlx-ext build error: crates/mlx-sys exported no MLX include paths (DEP_MLX_MLX_INCLUDE); is [patch.crates-io] in place?");
        std::process::exit(1);
    };
    let compat = dep("COMPAT");
    let csrc = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("csrc");
    for f in ["kvsplit_ext.h", "ext_common.h", "ext.cpp", "norm_rope.cpp", "kernels.cpp", "kernels.h", "simd8.h", "distributed.cpp", "blas.cpp", "microscaled.cpp"] {
        println!("cargo:rerun-if-changed={}", csrc.join(f).display());
    }
    let x86 = env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64");
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true).std("c++20").opt_level(3).warnings(false).include(&csrc).include(&mlxc_include).include(&mlx_include);
        if let Some(c) = &compat {
            b.flag("-include").flag(c.to_str().expect("utf-8 path"));
        }
        b
    };
    let mut main = base();
    main.file(csrc.join("ext.cpp")).file(csrc.join("norm_rope.cpp")).file(csrc.join("kernels.cpp")).file(csrc.join("distributed.cpp")).file(csrc.join("blas.cpp")).file(csrc.join("microscaled.cpp")).define("KV_NS", "generic");
    if x86 {
        main.define("KVSPLIT_HAVE_AVX2", None);
    }
    main.compile("kvsplit_ext");
    if x86 {
        base().file(csrc.join("kernels.cpp")).define("KV_NS", "avx2").flag("-mavx2").flag("-mfma").flag("-mf16c").compile("kvsplit_ext_avx2");
    }
    // Tests and examples of this crate are binaries: they need the rpath to libmlx.so too.
    if let Ok(dir) = env::var("DEP_MLX_LIBDIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

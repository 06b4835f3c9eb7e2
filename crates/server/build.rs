//! A library's link args never reach the binaries that use it, so every crate that links
//! binaries or tests sets the rpath to the libmlx.so that crates/mlx-sys linked against.
fn main() {
    if let Ok(dir) = std::env::var("DEP_MLX_LIBDIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

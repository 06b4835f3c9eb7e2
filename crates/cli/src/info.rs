//! `kvsplit-mlx info`: what MLX this binary runs on.

use anyhow::Result;

fn mlx_version() -> String {
    unsafe {
        let mut s = mlx_sys::mlx_string_new();
        mlx_sys::mlx_version(&mut s);
        let v = std::ffi::CStr::from_ptr(mlx_sys::mlx_string_data(s)).to_string_lossy().into_owned();
        mlx_sys::mlx_string_free(s);
        v
    }
}

/// Path of the libmlx.so this process loaded, from the dynamic loader's view.
fn libmlx_path() -> String {
    std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| maps.lines().find(|l| l.contains("libmlx")).and_then(|l| l.split_whitespace().last().map(String::from)))
        .unwrap_or_else(|| "unknown (no /proc/self/maps)".into())
}

pub fn run() -> Result<()> {
    let backend = mlx_kv::Backend::current();
    let device = mlx_rs::Device::default();
    // Touch MLX so memory counters exist.
    mlx_rs::Array::from_f32(1.0).eval()?;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!("mlx version:   {}", mlx_version());
    println!("backend:       {} (device {:?})", backend.name(), device);
    println!("compute dtype: {:?}", backend.compute_dtype());
    println!("libmlx:        {}", libmlx_path());
    let blas = mlx_ext::options::blas_kernels();
    println!("CPU BLAS:      {}", if blas.is_empty() { "not OpenBLAS (MLX's own BLAS)" } else { &blas });
    println!("active memory: {:.1} MiB", mib(mlx_rs::memory::active_memory()?));
    println!("peak memory:   {:.1} MiB", mib(mlx_rs::memory::peak_memory()?));
    println!("memory limit:  {:.1} MiB", mib(mlx_rs::memory::memory_limit()?));
    println!("cache memory:  {:.1} MiB", mib(mlx_rs::memory::cache_memory()?));
    // MLX has no getter for the cache limit: setting returns the previous value, which we restore.
    let limit = mlx_rs::memory::set_cache_limit(usize::MAX)?;
    mlx_rs::memory::set_cache_limit(limit)?;
    println!("cache limit:   {:.1} MiB", mib(limit));
    Ok(())
}

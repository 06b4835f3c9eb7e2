//! Builds mlx-c against a prebuilt MLX and generates the same bindgen API as upstream
//! mlx-sys 0.7.0, so that mlx-rs 0.33 compiles unchanged.
//!
//! Where things come from (first match wins):
//! - MLX: `MLX_DIR` (a prefix with lib/, include/, share/cmake/MLX), else the PyPI wheel
//!   `mlx-cpu==0.32.2` (or `mlx-cuda-13==0.32.2` with feature `cuda` / `KVSPLIT_MLX_WHEEL=cuda`)
//!   unpacked by `scripts/setup.sh` into the cache. On macOS without `MLX_DIR`, mlx-c's own CMake
//!   builds MLX with Metal, as upstream does (untested here: no Mac in our CI).
//! - mlx-c sources: `MLX_C_SRC`, else the crates.io package `mlx-sys-0.7.0.crate`, fetched with
//!   cargo and unpacked into the cache. We never commit a copy.
//! - cmake and libclang: `PATH`/`LIBCLANG_PATH`, else the tools venv that setup creates.
//!
//! The mlx-c build is cached under the cache directory, keyed by its inputs, so a fresh clone
//! (CI) links in seconds instead of recompiling mlx-c.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

const MLX_VERSION: &str = "0.32.2";
const MLX_SYS_VERSION: &str = "0.7.0";

fn main() {
    for var in [
        "MLX_DIR",
        "MLX_C_SRC",
        "KVSPLIT_CACHE",
        "KVSPLIT_MLX_WHEEL",
        "LIBCLANG_PATH",
        "CMAKE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=compat/kvsplit_compat.h");
    println!("cargo:rerun-if-changed=build.rs");

    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let cache = cache_dir();
    let mlx_c = mlx_c_source(&cache);
    let compat = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("compat/kvsplit_compat.h");
    let prefix = mlx_prefix(&cache, &target_os);

    let build = build_mlx_c(&cache, &mlx_c, prefix.as_deref(), &compat, &target_os);
    export_includes(&build, &mlx_c, prefix.as_deref(), &compat, &target_os);
    link(&build, prefix.as_deref(), &target_os);
    generate_bindings(&cache, &mlx_c, prefix.as_deref(), &compat, &target_os);
}

fn fail(msg: String) -> ! {
    // One line: cargo shows it under the build script's stderr, and it must say what to run.
    eprintln!("mlx-sys build error: {msg}");
    std::process::exit(1);
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("KVSPLIT_CACHE") {
        return PathBuf::from(dir);
    }
    let home = env::var_os("HOME").unwrap_or_else(|| fail("HOME is unset; set KVSPLIT_CACHE".into()));
    PathBuf::from(home).join(".cache/kvsplit-mlx")
}

fn wheel_name() -> &'static str {
    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some()
        || env::var("KVSPLIT_MLX_WHEEL").is_ok_and(|w| w == "cuda" || w == "mlx-cuda-13");
    if cuda {
        "mlx-cuda-13"
    } else {
        "mlx-cpu"
    }
}

/// The MLX install prefix, or None where mlx-c's CMake should build MLX itself (macOS).
fn mlx_prefix(cache: &Path, target_os: &str) -> Option<PathBuf> {
    if let Some(dir) = env::var_os("MLX_DIR") {
        let dir = PathBuf::from(dir);
        if !dir.join("share/cmake/MLX/MLXConfig.cmake").exists() {
            fail(format!(
                "MLX_DIR={} has no share/cmake/MLX/MLXConfig.cmake; point it at an MLX {MLX_VERSION} install prefix",
                dir.display()
            ));
        }
        return Some(dir);
    }
    if target_os == "macos" {
        return None;
    }
    let dir = cache.join(format!("wheels/{}-{MLX_VERSION}/mlx", wheel_name()));
    if !dir.join("share/cmake/MLX/MLXConfig.cmake").exists() {
        fail(format!(
            "MLX {MLX_VERSION} not found at {}: run scripts/setup.sh (it unpacks the PyPI wheel {}=={MLX_VERSION}), or set MLX_DIR",
            dir.display(),
            wheel_name()
        ));
    }
    Some(dir)
}

/// mlx-c sources from the crates.io package of upstream mlx-sys.
fn mlx_c_source(cache: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("MLX_C_SRC") {
        return PathBuf::from(dir);
    }
    let unpacked = cache.join(format!("src/mlx-sys-{MLX_SYS_VERSION}"));
    let mlx_c = unpacked.join("src/mlx-c");
    if mlx_c.join("CMakeLists.txt").exists() {
        return mlx_c;
    }
    let crate_file = find_registry_crate().unwrap_or_else(|| {
        fail(format!(
            "mlx-c sources not found: run scripts/setup.sh (it fetches mlx-sys-{MLX_SYS_VERSION}.crate with cargo) or set MLX_C_SRC"
        ))
    });
    let parent = unpacked.parent().unwrap();
    fs::create_dir_all(parent).unwrap();
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&crate_file)
        .arg("-C")
        .arg(parent)
        .status()
        .unwrap_or_else(|e| fail(format!("cannot run tar to unpack {}: {e}", crate_file.display())));
    if !status.success() || !mlx_c.join("CMakeLists.txt").exists() {
        fail(format!("unpacking {} did not yield {}", crate_file.display(), mlx_c.display()));
    }
    mlx_c
}

fn find_registry_crate() -> Option<PathBuf> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let name = format!("mlx-sys-{MLX_SYS_VERSION}.crate");
    fs::read_dir(cargo_home.join("registry/cache"))
        .ok()?
        .flatten()
        .map(|registry| registry.path().join(&name))
        .find(|path| path.exists())
}

fn cmake_program(cache: &Path) -> PathBuf {
    if let Some(cmake) = env::var_os("CMAKE") {
        return PathBuf::from(cmake);
    }
    let venv = cache.join("tools/bin/cmake");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("cmake")
}

fn build_key(mlx_c: &Path, prefix: Option<&Path>, compat: &Path, target_os: &str) -> String {
    let mut hasher = DefaultHasher::new();
    for path in [mlx_c.join("CMakeLists.txt"), compat.to_path_buf()] {
        fs::read(&path).unwrap_or_default().hash(&mut hasher);
    }
    prefix.hash(&mut hasher);
    target_os.hash(&mut hasher);
    env::var("CARGO_FEATURE_METAL").is_ok().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Builds libmlxc.a once per input set; returns the directory holding it.
fn build_mlx_c(cache: &Path, mlx_c: &Path, prefix: Option<&Path>, compat: &Path, target_os: &str) -> PathBuf {
    let key = build_key(mlx_c, prefix, compat, target_os);
    let done = cache.join(format!("build/mlx-c-{key}"));
    if done.join("libmlxc.a").exists() {
        return done;
    }
    // Build beside the final path and rename, so an interrupted build never looks finished.
    let work = cache.join(format!("build/mlx-c-{key}.tmp"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();

    let cmake = cmake_program(cache);
    let mut configure = Command::new(&cmake);
    configure
        .arg("-S")
        .arg(mlx_c)
        .arg("-B")
        .arg(&work)
        .arg("-DCMAKE_BUILD_TYPE=Release")
        .arg("-DBUILD_SHARED_LIBS=OFF")
        .arg("-DCMAKE_POSITION_INDEPENDENT_CODE=ON")
        .arg("-DMLX_C_BUILD_EXAMPLES=OFF");
    match prefix {
        Some(prefix) => {
            configure
                .arg("-DMLX_C_USE_SYSTEM_MLX=ON")
                .arg(format!("-DMLX_DIR={}", prefix.join("share/cmake/MLX").display()));
        }
        None => {
            let metal = if env::var_os("CARGO_FEATURE_METAL").is_some() { "ON" } else { "OFF" };
            configure.arg(format!("-DMLX_BUILD_METAL={metal}"));
        }
    }
    if target_os != "macos" {
        // The compat header includes MLX's half types, so CMake's own compiler probe needs
        // MLX's include directory too.
        let include = prefix.map(|p| format!(" -I{}", p.join("include").display())).unwrap_or_default();
        configure.arg(format!("-DCMAKE_CXX_FLAGS=-include {}{include}", compat.display()));
    }
    run(&mut configure, "cmake configure of mlx-c");
    let jobs = env::var("NUM_JOBS").unwrap_or_else(|_| "2".into());
    run(
        Command::new(&cmake).arg("--build").arg(&work).arg("-j").arg(jobs).arg("--target").arg("mlxc"),
        "cmake build of mlx-c",
    );
    let lib = find_file(&work, "libmlxc.a")
        .unwrap_or_else(|| fail(format!("mlx-c built but libmlxc.a is missing under {}", work.display())));
    if lib != work.join("libmlxc.a") {
        fs::copy(&lib, work.join("libmlxc.a")).unwrap();
    }
    let _ = fs::remove_dir_all(&done);
    fs::rename(&work, &done).unwrap();
    done
}

/// What `crates/mlx-ext` needs to compile C++ against the same MLX and mlx-c: dependents'
/// build scripts read these as `DEP_MLX_MLX_INCLUDE`, `DEP_MLX_MLXC_INCLUDE`, `DEP_MLX_COMPAT`.
fn export_includes(build: &Path, mlx_c: &Path, prefix: Option<&Path>, compat: &Path, target_os: &str) {
    let mlx_include = match prefix {
        Some(p) => p.join("include"),
        None => build.join("_deps/mlx-src"),
    };
    println!("cargo:mlx_include={}", mlx_include.display());
    println!("cargo:mlxc_include={}", mlx_c.display());
    if target_os != "macos" {
        println!("cargo:compat={}", compat.display());
    }
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        }
    }
    None
}

fn run(cmd: &mut Command, what: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(format!("{what}: cannot start {:?}: {e} (run scripts/setup.sh)", cmd.get_program())));
    if !status.success() {
        fail(format!("{what} failed ({status})"));
    }
}

fn link(build: &Path, prefix: Option<&Path>, target_os: &str) {
    println!("cargo:rustc-link-search=native={}", build.display());
    println!("cargo:rustc-link-lib=static=mlxc");
    match prefix {
        Some(prefix) => {
            let libdir = prefix.join("lib");
            println!("cargo:rustc-link-search=native={}", libdir.display());
            println!("cargo:rustc-link-lib=dylib=mlx");
            // Dependents' build scripts read this as DEP_MLX_LIBDIR and set the rpath of the
            // binaries they link: a library's own link args never reach those binaries.
            println!("cargo:libdir={}", libdir.display());
        }
        None => {
            println!("cargo:rustc-link-search=native={}/_deps/mlx-build", build.display());
            println!("cargo:rustc-link-lib=static=mlx");
        }
    }
    if target_os == "macos" {
        println!("cargo:rustc-link-lib=c++");
        println!("cargo:rustc-link-lib=framework=Foundation");
        if env::var_os("CARGO_FEATURE_METAL").is_some() {
            println!("cargo:rustc-link-lib=framework=Metal");
        }
        if env::var_os("CARGO_FEATURE_ACCELERATE").is_some() {
            println!("cargo:rustc-link-lib=framework=Accelerate");
        }
    } else {
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
}

fn libclang_dir(cache: &Path) -> Option<PathBuf> {
    if env::var_os("LIBCLANG_PATH").is_some() {
        return None;
    }
    let lib = cache.join("tools/lib");
    fs::read_dir(&lib)
        .ok()?
        .flatten()
        .map(|python| python.path().join("site-packages/clang/native"))
        .find(|dir| dir.exists())
}

fn generate_bindings(cache: &Path, mlx_c: &Path, prefix: Option<&Path>, compat: &Path, target_os: &str) {
    let mut builtin_include = None;
    if let Some(dir) = libclang_dir(cache) {
        // bindgen loads libclang at run time through this variable.
        env::set_var("LIBCLANG_PATH", dir);
        // PyPI's libclang ships no resource headers (float.h, stddef.h): borrow the C
        // compiler's, which declare the same things for parsing purposes.
        builtin_include = compiler_include_dir();
    }
    let mut headers: Vec<PathBuf> = fs::read_dir(mlx_c.join("mlx/c"))
        .unwrap_or_else(|e| fail(format!("cannot list {}/mlx/c: {e}", mlx_c.display())))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "h"))
        .collect();
    headers.sort();
    let mut builder = bindgen::Builder::default()
        .rust_target("1.73.0".parse().expect("rust-version"))
        .clang_arg(format!("-I{}", mlx_c.display()))
        .blocklist_function("malloc")
        .blocklist_function("realloc");
    if let Some(prefix) = prefix {
        builder = builder.clang_arg(format!("-I{}", prefix.join("include").display()));
    }
    if let Some(dir) = builtin_include {
        builder = builder.clang_arg(format!("-isystem{}", dir.display()));
    }
    if target_os != "macos" {
        builder = builder.clang_arg("-include").clang_arg(compat.display().to_string());
    }
    for header in &headers {
        println!("cargo:rerun-if-changed={}", header.display());
        builder = builder.header(header.to_string_lossy());
    }
    let bindings = builder
        .generate()
        .unwrap_or_else(|e| fail(format!("bindgen failed: {e} (is libclang installed? run scripts/setup.sh)")));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings.write_to_file(out).expect("write bindings.rs");
}

fn compiler_include_dir() -> Option<PathBuf> {
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(cc).arg("-print-file-name=include").output().ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    dir.join("float.h").exists().then_some(dir)
}

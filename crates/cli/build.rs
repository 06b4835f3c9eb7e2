//! Two things the binary needs from its build:
//! - the rpath to the libmlx.so that crates/mlx-sys linked against (a library's link args never
//!   reach the binaries that use it);
//! - the commit its sources came from, which every result row records. It is taken here, at
//!   build time, so a binary run from another folder (or carried to the GPU machine) still
//!   reports its own commit, with `-dirty` when the engine's sources differed from it.
use std::path::Path;
use std::process::Command;

fn main() {
    if let Ok(dir) = std::env::var("DEP_MLX_LIBDIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // Any change to the engine's sources or to the checked-out commit rebuilds the stamp.
    // A path that does not exist would make cargo rerun this on every build.
    for p in ["crates", "Cargo.toml", "Cargo.lock", ".git/HEAD", ".git/refs", ".git/packed-refs"] {
        let p = root.join(p);
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    let git = |args: &[&str]| {
        Command::new("git").arg("-C").arg(&root).args(args).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(h) => {
            // Only what is compiled counts: docs or results rewritten by a run do not make the
            // binary differ from its commit.
            let dirty = git(&["status", "--porcelain", "--untracked-files=no", "--", "crates", "Cargo.toml", "Cargo.lock"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{h}-dirty")
            } else {
                h
            }
        }
        None => "unknown".into(),
    };
    println!("cargo:rustc-env=KVSPLIT_BUILD_COMMIT={commit}");
}

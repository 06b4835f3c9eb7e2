//! Rules about the sources that no compiler checks.
//!
//! - Engine choices are typed options (`mlx_ext::EngineOptions`, flags of every command), not
//!   environment variables: the only `KVSPLIT_*` names a source may quote are locations and
//!   build selection.
//! - `crates/models` and `crates/mlx-kv` have no import circle between their modules
//!   (`scripts/import-circles.sh`, which anyone can run).

use std::path::{Path, PathBuf};

/// `KVSPLIT_*` names the sources may quote, and why.
const ALLOWED: &[(&str, &str)] = &[
    ("KVSPLIT_CACHE", "location of the cache (MLX, models, data)"),
    ("KVSPLIT_MLX_WHEEL", "build selection: which MLX wheel (cpu or cuda)"),
    ("KVSPLIT_BUILD_COMMIT", "build stamp, set by build.rs at compile time"),
    ("KVSPLIT_HAVE_AVX2", "build selection: a C++ macro that build.rs defines"),
    ("KVSPLIT_PEERS", "location of the peer engines' venvs"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "target") {
                sources(&p, out);
            }
        } else if p.extension().is_some_and(|x| ["rs", "cpp", "h", "cu", "cuh"].iter().any(|e| x == *e)) {
            out.push(p);
        }
    }
}

/// Every `"KVSPLIT_..."` string literal in `text`.
fn quoted_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("\"KVSPLIT_") {
        let tail = &rest[i + 1..];
        let name: String = tail.chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
        names.push(name);
        rest = &tail[1..];
    }
    names
}

#[test]
fn quoted_name_finder_sees_every_literal() {
    let text = r#"std::env::var("KVSPLIT_FUSED"); getenv("KVSPLIT_CPU_THREADS") KVSPLIT_KERNELS(x) "KVSPLIT_CACHE""#;
    assert_eq!(quoted_names(text), vec!["KVSPLIT_FUSED", "KVSPLIT_CPU_THREADS", "KVSPLIT_CACHE"]);
}

#[test]
fn no_environment_switch_other_than_locations_and_build_selection() {
    let mut files = Vec::new();
    for dir in ["crates", "tests/src", "tests/tests"] {
        sources(&root().join(dir), &mut files);
    }
    assert!(files.len() > 50, "found only {} source files under {}", files.len(), root().display());
    let mut bad = Vec::new();
    for f in &files {
        if f.ends_with("tests/tests/source_rules.rs") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for name in quoted_names(&text) {
            if !ALLOWED.iter().any(|(a, _)| *a == name) {
                bad.push(format!("{}: {name}", f.strip_prefix(root()).unwrap().display()));
            }
        }
    }
    assert!(bad.is_empty(), "environment switches in the sources (make them EngineOptions flags):\n{}", bad.join("\n"));
}

#[test]
fn library_crates_have_no_import_circle() {
    for krate in ["crates/models", "crates/mlx-kv", "crates/mlx-ext", "crates/server", "crates/cli"] {
        let out = std::process::Command::new("bash")
            .arg(root().join("scripts/import-circles.sh"))
            .arg(krate)
            .current_dir(root())
            .output()
            .expect("bash runs scripts/import-circles.sh");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{krate}:\n{text}");
        assert!(text.contains("no import circles"), "{krate}: unexpected report\n{text}");
    }
}

//! `kvsplit-mlx convert` as a user runs it: the built binary on the default model
//! (SmolLM2-135M-Instruct Q4_1, fetched by scripts/setup.sh). Exit status, what it prints,
//! what it leaves on disk, and errors that name the flag or file at fault.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvsplit-mlx"))
}

fn default_model() -> PathBuf {
    test_support::assets::default_model()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvsplit-cli-convert-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn convert(from: &Path, out: &Path, extra: &[&str]) -> Output {
    bin().arg("convert").arg("--from").arg(from).arg("--out").arg(out).args(extra).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Fails with the output shown when the command failed.
fn ok(o: &Output) -> String {
    assert!(o.status.success(), "exit {:?}\nstdout: {}\nstderr: {}", o.status.code(), text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
}

/// The error line of a command that must fail with exit status 1.
fn failure(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "expected failure\nstdout: {}\nstderr: {}", text(&o.stdout), text(&o.stderr));
    text(&o.stderr)
}

#[test]
fn converts_then_refuses_to_overwrite_without_force_and_the_result_generates() {
    let root = temp_dir("ok");
    let out = root.join("smollm2-mlx");
    let stdout = ok(&convert(&default_model(), &out, &[]));
    assert!(stdout.contains("wrote") && stdout.contains("shard"), "{stdout}");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(out.join(f).is_file(), "{f} missing after convert");
    }
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    let before = std::fs::metadata(out.join("model.safetensors")).unwrap().modified().unwrap();

    let e = failure(&convert(&default_model(), &out, &[]));
    assert!(e.contains("--force") && e.contains(&out.display().to_string()), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), config, "refused run changed the output");
    assert_eq!(std::fs::metadata(out.join("model.safetensors")).unwrap().modified().unwrap(), before);

    let stdout = ok(&convert(&default_model(), &out, &["--force", "-q", "--q-bits", "8", "--q-group-size", "64"]));
    assert!(stdout.contains("wrote"), "{stdout}");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["quantization"]["bits"].as_i64(), config["quantization"]["group_size"].as_i64()), (Some(8), Some(64)));
    let leftovers: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temporary directories left behind: {leftovers:?}");

    let gen = bin()
        .args(["generate", "--max-tokens", "8", "--prompt", "The capital of France is", "--model"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = ok(&gen);
    assert!(stdout.contains("Paris"), "{stdout}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn bad_quantization_flags_are_named() {
    let root = temp_dir("flags");
    let out = root.join("m");
    for (args, flag, value) in [
        (&["-q", "--q-bits", "7"][..], "--q-bits", "7"),
        (&["-q", "--q-group-size", "48"][..], "--q-group-size", "48"),
        (&["--quant-predicate", "mixed_5_9"][..], "--quant-predicate", "mixed_5_9"),
        (&["--q-embed-bits", "1"][..], "--q-embed-bits", "1"),
        (&["--max-shard-size", "lots"][..], "--max-shard-size", "lots"),
        (&["--dtype", "f8"][..], "--dtype", "f8"),
    ] {
        let e = failure(&convert(&default_model(), &out, args));
        assert!(e.contains(flag) && e.contains(value), "{args:?}: {e}");
        assert!(!out.exists(), "{args:?} left an output behind");
    }
    // clap rejects the combination before anything is read.
    let o = convert(&default_model(), &out, &["-q", "--dequantize"]);
    assert!(!o.status.success() && text(&o.stderr).contains("--dequantize"), "{}", text(&o.stderr));
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn truncated_or_missing_sources_are_named() {
    let root = temp_dir("truncated");
    let gguf = root.join("cut.gguf");
    let bytes = std::fs::read(default_model()).unwrap();
    // Header and metadata intact, tensor data cut short.
    std::fs::write(&gguf, &bytes[..bytes.len() / 3]).unwrap();
    let out = root.join("m");
    let e = failure(&convert(&gguf, &out, &[]));
    assert!(e.contains(&gguf.display().to_string()), "{e}");
    assert!(!out.exists(), "a failed convert left {} behind", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temporary files left behind: {leftovers:?}");

    let e = failure(&convert(&root.join("absent.gguf"), &out, &[]));
    assert!(e.contains("--from") && e.contains("absent.gguf"), "{e}");
    std::fs::remove_dir_all(&root).ok();
}

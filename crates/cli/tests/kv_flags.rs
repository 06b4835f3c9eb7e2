//! K/V flags are checked against the model's config before any weight is read, and errors name
//! the flag, the setting and the model's shape.

use std::process::Command;

fn kvsplit(args: &[&str]) -> (bool, String) {
    let model = test_support::assets::default_model();
    let out = Command::new(env!("CARGO_BIN_EXE_kvsplit-mlx")).args(args).arg("--model").arg(&model).output().expect("run kvsplit-mlx");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_group_wider_than_the_heads_is_refused_before_loading() {
    // SmolLM2-135M: 30 layers, head_dim 64. A group of 128 cannot tile a 64-wide head.
    let (ok, out) = kvsplit(&["generate", "--kv", "8,4", "--kv-group-size", "128", "--max-tokens", "1"]);
    assert!(!ok && !out.contains("panicked"), "{out}");
    assert!(out.contains("--kv 8,4") && out.contains("head_dim 64") && out.contains("128"), "{out}");
    // The same check guards every sweep, and names the element of the list at fault, as given.
    let (ok, out) = kvsplit(&["ppl", "wikitext", "--kv", "fp16", "--kv", "4,4", "--kv-group-size", "64,128"]);
    assert!(!ok && out.contains("--kv 4,4") && out.contains("head_dim 64"), "{out}");
}

#[test]
fn a_layer_override_outside_the_model_is_refused() {
    let (ok, out) = kvsplit(&["bench", "--kv", "k8v4", "--kv-layers", "last:40=8,8", "-d", "0", "-p", "8", "-n", "1", "-r", "1", "--out", "/tmp"]);
    assert!(!ok && out.contains("--kv-layers") && out.contains("30 layers"), "{out}");
}

#[test]
fn enum_flags_list_their_choices() {
    let (ok, out) = kvsplit(&["generate", "--kv-rotate", "sideways"]);
    assert!(!ok && out.contains("--kv-rotate") && out.contains("none") && out.contains("kv"), "{out}");
}

//! `kvsplit-mlx serve` driven by real clients over loopback (`scripts/serve-test.sh`): the
//! official `openai` Python client (chat and completions, streaming, usage, stop sequences, the
//! prompt cache across turns, error objects, a client disconnect), the chat page in headless
//! Chromium, then SIGTERM -> exit 0; then a server seeded with a saved cache (`cache-prompt`,
//! `serve --prompt-cache-file`) reuses all of its tokens.

use std::path::Path;
use std::process::Command;

#[test]
fn openai_client_against_the_server() {
    test_support::assets::default_model();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("scripts/serve-test.sh"))
        .arg(env!("CARGO_BIN_EXE_kvsplit-mlx"))
        .output()
        .expect("bash runs scripts/serve-test.sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "serve-test.sh failed:\n{text}");
    for want in ["checks passed", "page-test: PASS", "SIGTERM -> exit 0", "--prompt-cache-file reused"] {
        assert!(text.contains(want), "no '{want}' in:\n{text}");
    }
}

//! `kvsplit-mlx generate` must exit when generation stops early. With the pipelined decode a
//! step is already running when the end-of-sequence token arrives; dropping it unfinished made
//! the process hang at exit (the summary was printed, the process never ended).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn generate_exits_after_an_early_end_of_sequence() {
    // Greedy SmolLM2 answers this prompt and emits EOS well before 200 tokens.
    let model = test_support::assets::default_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvsplit-mlx"))
        .args(["generate", "--kv", "8,4", "--max-tokens", "200", "--prompt", "The capital of France is", "--model"])
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run kvsplit-mlx");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for kvsplit-mlx") {
            break status;
        }
        if start.elapsed() > Duration::from_secs(180) {
            child.kill().ok();
            panic!("generate did not exit within 180 s after an early stop");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output().expect("read output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(status.success(), "exit status {status}; output:\n{text}");
    assert!(text.contains("Paris"), "unexpected completion:\n{text}");
    let generated: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("Generation: ")?.split_whitespace().next()?.parse().ok())
        .expect("a 'Generation: N tokens' summary line");
    assert!(generated < 200, "the test needs an early stop, but all {generated} tokens were generated");
}

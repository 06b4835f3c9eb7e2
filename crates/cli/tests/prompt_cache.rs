//! `cache-prompt` then `generate --prompt-cache-file` gives the tokens a one-shot `generate` on
//! the whole prompt gives, with greedy decoding.
//!
//! Why exactly equal: the loaded cache holds the bytes the saved one held (mlx-kv's
//! `cache_file` test checks attention over it bit for bit), and with the same prefill step `N`
//! both runs cut the prompt at the same positions (the cached part is one chunk of `N`, the rest
//! starts at `N`), so every forward pass runs the same ops on the same inputs. With other chunk
//! boundaries the matmul shapes differ, rounding differs, and a near-tie argmax could flip; that
//! is why the step is set to the cached length rather than left at its default.

use std::path::PathBuf;
use std::process::Command;

const PREFIX: &str = "Paris is the capital and largest city of France. It is located on the Seine river, in the \
    north of the country. The city has a population of about two million people.\n";
const QUESTION: &str = "Question: What river runs through Paris? Answer:";

fn kvsplit(args: &[&str]) -> (bool, String) {
    let model = test_support::assets::default_model();
    let out = Command::new(env!("CARGO_BIN_EXE_kvsplit-mlx")).args(args).arg("--model").arg(&model).output().expect("run kvsplit-mlx");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The number in a summary line `Prompt: N tokens, ...`.
fn prompt_tokens(out: &str) -> usize {
    out.lines()
        .find_map(|l| l.strip_prefix("Prompt: ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no 'Prompt: N tokens' line in:\n{out}"))
}

fn completion(out: &str) -> &str {
    out.split("==========").next().unwrap()
}

#[test]
fn a_cached_prompt_continues_like_the_whole_prompt() {
    let dir = std::env::temp_dir().join(format!("kvsplit-prompt-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prefix_file = dir.join("prefix.txt");
    std::fs::write(&prefix_file, PREFIX).unwrap();
    let cache: PathBuf = dir.join("prefix.safetensors");
    let (p, c) = (prefix_file.to_str().unwrap(), cache.to_str().unwrap());

    let (ok, out) = kvsplit(&["cache-prompt", "--kv", "8,4", "--prompt-file", p, "--out", c]);
    assert!(ok, "{out}");
    let n = prompt_tokens(&out);
    let step = n.to_string();

    let gen = ["generate", "--kv", "8,4", "--max-tokens", "24", "--prefill-step", &step];
    let (ok, cached) = kvsplit(&[&gen[..], &["--prompt-cache-file", c, "--prompt", QUESTION]].concat());
    assert!(ok, "{cached}");
    let whole = format!("{PREFIX}{QUESTION}");
    let (ok, oneshot) = kvsplit(&[&gen[..], &["--prompt", &whole]].concat());
    assert!(ok, "{oneshot}");
    // The prompts are the same tokens only if the prefix's tokens end where the question's begin.
    assert_eq!(n + prompt_tokens(&cached), prompt_tokens(&oneshot), "the split changed the tokenization");
    assert!(cached.contains(&format!("Prompt cache: {n} tokens")), "{cached}");
    let (a, b) = (completion(&cached), completion(&oneshot));
    assert!(a.trim().len() > 5, "too short a completion to compare:\n{a}");
    assert_eq!(a, b, "continuing from the cache file differs from the one-shot run");

    // K/V flags that disagree with the file fail, naming both settings; default flags take it.
    let (ok, out) = kvsplit(&["generate", "--kv", "4,4", "--prompt-cache-file", c, "--max-tokens", "1"]);
    assert!(!ok && !out.contains("panicked") && out.contains("k8v4") && out.contains("k4v4") && out.contains(c), "{out}");
    let (ok, out) = kvsplit(&["generate", "--prompt-cache-file", c, "--max-tokens", "1"]);
    assert!(ok && out.contains("(k8v4;"), "{out}");

    // A damaged file is an error naming it, not a crash.
    let bytes = std::fs::read(&cache).unwrap();
    std::fs::write(&cache, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, out) = kvsplit(&["generate", "--prompt-cache-file", c, "--max-tokens", "1"]);
    assert!(!ok && !out.contains("panicked") && out.contains(c) && out.contains("not a valid safetensors"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

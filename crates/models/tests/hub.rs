//! `--model owner/name` through hf-hub against a loopback server that speaks the Hub's file
//! protocol (test_support::hub_server).
//!
//! Environment variables are process-wide, so every scenario runs in one test, in order.

use std::collections::HashMap;
use test_support::hub_server::{model_path, HubServer, COMMIT};

const REPO: &str = "mlx-community/tiny-test";

fn set_env(home: &std::path::Path, endpoint: &str, offline: bool) {
    std::env::set_var("HF_HOME", home);
    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_ENDPOINT", endpoint);
    if offline {
        std::env::set_var("HF_HUB_OFFLINE", "1");
    } else {
        std::env::remove_var("HF_HUB_OFFLINE");
    }
}

#[test]
fn hub_ids_download_into_the_hf_cache_and_work_offline() {
    let tmp = std::env::temp_dir().join(format!("kvsplit-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let shard = |n: u8| (0..3000u32).map(|i| (i as u8).wrapping_mul(n)).collect::<Vec<u8>>();
    let index = r#"{"metadata": {"total_size": 6000}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
    let files: HashMap<String, Vec<u8>> = [
        ("config.json", br#"{"model_type": "llama"}"#.to_vec()),
        ("tokenizer.json", br#"{"version": "1.0"}"#.to_vec()),
        ("tokenizer_config.json", br#"{"eos_token": "</s>"}"#.to_vec()),
        ("model.safetensors.index.json", index.as_bytes().to_vec()),
        ("model-00001-of-00002.safetensors", shard(3)),
        ("model-00002-of-00002.safetensors", shard(7)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let server = HubServer::start(files.iter().map(|(k, v)| (model_path(REPO, k), v.clone())).collect());

    // Online: every file lands in $HF_HOME/hub/models--owner--name/snapshots/<commit>/.
    set_env(&tmp.join("home"), &server.url, false);
    let dir = models::hub::resolve(REPO, false).unwrap();
    let want_dir = tmp.join("home/hub/models--mlx-community--tiny-test/snapshots").join(COMMIT);
    assert_eq!(dir, want_dir);
    for (name, data) in &files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), data, "{name}");
    }
    // Files the repository lacks (generation_config.json, ...) are skipped, not errors.
    assert!(!dir.join("generation_config.json").exists());

    // Offline with a filled cache: the same directory, and no request reaches the server.
    set_env(&tmp.join("home"), &server.url, true);
    let before = server.hits();
    assert_eq!(models::hub::resolve(REPO, false).unwrap(), want_dir);
    assert_eq!(server.hits(), before, "offline mode contacted the server");

    // Offline with an empty cache: a clear error naming the variable and the file.
    set_env(&tmp.join("empty"), &server.url, true);
    let e = models::hub::resolve(REPO, false).unwrap_err().to_string();
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains("config.json") && e.contains(REPO), "{e}");

    // Online, a repository without weights: the missing file is named.
    set_env(&tmp.join("other"), &server.url, false);
    let e = models::hub::resolve("mlx-community/absent", false).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("mlx-community/absent"), "{e}");

    drop(server);
    std::env::remove_var("HF_HUB_OFFLINE");
    std::fs::remove_dir_all(&tmp).ok();
}

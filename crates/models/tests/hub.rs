//! `--model owner/name` through hf-hub against a loopback server that speaks the Hub's file
//! protocol (`/{repo}/resolve/{revision}/{file}` with ETag, X-Repo-Commit and byte ranges).
//!
//! Environment variables are process-wide, so every scenario runs in one test, in order.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REPO: &str = "mlx-community/tiny-test";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// The server gives up after this long even if the test forgets to stop it.
const SERVER_LIFETIME: Duration = Duration::from_secs(120);

fn etag(data: &[u8]) -> String {
    // FNV-1a: enough to give each file its own blob name.
    let h = data.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    format!("{h:016x}")
}

fn respond(mut s: TcpStream, files: &HashMap<String, Vec<u8>>) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range = None;
    for _ in 0..100 {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().strip_prefix("bytes=").map(String::from);
            }
        }
    }
    let prefix = format!("/{REPO}/resolve/main/");
    let Some(data) = path.strip_prefix(&prefix).and_then(|f| files.get(f)) else {
        return s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    };
    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().map(|b: usize| b + 1).unwrap_or(data.len());
            (a.min(data.len()), b.min(data.len()))
        }
        None => (0, data.len()),
    };
    let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nETag: \"{}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        end - start,
        end.saturating_sub(1),
        data.len(),
        etag(data)
    );
    s.write_all(head.as_bytes())?;
    s.write_all(&data[start..end])
}

struct Server {
    url: String,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

fn serve(files: HashMap<String, Vec<u8>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (hits, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let (h, st) = (hits.clone(), stop.clone());
    std::thread::spawn(move || {
        let deadline = Instant::now() + SERVER_LIFETIME;
        while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((s, _)) => {
                    h.fetch_add(1, Ordering::Relaxed);
                    let _ = s.set_nonblocking(false);
                    let _ = respond(s, &files);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Server { url, hits, stop }
}

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
    let server = serve(files.clone());

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
    let before = server.hits.load(Ordering::Relaxed);
    assert_eq!(models::hub::resolve(REPO, false).unwrap(), want_dir);
    assert_eq!(server.hits.load(Ordering::Relaxed), before, "offline mode contacted the server");

    // Offline with an empty cache: a clear error naming the variable and the file.
    set_env(&tmp.join("empty"), &server.url, true);
    let e = models::hub::resolve(REPO, false).unwrap_err().to_string();
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains("config.json") && e.contains(REPO), "{e}");

    // Online, a repository without weights: the missing file is named.
    set_env(&tmp.join("other"), &server.url, false);
    let e = models::hub::resolve("mlx-community/absent", false).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("mlx-community/absent"), "{e}");

    server.stop.store(true, Ordering::Relaxed);
    std::env::remove_var("HF_HUB_OFFLINE");
    std::fs::remove_dir_all(&tmp).ok();
}

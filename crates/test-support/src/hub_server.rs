//! A loopback server that speaks the Hub's file protocol as `hf-hub` uses it:
//! `GET /{repo}/resolve/{revision}/{file}` for models and
//! `GET /datasets/{repo}/resolve/{revision}/{file}` for datasets, with ETag, X-Repo-Commit and
//! byte ranges. It binds 127.0.0.1 only, answers one connection at a time, and stops by itself
//! after [`LIFETIME`] even when a test forgets to stop it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The commit every file is served at.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
pub const LIFETIME: Duration = Duration::from_secs(300);

/// The URL path (without the leading `/`) of a model repository's file at `main`.
pub fn model_path(repo: &str, file: &str) -> String {
    format!("{repo}/resolve/main/{file}")
}

/// The URL path (without the leading `/`) of a dataset repository's file at `main`.
pub fn dataset_path(repo: &str, file: &str) -> String {
    format!("datasets/{repo}/resolve/main/{file}")
}

pub struct HubServer {
    /// `http://127.0.0.1:PORT`, for `HF_ENDPOINT`.
    pub url: String,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl HubServer {
    /// Serves `files`, keyed by URL path as [`model_path`] and [`dataset_path`] build them.
    pub fn start(files: HashMap<String, Vec<u8>>) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let (hits, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (h, st) = (hits.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + LIFETIME;
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
        HubServer { url, hits, stop }
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn etag(data: &[u8]) -> String {
    // FNV-1a: enough to give each file its own blob name.
    let mut hasher = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut hasher, data);
    let h = std::hash::Hasher::finish(&hasher);
    format!("{h:016x}")
}

fn respond(mut s: TcpStream, files: &HashMap<String, Vec<u8>>) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("");
    // hf-hub may add a query string; the path alone names the file.
    let path = target.split('?').next().unwrap_or("").trim_start_matches('/').to_string();
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
    let Some(data) = files.get(&path) else {
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

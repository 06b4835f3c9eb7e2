//! `ppl wikitext` and `bench` as a user runs them, from a folder that is not the repository,
//! with an empty cache: the WikiText-2 test split comes from a loopback server in the hub's
//! dataset URL layout (`/datasets/Salesforce/wikitext/resolve/main/...parquet`), is written into
//! the cache as text, and is found there afterwards without the network.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use test_support::hub_server::{dataset_path, HubServer};

const REPO: &str = "Salesforce/wikitext";
const FILE: &str = "wikitext-2-raw-v1/test-00000-of-00001.parquet";

/// The split as the dataset stores it: one row per line of the raw file with its `\n`, and an
/// empty row for each blank line (here: before every heading, as in the raw file).
fn dataset_parquet(text: &str) -> Vec<u8> {
    let mut rows: Vec<ByteArray> = Vec::new();
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('=') {
            rows.push(ByteArray::from(""));
        }
        rows.push(ByteArray::from(line));
    }
    let schema = Arc::new(parse_message_type("message schema { optional binary text (STRING); }").unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut writer = SerializedFileWriter::new(Vec::new(), schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut col = group.next_column().unwrap().expect("one column");
    let defined = vec![1i16; rows.len()];
    col.typed::<ByteArrayType>().write_batch(&rows, Some(&defined), None).unwrap();
    col.close().unwrap();
    group.close().unwrap();
    writer.into_inner().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvsplit-wikitext-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The binary run in `cwd` with the cache `cache` and an HF home of its own beside it (so an
/// empty cache also means an empty HF cache), against `endpoint`.
fn run(cwd: &Path, cache: &Path, endpoint: &str, offline: bool, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvsplit-mlx"));
    c.current_dir(cwd).args(args).env("KVSPLIT_CACHE", cache).env("HF_HOME", cache.with_extension("hf")).env("HF_ENDPOINT", endpoint).env_remove("HF_HUB_CACHE");
    if offline {
        c.env("HF_HUB_OFFLINE", "1");
    } else {
        c.env_remove("HF_HUB_OFFLINE");
    }
    c.output().expect("run kvsplit-mlx")
}

fn text_of(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn wikitext_comes_from_the_hub_into_the_cache_and_commands_work_from_any_folder() {
    let model = test_support::assets::default_model();
    let model = model.to_str().unwrap();
    let text = test_support::assets::wikitext_text();
    let server = HubServer::start([(dataset_path(REPO, FILE), dataset_parquet(&text))].into_iter().collect());
    let work = temp_dir("cwd");
    let cache = work.join("cache");
    let cached = cache.join("data/wikitext-2-raw/wiki.test.raw");

    // Empty cache, network: fetched, converted, and scored.
    let out = run(&work, &cache, &server.url, false, &["ppl", "wikitext", "--model", model, "--kv", "k8v4", "--ctx", "128", "--max-windows", "1", "--baseline-cache-mb", "0", "--out", "r"]);
    let all = text_of(&out);
    assert!(out.status.success(), "ppl wikitext from the hub failed:\n{all}");
    assert!(server.hits() > 0, "the hub was never asked");
    // The blank-line rows are dropped, so the text is exactly the one docs/ measured on: no
    // warning about a different SHA-256.
    assert_eq!(std::fs::read_to_string(&cached).unwrap(), text, "cached text differs from the dataset's lines");
    assert!(!all.contains("SHA-256"), "{all}");
    assert!(all.contains("k8v4") && all.contains(&cached.display().to_string()), "{all}");

    // Cached now: offline works, and bench's default text is the same file.
    drop(server);
    let out = run(&work, &cache, "http://127.0.0.1:9", true, &["bench", "--model", model, "--kv", "k8v4", "-d", "0", "-p", "16", "-n", "2", "-r", "1", "--out", "b"]);
    assert!(out.status.success(), "bench from another folder failed:\n{}", text_of(&out));
    let out = run(&work, &cache, "http://127.0.0.1:9", true, &["ppl", "wikitext", "--model", model, "--kv", "k8v4", "--ctx", "128", "--max-windows", "1", "--baseline-cache-mb", "0", "--out", "r"]);
    assert!(out.status.success(), "ppl wikitext from the cache failed:\n{}", text_of(&out));

    // Offline with empty caches: one clear error, no panic.
    let out = run(&work, &work.join("empty"), "http://127.0.0.1:9", true, &["ppl", "wikitext", "--model", model, "--kv", "k8v4"]);
    let all = text_of(&out);
    assert!(!out.status.success() && !all.contains("panicked"), "{all}");
    assert!(all.contains("HF_HUB_OFFLINE") && all.contains("wiki.test.raw") && all.contains("--data-dir"), "{all}");

    // --data-dir without the file names the flag.
    let out = run(&work, &cache, "http://127.0.0.1:9", true, &["ppl", "wikitext", "--model", model, "--data-dir", "nowhere"]);
    let all = text_of(&out);
    assert!(!out.status.success() && all.contains("--data-dir nowhere: no wiki.test.raw"), "{all}");
    std::fs::remove_dir_all(&work).ok();
}

#[test]
fn a_corrupt_dataset_file_is_named_in_the_error() {
    let model = test_support::assets::default_model();
    let server = HubServer::start([(dataset_path(REPO, FILE), b"PAR1 this is not parquet".to_vec())].into_iter().collect());
    let work = temp_dir("corrupt");
    let out = run(&work, &work.join("cache"), &server.url, false, &["ppl", "wikitext", "--model", model.to_str().unwrap(), "--kv", "k8v4"]);
    let all = text_of(&out);
    assert!(!out.status.success() && !all.contains("panicked"), "{all}");
    assert!(all.contains("test-00000-of-00001.parquet") && all.contains("not a readable parquet file"), "{all}");
    assert!(!work.join("cache/data/wikitext-2-raw/wiki.test.raw").exists(), "a corrupt download left a text file behind");
    std::fs::remove_dir_all(&work).ok();
}

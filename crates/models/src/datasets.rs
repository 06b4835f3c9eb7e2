//! WikiText-2 raw, test split: the text `ppl` and `bench` read by default. It is looked up in the
//! project's cache (`$KVSPLIT_CACHE/data/wikitext-2-raw/wiki.test.raw`, where setup copies the
//! file shipped beside this repository) and otherwise fetched once from the dataset's hub
//! repository, `Salesforce/wikitext` (`wikitext-2-raw-v1`, parquet), and written there as text.

use crate::assets::cache_dir;
use crate::error::{ModelError, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const WIKITEXT_REPO: &str = "Salesforce/wikitext";
pub const WIKITEXT_TEST_PARQUET: &str = "wikitext-2-raw-v1/test-00000-of-00001.parquet";
/// SHA-256 of the test split as the engine reads it (LF line endings, no blank lines): the text
/// that every perplexity in docs/ was measured on.
pub const WIKITEXT_TEST_SHA256: &str = "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a";

/// Where the test split lives in the cache.
pub fn wikitext_test_path() -> PathBuf {
    cache_dir().join("data/wikitext-2-raw/wiki.test.raw")
}

/// The cached test split, fetched from the hub first when the cache lacks it.
pub fn wikitext_test(progress: bool) -> Result<PathBuf> {
    let dest = wikitext_test_path();
    if dest.is_file() {
        return Ok(dest);
    }
    let parquet = crate::hub::dataset_file(WIKITEXT_REPO, WIKITEXT_TEST_PARQUET, progress).map_err(|e| ModelError::Config {
        path: dest.clone(),
        reason: format!("WikiText-2 is not in the cache, and fetching it from the hub failed ({e}); place wiki.test.raw there or pass --data-dir"),
    })?;
    let text = wikitext_from_parquet(&parquet)?;
    let digest = sha256_hex(text.as_bytes());
    if digest != WIKITEXT_TEST_SHA256 {
        // Still usable text, but perplexities would not be comparable with the documented ones.
        eprintln!("note: {} gave text with SHA-256 {digest}, not the {WIKITEXT_TEST_SHA256} that docs/ measured on", parquet.display());
    }
    let io = |source| ModelError::Io { path: dest.clone(), source };
    std::fs::create_dir_all(dest.parent().expect("a file path has a parent")).map_err(io)?;
    let tmp = dest.with_extension("raw.tmp");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, &dest).map_err(io)?;
    Ok(dest)
}

/// The test split's text from the dataset's parquet file. Its rows are the lines of the raw file,
/// each with its `\n`; blank lines are empty rows, which are dropped (the text docs/ measured
/// has none).
pub fn wikitext_from_parquet(path: &Path) -> Result<String> {
    let bad = |reason: String| ModelError::Config { path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(format!("not a readable parquet file: {e}")))?;
    let rows = reader.metadata().file_metadata().num_rows();
    let mut text = String::new();
    for row in reader.get_row_iter(None).map_err(|e| bad(format!("reading rows: {e}")))? {
        let row = row.map_err(|e| bad(format!("reading rows: {e}")))?;
        let line = row.get_column_iter().find(|(name, _)| name.as_str() == "text").map(|(_, field)| field);
        match line {
            Some(Field::Str(s)) if !s.is_empty() => {
                text.push_str(s);
                if !s.ends_with('\n') {
                    text.push('\n');
                }
            }
            Some(Field::Str(_)) | Some(Field::Null) => {}
            Some(other) => return Err(bad(format!("column 'text' holds {other:?}, expected strings"))),
            None => return Err(bad("no column named 'text'".into())),
        }
    }
    if text.is_empty() {
        return Err(bad(format!("{rows} rows and no text")));
    }
    Ok(text)
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

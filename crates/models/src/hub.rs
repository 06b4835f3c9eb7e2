//! Models named by Hugging Face Hub id (`mlx-community/SmolLM2-135M-Instruct-4bit`), and single
//! dataset files (WikiText-2): the files are fetched through `hf-hub` into the standard HF cache
//! (`$HF_HOME/hub`, or `$HF_HUB_CACHE`), from `$HF_ENDPOINT` when set. With `HF_HUB_OFFLINE=1`
//! nothing is requested and the cached snapshot is used as is.

use crate::error::{ModelError, Result};
use crate::load::safetensors::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Files fetched when the repository has them.
const OPTIONAL_FILES: &[&str] = &["tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// Whether `s` has the form `owner/name` of a Hub repository id.
pub fn looks_like_repo_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((owner, name)) if ok(owner) && ok(name))
}

/// Whether `HF_HUB_OFFLINE` asks for no network access.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The HF cache the environment selects.
pub fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => Cache::new(PathBuf::from(dir)),
        None => Cache::from_env(),
    }
}

fn hub_err(repo: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Config { path: PathBuf::from(repo), reason: reason.into() }
}

fn is_not_found(e: &ApiError) -> bool {
    matches!(e, ApiError::RequestError(r) if matches!(**r, ureq::Error::Status(404, _)))
}

/// Where one file comes from: the network (through the cache) or the cache alone.
enum Fetcher {
    Online(hf_hub::api::sync::ApiRepo),
    Offline(hf_hub::CacheRepo, PathBuf),
}

impl Fetcher {
    /// Offline (the cache alone) when `HF_HUB_OFFLINE` says so, else the network through the
    /// cache, from `HF_ENDPOINT` when set.
    fn new(repo_id: &str, repo: Repo, progress: bool) -> Result<Fetcher> {
        let cache = cache();
        if offline() {
            return Ok(Fetcher::Offline(cache.repo(repo), cache.path().clone()));
        }
        let mut builder = ApiBuilder::from_cache(cache).with_progress(progress);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
        }
        let api = builder.build().map_err(|e| hub_err(repo_id, format!("HF client: {e}")))?;
        Ok(Fetcher::Online(api.repo(repo)))
    }

    /// The local path of `file`; `Ok(None)` when the repository (or, offline, the cache) lacks it.
    fn fetch(&self, repo: &str, file: &str) -> Result<Option<PathBuf>> {
        match self {
            Fetcher::Online(api) => match api.get(file) {
                Ok(p) => Ok(Some(p)),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(hub_err(repo, format!("downloading {file}: {e}"))),
            },
            Fetcher::Offline(cache, _) => Ok(cache.get(file)),
        }
    }

    fn require(&self, repo: &str, file: &str) -> Result<PathBuf> {
        self.fetch(repo, file)?.ok_or_else(|| match self {
            Fetcher::Online(_) => hub_err(repo, format!("the repository has no {file}")),
            Fetcher::Offline(_, root) => hub_err(
                repo,
                format!("{file} is not in the HF cache ({}) and HF_HUB_OFFLINE is set; download it first without HF_HUB_OFFLINE", root.display()),
            ),
        })
    }
}

/// Fetches (or finds in the cache) a model repository's config, tokenizer and safetensors
/// files, and returns the snapshot directory holding them.
pub fn resolve(repo_id: &str, progress: bool) -> Result<PathBuf> {
    if !looks_like_repo_id(repo_id) {
        return Err(ModelError::Invalid { flag: "--model", message: format!("'{repo_id}' is not a Hub id of the form owner/name") });
    }
    let fetcher = Fetcher::new(repo_id, Repo::model(repo_id.to_string()), progress)?;
    let mut paths = vec![fetcher.require(repo_id, CONFIG_FILE)?, fetcher.require(repo_id, "tokenizer.json")?];
    for f in OPTIONAL_FILES {
        paths.extend(fetcher.fetch(repo_id, f)?);
    }
    match fetcher.fetch(repo_id, INDEX_FILE)? {
        Some(index) => {
            for shard in index_shards(&index)? {
                paths.push(fetcher.require(repo_id, &shard)?);
            }
            paths.push(index);
        }
        None => paths.push(fetcher.require(repo_id, SINGLE_FILE)?),
    }
    let dirs: BTreeSet<&Path> = paths.iter().filter_map(|p| p.parent()).collect();
    match dirs.into_iter().collect::<Vec<_>>().as_slice() {
        [one] => Ok(one.to_path_buf()),
        // Files of two commits: the repository changed while we were fetching.
        _ => Err(hub_err(repo_id, "files came from different revisions (the repository changed during download); run again")),
    }
}

/// One file of a dataset repository (`owner/name`), fetched into (or found in) the HF cache.
pub fn dataset_file(repo_id: &str, file: &str, progress: bool) -> Result<PathBuf> {
    Fetcher::new(repo_id, Repo::new(repo_id.to_string(), RepoType::Dataset), progress)?.require(repo_id, file)
}

/// The shard files an index names.
fn index_shards(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io { path: index.into(), source })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Config { path: index.into(), reason: format!("invalid JSON: {e}") })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Config { path: index.into(), reason: "no 'weight_map' object".into() })?;
    Ok(map.values().filter_map(|f| f.as_str()).map(String::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_owner_slash_name() {
        assert!(looks_like_repo_id("mlx-community/SmolLM2-135M-Instruct-4bit"));
        assert!(looks_like_repo_id("Qwen/Qwen2.5-0.5B"));
        assert!(!looks_like_repo_id("model.gguf"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
        assert!(!looks_like_repo_id("/abs"));
    }
}

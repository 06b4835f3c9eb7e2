//! `bench --pool-budget`: how many sequences of `depth + n_prompt + n_gen` tokens one KV budget
//! holds per K/V setting, admitted one by one until refused, against what the formula predicts,
//! and the aggregate decode speed of all of them at once (pipelined steps). Pooled settings are admitted by the
//! engine's block pool (whole 256-token blocks); others (dense) by the closed-form bytes per
//! token, as `serve` admits them. Every admitted sequence's cache is really written, so the
//! count is memory that exists, not arithmetic.

use crate::results::{human_bytes, markdown_table, Env};
use anyhow::{Context, Result};
use mlx_kv::KvPool;
use models::engine::{decode_batch, decode_steps, Engine, Sequence};
use models::generate::CacheSettings;
use models::sample::SamplerSettings;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Serialize)]
pub struct PoolRow {
    pub kv: String,
    pub budget_bytes: usize,
    pub tokens_per_sequence: usize,
    /// `pool` (block pool) or `formula` (closed-form bytes per token).
    pub admitted_by: &'static str,
    pub bytes_per_sequence: usize,
    pub predicted: usize,
    pub admitted: usize,
    pub decode_tps: f64,
    pub n_gen: usize,
    pub kv_bytes: usize,
    pub peak_memory: usize,
    pub engine: String,
    pub commit: String,
    pub date: String,
}

/// Admits, fills and decodes; `fill` writes `depth` tokens into a new sequence's caches.
#[allow(clippy::too_many_arguments)]
pub fn run(
    engine: &mut Engine,
    settings: &[(String, CacheSettings)],
    ids: &[u32],
    budget: usize,
    depth: usize,
    n_prompt: usize,
    n_gen: usize,
    step: usize,
    out_dir: &Path,
    fill: &dyn Fn(&mut Sequence<'_>, usize) -> Result<()>,
) -> Result<()> {
    let env = Env::detect();
    // Two untimed steps first: a batch shape's first step compiles kernels (MLX's quantized
    // matmul for that row count included).
    const WARMUP: usize = 2;
    let tokens = depth + n_prompt + n_gen + WARMUP + 1;
    let mut rows = Vec::new();
    for (kv, s) in settings {
        // A fresh pool per setting: arrays of one precision never shrink for another.
        engine.use_pool(Some(budget));
        let engine = &*engine;
        let pool = engine.pool().expect("just made");
        let (admitted_by, per_seq) = match engine.pool_format(s) {
            Some(fmt) => {
                pool.preallocate(&fmt, budget / pool.block_bytes(&fmt))?;
                ("pool", KvPool::blocks_for(tokens) * pool.block_bytes(&fmt))
            }
            None => ("formula", (s.bytes_per_token(engine.model()) * tokens as f64).ceil() as usize),
        };
        let predicted = budget / per_seq;
        let mut seqs = Vec::new();
        let t = Instant::now();
        loop {
            let room = admitted_by == "pool" || (seqs.len() + 1) * per_seq <= budget;
            let seq = if room { engine.pooled_sequence(s, SamplerSettings::default(), step, tokens)? } else { None };
            let Some(mut seq) = seq else { break };
            fill(&mut seq, depth)?;
            seq.queue_prompt(&ids[depth..depth + n_prompt], n_gen + WARMUP + 1)?;
            while seq.prefill_some(step, None)?.is_none() {}
            seqs.push(seq);
            // A pool refuses by itself; stop a runaway dense loop at the prediction.
            if seqs.len() > predicted + 1 {
                break;
            }
        }
        eprintln!("{kv}: admitted {} sequences of {tokens} tokens in {:.1} s (predicted {predicted})", seqs.len(), t.elapsed().as_secs_f64());
        for _ in 0..WARMUP {
            let mut refs: Vec<&mut Sequence<'_>> = seqs.iter_mut().collect();
            let none = vec![None; refs.len()];
            decode_batch(&mut refs, &none)?;
        }
        mlx_rs::memory::reset_peak_memory()?;
        let t = Instant::now();
        {
            let mut refs: Vec<&mut Sequence<'_>> = seqs.iter_mut().collect();
            let none = vec![None; refs.len()];
            decode_steps(&mut refs, &none, n_gen, |_| {})?;
        }
        let decode_s = t.elapsed().as_secs_f64();
        rows.push(PoolRow {
            kv: kv.clone(),
            budget_bytes: budget,
            tokens_per_sequence: tokens,
            admitted_by,
            bytes_per_sequence: per_seq,
            predicted,
            admitted: seqs.len(),
            decode_tps: (seqs.len() * n_gen) as f64 / decode_s.max(1e-9),
            n_gen,
            kv_bytes: seqs.iter().map(|q| q.kv_bytes().total()).sum(),
            peak_memory: mlx_rs::memory::peak_memory()?,
            engine: env.engine.clone(),
            commit: env.commit.clone(),
            date: env.date.clone(),
        });
        drop(seqs);
        mlx_rs::memory::clear_cache()?;
    }
    let header = ["kv", "admitted by", "per sequence", "predicted", "admitted", "aggregate decode tok/s", "KV held", "peak mem"];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.kv.clone(),
                r.admitted_by.to_string(),
                human_bytes(r.bytes_per_sequence as f64),
                r.predicted.to_string(),
                r.admitted.to_string(),
                format!("{:.1}", r.decode_tps),
                human_bytes(r.kv_bytes as f64),
                human_bytes(r.peak_memory as f64),
            ]
        })
        .collect();
    let table = markdown_table(&header, &body);
    println!("KV budget {} ({budget} bytes), sequences of {tokens} tokens; backend {} ({}), commit {}, {}", human_bytes(budget as f64), env.backend, env.device, env.commit, env.date);
    print!("{table}");
    std::fs::create_dir_all(out_dir)?;
    let path = out_dir.join(format!("bench-pool-{}.json", env.date.replace([':', '-'], "").trim_end_matches('Z')));
    std::fs::write(&path, serde_json::to_string_pretty(&rows)?).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    let short: Vec<_> = rows.iter().filter(|r| r.admitted < r.predicted).map(|r| r.kv.as_str()).collect();
    if !short.is_empty() {
        anyhow::bail!("admitted fewer sequences than the formula predicts for {}", short.join(", "));
    }
    Ok(())
}

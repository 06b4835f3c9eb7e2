//! One decode step for many sequences at once: each brings one token, its own cache, length and
//! precision. Sequences whose caches live in the same pool with the same block format (their
//! recipe: widths and rotation per layer) form a
//! group, and a group's step is one quantize and one scatter per K and V array plus one
//! attention op (CPU primitive) or one launch (CUDA) per layer, whatever the group's size;
//! the rest (dense caches, windows, sinks, or widths no kernel reads) take their own
//! per-sequence path. Outputs come back in the callers' order.

use crate::attention::{self, Choice, Scoring};
use crate::cache::KvCache;
use crate::error::{KvError, Result};
use crate::paged_step;
use crate::pool::{BlockFormat, PagedStore};
use mlx_rs::ops::concatenate;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::Array;

/// `q` `[S, Hq, 1, D]`, `k`/`v` `[S, Hkv, 1, D]` (RoPE applied): writes row `s` into
/// `caches[s]` and returns its attention, `[S, Hq, 1, D]` in `q`'s dtype. `scoring` as in
/// [`KvCache::update_and_attend`].
pub fn update_and_attend(caches: &mut [&mut KvCache], q: &Array, k: &Array, v: &Array, scoring: impl Into<Scoring>) -> Result<Array> {
    let scoring = scoring.into();
    let s = caches.len();
    if q.shape()[0] as usize != s || k.shape()[0] as usize != s || q.shape()[2] != 1 {
        return Err(KvError::Shape(format!("batched decode step: q {:?}, k {:?} for {s} caches", q.shape(), k.shape())));
    }
    // Groups: one per (pool, format) with a path that reads blocks in place.
    let mut groups: Vec<(usize, BlockFormat, Choice, Vec<usize>)> = Vec::new();
    let mut single = Vec::new();
    let rows = (q.shape()[1] / k.shape()[1]) as usize;
    for (i, c) in caches.iter_mut().enumerate() {
        let head_dim = c.head_dim();
        let key = |ks: &PagedStore| {
            let t = ks.table().lock().unwrap_or_else(|e| e.into_inner());
            let fmt = t.format().clone();
            let f = fmt.layer(ks.layer());
            let pool_id = t.pool().id();
            attention::choose_paged(f.k_bits, f.k_group, f.k_channels, f.v_bits, f.v_group, head_dim, rows, scoring.softcap.is_some()).map(|c| (pool_id, fmt, c))
        };
        let key = match c.paged_channels() {
            Some((ks, _)) => key(ks),
            None => c.paged_direct(1).and_then(|(ks, _)| key(ks)),
        };
        match key {
            Some((pool, fmt, choice)) => match groups.iter_mut().find(|g| g.0 == pool && g.1 == fmt) {
                Some(g) => g.3.push(i),
                None => groups.push((pool, fmt, choice, vec![i])),
            },
            None => single.push(i),
        }
    }
    let mut outs: Vec<(Vec<usize>, Array)> = Vec::new();
    for (_, _fmt, choice, members) in groups {
        let pick = |x: &Array| -> Result<Array> {
            if members.len() == s {
                return Ok(x.clone());
            }
            let idx: Vec<i32> = members.iter().map(|&i| i as i32).collect();
            Ok(x.take_axis(Array::from_slice(&idx, &[idx.len() as i32]), 0)?)
        };
        let (gq, gk, gv) = (pick(q)?, pick(k)?, pick(v)?);
        let mut group: Vec<&mut KvCache> = Vec::with_capacity(members.len());
        // Disjoint &mut borrows of the members, in member order.
        let mut rest: &mut [&mut KvCache] = caches;
        let mut base = 0;
        for &m in &members {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(m - base);
            let (one, after) = tail.split_first_mut().expect("member index in range");
            group.push(&mut **one);
            rest = after;
            base = m + 1;
        }
        let out = step_group(&mut group, choice, &gq, &gk, &gv, scoring)?;
        outs.push((members, out));
    }
    for i in single {
        let r = i as i32..i as i32 + 1;
        let out = caches[i].update_and_attend_unpooled(&q.index((r.clone(), ..)), &k.index((r.clone(), ..)), &v.index((r, ..)), scoring)?;
        outs.push((vec![i], out));
    }
    if outs.len() == 1 {
        return Ok(outs.pop().expect("one group").1);
    }
    let order: Vec<usize> = outs.iter().flat_map(|(m, _)| m.iter().copied()).collect();
    let all = concatenate(&outs.into_iter().map(|(_, a)| a).collect::<Vec<_>>(), 0)?;
    let mut inverse = vec![0i32; s];
    for (pos, &i) in order.iter().enumerate() {
        inverse[i] = pos as i32;
    }
    Ok(all.take_axis(Array::from_slice(&inverse, &[s as i32]), 0)?)
}

/// One group's step: the paged write and attention ([`crate::paged_step`]), then each cache's
/// bookkeeping.
fn step_group(group: &mut [&mut KvCache], choice: Choice, q: &Array, k: &Array, v: &Array, scoring: Scoring) -> Result<Array> {
    if group[0].paged_channels().is_some() {
        return step_channels(group, choice, q, k, v, scoring);
    }
    let ats: Vec<usize> = group.iter().map(|c| c.offset()).collect();
    // One format, so one rotation for the whole group: applied once to the stacked rows.
    let (q, k, v) = group[0].rotate_inputs(q, k, v)?;
    // Centers are per sequence: each member's row less its own.
    let k = if group.len() == 1 || !group[0].centered() {
        group[0].center_keys(&k)?
    } else {
        // One subtract of the stacked centers (a member without one yet takes its own row).
        let centers: Vec<Array> = group.iter_mut().enumerate().map(|(i, c)| c.key_center_for(&k.index(i as i32..i as i32 + 1))).collect::<Result<_>>()?;
        k.subtract(concatenate(&centers, 0)?.as_dtype(k.dtype())?)?
    };
    let (q, k, v) = (&q, &k, &v);
    let out = {
        let stores: Vec<(&PagedStore, &PagedStore)> = group.iter_mut().map(|c| {
            let (ks, vs) = c.paged_direct(1).expect("grouped as paged");
            (&*ks, &*vs)
        }).collect();
        paged_step::step(&stores, &ats, choice, q, k, v, scoring)?
    };
    for c in group.iter_mut() {
        c.advance_one(choice);
    }
    group[0].rotate_output(out)
}

/// A group with per-channel keys: each cache writes its own token (into its float tail, and a
/// finished key group into the blocks, once every `group` steps), then one op attends over
/// every member's blocks and tail.
fn step_channels(group: &mut [&mut KvCache], choice: Choice, q: &Array, k: &Array, v: &Array, scoring: Scoring) -> Result<Array> {
    for (i, c) in group.iter_mut().enumerate() {
        let r = i as i32..i as i32 + 1;
        c.update(&k.index((r.clone(), ..)), &v.index((r, ..)))?;
    }
    let q = group[0].rotate_query(q)?;
    let (lens, tails): (Vec<usize>, Vec<Option<(Array, Array)>>) = group.iter().map(|c| c.paged_floats()).collect::<Result<Vec<_>>>()?.into_iter().unzip();
    let out = {
        let stores: Vec<(&PagedStore, &PagedStore)> = group.iter().map(|c| c.paged_channels().expect("grouped as per-channel")).collect();
        // One block format per group, and its sinks with it; `paged_channels` holds every one in.
        paged_step::attend_channels(&stores, &lens, &tails, group[0].spec().sinks, &q, scoring)?
    };
    for c in group.iter() {
        c.set_path(choice);
    }
    group[0].rotate_output(out)
}

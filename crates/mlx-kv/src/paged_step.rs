//! The paged decode step of sequences whose caches live in one pool arena: each sequence's new
//! K/V row goes to slot `at[s]` of its blocks, then one attention op (CPU) or one launch (CUDA)
//! reads every sequence through a table of block ids. With per-channel keys the caches write
//! their own tokens (a float tail until a key group is whole) and [`attend_channels`] reads
//! blocks and tails in one op. Below [`crate::cache`], which uses it for
//! one sequence, and [`crate::batch`], which uses it for a group; the caches' own bookkeeping
//! stays with them.

use crate::attention::{self, Choice, Scoring};
use crate::error::{KvError, Result};
use crate::pool::{table_array, BlockTable, PagedStore, SharedTable};
use crate::store::Packed;
use mlx_ext::cpu::KeyAxis;
use mlx_rs::ops::{concatenate, zeros_dtype};
use mlx_rs::{Array, Dtype};
use std::sync::MutexGuard;

fn lock(t: &SharedTable) -> MutexGuard<'_, BlockTable> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// `stores[s]`: sequence `s`'s K and V stores of this layer (all of one arena); `q`
/// `[S, Hq, 1, D]`, `k`/`v` `[S, Hkv, 1, D]`. Returns `[S, Hq, 1, D]` in `q`'s dtype.
pub(crate) fn step(stores: &[(&PagedStore, &PagedStore)], at: &[usize], choice: Choice, q: &Array, k: &Array, v: &Array, scoring: Scoring) -> Result<Array> {
    let hkv = k.shape()[1] as usize;
    let tables: Vec<SharedTable> = stores.iter().map(|(ks, _)| ks.table().clone()).collect();
    let mut lens = Vec::with_capacity(stores.len());
    let mut rows = Vec::with_capacity(stores.len() * hkv);
    for (t, &at) in tables.iter().zip(at) {
        let mut t = lock(t);
        t.ensure(at + 1)?;
        lens.push(at + 1);
        rows.extend((0..hkv).map(|h| t.row(at, h, hkv)));
    }
    let table = {
        let guards: Vec<_> = tables.iter().map(lock).collect();
        let refs: Vec<&BlockTable> = guards.iter().map(|g| &**g).collect();
        table_array(&refs, &lens)
    };
    let (ks, vs) = stores[0];
    match choice.path {
        attention::Path::PagedCpu => {
            let rows = Array::from_slice(&rows, &[rows.len() as i32]);
            ks.put_rows(&rows, &Packed::quantize(k, ks.group, ks.bits)?)?;
            vs.put_rows(&rows, &Packed::quantize(v, vs.group, vs.bits)?)?;
            cpu_attend(ks, vs, q, &table, scoring, KeyAxis::Tokens, None, 0)
        }
        attention::Path::PagedStep if scoring.softcap.is_some() => Err(KvError::PathUnsupported { path: choice.path.name(), what: "attention logit soft-capping" }),
        attention::Path::PagedStep => gpu_step(ks, vs, q, k, v, &table, lens.iter().copied().max().unwrap_or(1), scoring.scale),
        _ => unreachable!("choose_paged picks a paged path"),
    }
}

/// Attention of sequences with per-channel keys in one arena whose tokens are all written:
/// `lens[s]` tokens past the sinks, whole key groups in the blocks and the rest in `tails[s]`
/// (K and V `[1, Hkv, n, D]`: the `sinks` sink tokens every sequence of the layer keeps, then
/// `lens[s] % group` tokens). `q` `[S, Hq, 1, D]` in the stored frame. CPU only
/// ([`crate::attention::choose_paged`]).
pub(crate) fn attend_channels(stores: &[(&PagedStore, &PagedStore)], lens: &[usize], tails: &[Option<(Array, Array)>], sinks: usize, q: &Array, scoring: Scoring) -> Result<Array> {
    let tables: Vec<SharedTable> = stores.iter().map(|(ks, _)| ks.table().clone()).collect();
    for t in &tables {
        // A sequence still inside its first key group has no block yet; the op needs the
        // arena's arrays to exist.
        lock(t).ensure(1)?;
    }
    let table = {
        let guards: Vec<_> = tables.iter().map(lock).collect();
        let refs: Vec<&BlockTable> = guards.iter().map(|g| &**g).collect();
        table_array(&refs, lens)
    };
    // One `[S, Hkv, T, D]` array of every sequence's tail, padded to the longest; the kernel
    // reads the first `sinks + len % group` rows of each.
    let longest = tails.iter().flatten().map(|(k, _)| k.shape()[2]).max().unwrap_or(0);
    let stacked = if longest == 0 {
        None
    } else {
        let like = tails.iter().flatten().next().map(|(k, _)| k.clone()).expect("a tail is longest");
        let sh = like.shape();
        let pad = |x: Option<&Array>| -> Result<Array> {
            let n = x.map_or(0, |x| x.shape()[2]);
            let fill = zeros_dtype(&[1, sh[1], longest - n, sh[3]], like.dtype())?;
            Ok(match x {
                Some(x) if n == longest => x.clone(),
                Some(x) => concatenate(&[x.clone(), fill], 2)?,
                None => fill,
            })
        };
        let ks: Vec<Array> = tails.iter().map(|t| pad(t.as_ref().map(|(k, _)| k))).collect::<Result<_>>()?;
        let vs: Vec<Array> = tails.iter().map(|t| pad(t.as_ref().map(|(_, v)| v))).collect::<Result<_>>()?;
        Some((concatenate(&ks, 0)?, concatenate(&vs, 0)?))
    };
    let (ks, vs) = stores[0];
    cpu_attend(ks, vs, q, &table, scoring, KeyAxis::Channels, stacked.as_ref().map(|(k, v)| (k, v)), sinks)
}

#[allow(clippy::too_many_arguments)]
fn cpu_attend(ks: &PagedStore, vs: &PagedStore, q: &Array, table: &Array, scoring: Scoring, keys: KeyAxis, tails: Option<(&Array, &Array)>, lead: usize) -> Result<Array> {
    let (kp, vp) = (ks.arrays_now(), vs.arrays_now());
    let kr = mlx_ext::cpu::PackedRef { w: &kp.w, scales: &kp.scales, biases: &kp.biases, bits: ks.bits, group: ks.group };
    let vr = mlx_ext::cpu::PackedRef { w: &vp.w, scales: &vp.scales, biases: &vp.biases, bits: vs.bits, group: vs.group };
    let qs = q.as_dtype(Dtype::Float32)? * Array::from_f32(scoring.scale);
    Ok(mlx_ext::cpu::paged_decode_attention(&qs, kr, vr, table, keys, tails, lead, scoring.softcap)?.as_dtype(q.dtype())?)
}

#[allow(clippy::too_many_arguments)]
fn gpu_step(ks: &PagedStore, vs: &PagedStore, q: &Array, k: &Array, v: &Array, table: &Array, max_t: usize, scale: f32) -> Result<Array> {
    let (kp, vp) = (ks.arrays_now(), vs.arrays_now());
    let kop = attention::fused::PagedPool { w: &kp.w, scales: &kp.scales, biases: &kp.biases, bits: ks.bits, group: ks.group };
    let vop = attention::fused::PagedPool { w: &vp.w, scales: &vp.scales, biases: &vp.biases, bits: vs.bits, group: vs.group };
    let ctr = ks.counters()?;
    attention::fused::decode_step_paged(q, k, v, kop, vop, table, &ctr, max_t, scale)
}

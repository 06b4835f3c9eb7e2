//! The paged decode step of sequences whose caches live in one pool arena: each sequence's new
//! K/V row goes to slot `at[s]` of its blocks, then one attention op (CPU) or one launch (CUDA)
//! reads every sequence through a table of block ids. Below [`crate::cache`], which uses it for
//! one sequence, and [`crate::batch`], which uses it for a group; the caches' own bookkeeping
//! stays with them.

use crate::attention::{self, Choice};
use crate::error::Result;
use crate::pool::{table_array, BlockTable, PagedStore, SharedTable};
use crate::store::Packed;
use mlx_rs::{Array, Dtype};
use std::sync::MutexGuard;

fn lock(t: &SharedTable) -> MutexGuard<'_, BlockTable> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// `stores[s]`: sequence `s`'s K and V stores of this layer (all of one arena); `q`
/// `[S, Hq, 1, D]`, `k`/`v` `[S, Hkv, 1, D]`. Returns `[S, Hq, 1, D]` in `q`'s dtype.
pub(crate) fn step(stores: &[(&PagedStore, &PagedStore)], at: &[usize], choice: Choice, q: &Array, k: &Array, v: &Array, scale: f32) -> Result<Array> {
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
            cpu_attend(ks, vs, q, &table, scale)
        }
        attention::Path::PagedStep => gpu_step(ks, vs, q, k, v, &table, lens.iter().copied().max().unwrap_or(1), scale),
        _ => unreachable!("choose_paged picks a paged path"),
    }
}

fn cpu_attend(ks: &PagedStore, vs: &PagedStore, q: &Array, table: &Array, scale: f32) -> Result<Array> {
    let (kp, vp) = (ks.arrays_now(), vs.arrays_now());
    let kr = mlx_ext::cpu::PackedRef { w: &kp.w, scales: &kp.scales, biases: &kp.biases, bits: ks.bits, group: ks.group };
    let vr = mlx_ext::cpu::PackedRef { w: &vp.w, scales: &vp.scales, biases: &vp.biases, bits: vs.bits, group: vs.group };
    let qs = q.as_dtype(Dtype::Float32)? * Array::from_f32(scale);
    Ok(mlx_ext::cpu::paged_decode_attention(&qs, kr, vr, table)?.as_dtype(q.dtype())?)
}

#[allow(clippy::too_many_arguments)]
fn gpu_step(ks: &PagedStore, vs: &PagedStore, q: &Array, k: &Array, v: &Array, table: &Array, max_t: usize, scale: f32) -> Result<Array> {
    let (kp, vp) = (ks.arrays_now(), vs.arrays_now());
    let kop = attention::fused::PagedPool { w: &kp.w, scales: &kp.scales, biases: &kp.biases, bits: ks.bits, group: ks.group };
    let vop = attention::fused::PagedPool { w: &vp.w, scales: &vp.scales, biases: &vp.biases, bits: vs.bits, group: vs.group };
    let ctr = ks.counters()?;
    attention::fused::decode_step_paged(q, k, v, kop, vop, table, &ctr, max_t, scale)
}

//! One layer's KV cache: attention sinks, a body (float or split-quantized, optionally a ring
//! for `--max-kv-size`), and a full-precision tail of the newest tokens.
//!
//! Token flow: the first `sinks` tokens stay in float forever; every later token enters the tail;
//! once the cache holds `quantized_kv_start` tokens, tail tokens older than the newest
//! `residual` move to the body in whole blocks (one token, or one key group for per-channel
//! keys). K and V bodies are separate stores with their own bits and group size. With 16/16 the
//! body is a plain float buffer, so a dense cache is the same type with no quantized store.

use crate::attention::{self, Choice, Mask, Scoring, Segment, StepCase, Tensor};
use crate::error::{KvError, Result};
use crate::pool::{Half, LayerFormat, PagedStore, SharedTable};
use crate::rotation::hadamard;
use crate::spec::{KeyLayout, KvSpec, QuantSpec, Rotation};
use crate::store::{FloatStore, QuantStore, TokenAxis};
use mlx_rs::ops::concatenate;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{Array, Dtype};

/// Resident bytes, split the way users ask about them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheBytes {
    pub k_packed: usize,
    pub k_scales: usize,
    pub v_packed: usize,
    pub v_scales: usize,
    /// Float tokens: dense bodies, sinks, residual tail.
    pub k_float: usize,
    pub v_float: usize,
}

impl CacheBytes {
    pub fn k(&self) -> usize {
        self.k_packed + self.k_scales + self.k_float
    }
    pub fn v(&self) -> usize {
        self.v_packed + self.v_scales + self.v_float
    }
    pub fn total(&self) -> usize {
        self.k() + self.v()
    }
}

impl std::ops::Add for CacheBytes {
    type Output = CacheBytes;
    fn add(self, o: CacheBytes) -> CacheBytes {
        CacheBytes {
            k_packed: self.k_packed + o.k_packed,
            k_scales: self.k_scales + o.k_scales,
            v_packed: self.v_packed + o.v_packed,
            v_scales: self.v_scales + o.v_scales,
            k_float: self.k_float + o.k_float,
            v_float: self.v_float + o.v_float,
        }
    }
}

pub(crate) enum Body {
    Float(FloatStore),
    Quant(QuantStore),
    /// Blocks of the engine's pool ([`crate::pool`]).
    Paged(PagedStore),
}

impl Body {
    fn new(q: &QuantSpec, axis: TokenAxis) -> Self {
        if q.is_quantized() {
            Body::Quant(QuantStore::new(q.bits, q.group, axis))
        } else if crate::Backend::current() == crate::Backend::Cpu {
            // The CPU computes in f32; a dense ("fp16") cache stores 16 bits there as on the
            // GPU, and the decode primitive widens each token as it reads it.
            Body::Float(FloatStore::narrowed(0, Dtype::Float16))
        } else {
            Body::Float(FloatStore::default())
        }
    }

    fn write(&mut self, slot: usize, x: &Array) -> Result<()> {
        match self {
            Body::Float(s) => s.write(slot, x),
            Body::Quant(s) => s.write(slot, x),
            Body::Paged(s) => s.write(slot, x),
        }
    }

    fn tensor(&self, slots: usize) -> Option<Tensor> {
        match self {
            Body::Float(s) => s.stored_slots(0, slots).map(Tensor::Float),
            Body::Quant(s) => s
                .slice(0, slots)
                .map(|p| Tensor::Quant { p, bits: s.bits, group: s.group, axis: s.axis, full: s.full() }),
            // Gathered from the blocks (a copy of the packed rows, for prefill chunks and the
            // MLX-ops path); decode steps read the blocks in place (`crate::batch`).
            Body::Paged(s) => s.slice(0, slots).map(|p| Tensor::Quant { full: Some((p.clone(), slots)), p, bits: s.bits, group: s.group, axis: s.axis }),
        }
    }

    fn arrays(&self) -> Vec<&Array> {
        match self {
            Body::Float(s) => s.arrays(),
            Body::Quant(s) => s.arrays(),
            // The pool's arrays are read by every step's attention, which evaluates them.
            Body::Paged(_) => Vec::new(),
        }
    }

    /// (packed, scales, float) bytes.
    fn bytes(&self) -> (usize, usize, usize) {
        match self {
            Body::Float(s) => (0, 0, s.resident_bytes()),
            Body::Quant(s) => {
                let (p, m) = s.resident_bytes();
                (p, m, 0)
            }
            Body::Paged(s) => {
                let (p, m) = s.resident_bytes();
                (p, m, 0)
            }
        }
    }
}

/// The rotation `h` in `dtype`, cast once and kept in `kept`: on the GPU (f16) a rotated
/// layer's decode step applies it up to four times, and each cast would be one more op, which
/// costs there about as much as a small kernel.
fn rotation_in(kept: &std::cell::RefCell<Option<Array>>, h: &Array, dtype: Dtype) -> Result<Array> {
    if h.dtype() == dtype {
        return Ok(h.clone());
    }
    let mut kept = kept.borrow_mut();
    if let Some(c) = kept.as_ref().filter(|c| c.dtype() == dtype) {
        return Ok(c.clone());
    }
    let c = h.as_dtype(dtype)?;
    c.eval()?;
    *kept = Some(c.clone());
    Ok(c)
}

/// Moves a body's saved arrays (named `name`, as [`KvCache::state`] wrote them) out of `arrays`
/// into `body` after checking their shapes; returns the tokens it now holds.
fn take_body(
    body: &mut Body,
    name: &str,
    arrays: &mut std::collections::BTreeMap<String, Array>,
    heads: &mut Option<(i32, i32)>,
    head_dim: usize,
    float_dtype: Dtype,
) -> Result<usize> {
    let shape_err = |what: &str, a: &Array, want: String| KvError::Shape(format!("'{name}{what}' is {:?} {:?}; expected {want}", a.dtype(), a.shape()));
    let bh = |a: &Array, heads: &mut Option<(i32, i32)>| {
        let sh = a.shape();
        let first = (sh.first().copied().unwrap_or(0), sh.get(1).copied().unwrap_or(0));
        sh.len() == 4 && *heads.get_or_insert(first) == first
    };
    match body {
        Body::Float(s) => {
            let Some(a) = arrays.remove(name) else { return Ok(0) };
            if !bh(&a, heads) || a.shape()[3] != head_dim as i32 || a.dtype() != float_dtype {
                return Err(shape_err("", &a, format!("{float_dtype:?} [B, H, tokens, {head_dim}]")));
            }
            let n = a.shape()[2] as usize;
            s.restore(&a)?;
            Ok(n)
        }
        Body::Paged(_) | Body::Quant(_) => {
            let (bits, group, axis) = match body {
                Body::Quant(s) => (s.bits, s.group, s.axis),
                Body::Paged(s) => (s.bits, s.group, s.axis),
                Body::Float(_) => unreachable!(),
            };
            let parts = ["w", "scales", "biases"].map(|p| arrays.remove(&format!("{name}.{p}")));
            let [Some(w), Some(scales), Some(biases)] = parts else {
                if parts.iter().any(Option::is_some) {
                    return Err(KvError::Shape(format!("'{name}' needs all of .w, .scales and .biases")));
                }
                return Ok(0);
            };
            let (bits, g, d) = (bits as usize, group, head_dim);
            let ss = scales.shape();
            // Tokens on the row axis (per-token groups) or packed along the last (per-channel).
            let (n, w_want, s_want) = match axis {
                TokenAxis::Rows => {
                    let n = ss.get(2).copied().unwrap_or(0) as usize;
                    (n, [n, d * bits / 32], [n, d / g])
                }
                TokenAxis::Cols => {
                    let n = ss.get(3).copied().unwrap_or(0) as usize * g;
                    (n, [d, n * bits / 32], [d, n / g])
                }
            };
            let tail = |a: &Array| a.shape().get(2..).map(|t| t.iter().map(|&x| x as usize).collect::<Vec<_>>());
            if w.dtype() != Dtype::Uint32 || !bh(&w, heads) || tail(&w) != Some(w_want.to_vec()) {
                return Err(shape_err(".w", &w, format!("Uint32 [B, H, {}, {}] ({bits}-bit, group {g})", w_want[0], w_want[1])));
            }
            for (what, a) in [(".scales", &scales), (".biases", &biases)] {
                if a.dtype() != Dtype::Float16 || !bh(a, heads) || tail(a) != Some(s_want.to_vec()) {
                    return Err(shape_err(what, a, format!("Float16 [B, H, {}, {}] (group {g})", s_want[0], s_want[1])));
                }
            }
            let packed = crate::store::Packed { w, scales, biases };
            match body {
                Body::Quant(s) => s.restore(n, &packed)?,
                Body::Paged(s) => s.restore(n, &packed)?,
                Body::Float(_) => unreachable!(),
            }
            Ok(n)
        }
    }
}

/// Construction options that are not part of the precision setting.
#[derive(Debug, Clone, Copy)]
pub struct CacheOptions {
    /// Keep at most this many tokens visible (`--max-kv-size`, sliding-window layers).
    pub max_size: Option<usize>,
    /// Largest chunk `update` will be given; a ring keeps this much slack so a chunk never
    /// overwrites keys its own first queries still need.
    pub max_chunk: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions { max_size: None, max_chunk: 512 }
    }
}

pub struct KvCache {
    spec: KvSpec,
    opts: CacheOptions,
    sink_k: FloatStore,
    sink_v: FloatStore,
    body_k: Body,
    body_v: Body,
    /// Position of the token in each body slot (a ring reuses slots).
    body_pos: Vec<i32>,
    /// Next body slot to write (equals the body length without a ring).
    body_head: usize,
    tail_k: FloatStore,
    tail_v: FloatStore,
    offset: usize,
    /// The Hadamard matrix in f32, and a copy in the last other dtype it was applied in.
    rotation: Option<Array>,
    rotation_cast: std::cell::RefCell<Option<Array>>,
    /// Centered keys ([`KeyLayout::Centered`]): the per-channel mean `[B, Hkv, 1, D]` of the
    /// first keys, in the stored (rotated) frame, taken off every key stored since. Any vector
    /// keeps attention exact; this one takes the offset out of the groups' ranges.
    key_center: Option<Array>,
    head_dim: usize,
    /// The fused decode step's position counter on the device and the value it will hold once
    /// the queued steps ran (see [`KvCache::fused_step`]).
    step_pos: Option<(Array, usize)>,
    /// The per-channel step's counter (see [`KvCache::channel_step`]) and the (tail row, body
    /// tokens) it will hold once the queued steps ran.
    chan_pos: Option<(Array, usize, usize)>,
    /// The path the last attention took (see [`KvCache::last_path`]).
    last_path: std::cell::Cell<Option<Choice>>,
}

impl KvCache {
    pub fn new(spec: KvSpec, head_dim: usize, opts: CacheOptions) -> Result<Self> {
        spec.validate(head_dim)?;
        if let Some(w) = opts.max_size {
            if w <= spec.sinks {
                return Err(KvError::InvalidSpec {
                    flag: "--max-kv-size",
                    message: format!("max size {w} must exceed the {} sink tokens (--kv-sinks)", spec.sinks),
                });
            }
            let block = spec.block_tokens();
            if !(w - spec.sinks).is_multiple_of(block) {
                return Err(KvError::InvalidSpec {
                    flag: "--max-kv-size",
                    message: format!(
                        "with per-channel keys, max size minus sinks ({}) must be a multiple of the key group {block}",
                        w - spec.sinks
                    ),
                });
            }
        }
        let k_axis = match spec.key_layout {
            KeyLayout::PerToken | KeyLayout::Centered => TokenAxis::Rows,
            KeyLayout::PerChannel => TokenAxis::Cols,
        };
        let rotation = match spec.rotation {
            Rotation::None => None,
            _ => Some(hadamard(head_dim, Dtype::Float32)?),
        };
        // Per-channel keys keep their unfinished group here (K and V) until it is whole: in
        // 16 bits, growing 16 tokens at a time, so that a short conversation's cache stays
        // below a 16-bit one's.
        let per_channel = spec.block_tokens() > 1;
        let tail = || if per_channel { FloatStore::narrowed(16, Dtype::Float16) } else { FloatStore::default() };
        // Sinks never grow past their count: one buffer of exactly that many tokens (a step of
        // 256 would make one sink token cost 256 tokens' bytes), kept exactly as written.
        let sinks = spec.sinks.max(1);
        let sink = || FloatStore::with_step(sinks);
        Ok(KvCache {
            body_k: Body::new(&spec.k, k_axis),
            body_v: Body::new(&spec.v, TokenAxis::Rows),
            spec,
            opts,
            sink_k: sink(),
            sink_v: sink(),
            body_pos: Vec::new(),
            body_head: 0,
            tail_k: tail(),
            tail_v: tail(),
            offset: 0,
            rotation,
            rotation_cast: std::cell::RefCell::new(None),
            key_center: None,
            head_dim,
            step_pos: None,
            chan_pos: None,
            last_path: std::cell::Cell::new(None),
        })
    }

    /// A cache whose body lives in the pool blocks of `table`, which the sequence's layers
    /// share (this is layer `layer`). The spec must be the one the pool's format gives this
    /// layer ([`LayerFormat::of`]).
    pub fn new_paged(spec: KvSpec, head_dim: usize, table: SharedTable, layer: usize) -> Result<Self> {
        let fmt = table.lock().unwrap_or_else(|e| e.into_inner()).format().layer(layer);
        if LayerFormat::of(&spec) != Some(fmt) {
            return Err(KvError::InvalidSpec { flag: "--kv", message: format!("{spec} cannot live in pool blocks of {fmt:?} (layer {layer})") });
        }
        let mut cache = KvCache::new(spec, head_dim, CacheOptions::default())?;
        cache.body_k = Body::Paged(PagedStore::new(table.clone(), layer, Half::K));
        cache.body_v = Body::Paged(PagedStore::new(table, layer, Half::V));
        Ok(cache)
    }

    /// The pool table of a cache made by [`Self::new_paged`].
    pub fn paged_table(&self) -> Option<&SharedTable> {
        match &self.body_k {
            Body::Paged(s) => Some(s.table()),
            _ => None,
        }
    }

    /// For [`crate::batch`]: the pooled K and V stores when the next `l` tokens go straight
    /// into the blocks (everything a pooled spec allows, and nothing left in the tail).
    pub(crate) fn paged_direct(&mut self, l: usize) -> Option<(&mut PagedStore, &mut PagedStore)> {
        if l != 1 || !self.tail_k.is_empty() || !self.sink_k.is_empty() || self.opts.max_size.is_some() {
            return None;
        }
        match (&mut self.body_k, &mut self.body_v) {
            (Body::Paged(k), Body::Paged(v)) if k.axis == TokenAxis::Rows => Some((k, v)),
            _ => None,
        }
    }

    /// For [`crate::batch`]: the pooled K and V stores of a cache with per-channel keys, whose
    /// decode step writes through [`Self::update`] (float tail, whole groups into the blocks)
    /// and attends with [`crate::paged_step::attend_channels`].
    /// Sink tokens are read from the float rows before the tail ([`Self::paged_floats`]) once
    /// all of them are in; until then the cache attends on its own.
    pub(crate) fn paged_channels(&self) -> Option<(&PagedStore, &PagedStore)> {
        if self.sink_k.len() != self.spec.sinks || self.opts.max_size.is_some() {
            return None;
        }
        match (&self.body_k, &self.body_v) {
            (Body::Paged(k), Body::Paged(v)) if k.axis == TokenAxis::Cols => Some((k, v)),
            _ => None,
        }
    }

    /// The float tail (K and V `[B, Hkv, n, D]`), if any tokens are in it.
    pub(crate) fn float_tail(&self) -> Option<(Array, Array)> {
        self.tail_k.view().zip(self.tail_v.view())
    }

    /// For the paged per-channel step: the tokens past the sinks (what the block table counts)
    /// and the float rows the op reads, the sinks first, then the tail. One or two sink tokens
    /// and at most a key group of tail make the join cheap.
    pub(crate) fn paged_floats(&self) -> Result<(usize, Option<(Array, Array)>)> {
        let (sink, tail) = (self.sink_k.view().zip(self.sink_v.view()), self.float_tail());
        let rows = attention::types::join_float_runs(sink.as_ref().map(|(k, v)| (k, v)), tail.as_ref().map(|(k, v)| (k, v)))?;
        Ok((self.offset - self.sink_k.len(), rows))
    }

    /// A decode query in the stored frame (rotated when keys are).
    pub(crate) fn rotate_query(&self, q: &Array) -> Result<Array> {
        if self.spec.rotation.keys() {
            self.rotate(q)
        } else {
            Ok(q.clone())
        }
    }

    /// Records the path a batched step took for this cache.
    pub(crate) fn set_path(&self, choice: Choice) {
        self.last_path.set(Some(choice));
    }

    /// For [`crate::batch`]: records one token written into the body by a batched step.
    pub(crate) fn advance_one(&mut self, choice: Choice) {
        match (&mut self.body_k, &mut self.body_v) {
            (Body::Paged(k), Body::Paged(v)) => {
                k.set_written(self.offset + 1);
                v.set_written(self.offset + 1);
            }
            // The decode steps write row `body_head` of the buffers themselves.
            (Body::Quant(k), Body::Quant(v)) => {
                k.set_written(self.body_head + 1);
                v.set_written(self.body_head + 1);
            }
            _ => {}
        }
        self.last_path.set(Some(choice));
        self.body_pos.push(self.offset as i32);
        self.body_head += 1;
        self.offset += 1;
    }

    /// The most tokens one [`Self::update`] takes: a rotating cache's chunk bound
    /// (`max_chunk`), `None` for a cache that grows.
    pub fn max_update(&self) -> Option<usize> {
        self.opts.max_size.map(|_| self.opts.max_chunk)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn spec(&self) -> &KvSpec {
        &self.spec
    }

    /// The attention path the last `attend` or decode step took, and why.
    pub fn last_path(&self) -> Option<Choice> {
        self.last_path.get()
    }

    /// Tokens seen so far; the RoPE offset of the next token.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Tokens held (may be fewer than `offset` with a ring).
    pub fn len(&self) -> usize {
        self.sink_k.len() + self.body_pos.len() + self.tail_k.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn ring_slots(&self) -> Option<usize> {
        self.opts.max_size.map(|w| {
            let block = self.spec.block_tokens();
            (w - self.spec.sinks + self.opts.max_chunk).div_ceil(block) * block
        })
    }

    fn rotate(&self, x: &Array) -> Result<Array> {
        match &self.rotation {
            Some(h) => Ok(mlx_rs::ops::matmul(x, rotation_in(&self.rotation_cast, h, x.dtype())?)?),
            None => Ok(x.clone()),
        }
    }


    /// Appends `k`, `v` (`[B, Hkv, L, D]`, RoPE already applied).
    pub fn update(&mut self, k: &Array, v: &Array) -> Result<()> {
        let l = k.shape()[2] as usize;
        if self.opts.max_size.is_some() && l > self.opts.max_chunk {
            return Err(KvError::Capacity { requested: l, capacity: self.opts.max_chunk });
        }
        let k = if self.spec.rotation.keys() { self.rotate(k)? } else { k.clone() };
        let k = self.center_keys(&k)?;
        let v = if self.spec.rotation.values() { self.rotate(v)? } else { v.clone() };
        let mut from = 0usize;
        if self.sink_k.len() < self.spec.sinks {
            let n = (self.spec.sinks - self.sink_k.len()).min(l);
            self.sink_k.append(&k.index((.., .., 0..n as i32, ..)))?;
            self.sink_v.append(&v.index((.., .., 0..n as i32, ..)))?;
            from = n;
        }
        let start_pos = self.offset + from;
        self.offset += l;
        if from == l {
            return Ok(());
        }
        let (k, v) = if from > 0 {
            (k.index((.., .., from as i32.., ..)), v.index((.., .., from as i32.., ..)))
        } else {
            (k, v)
        };
        let n_new = l - from;
        let flushable = |pending: usize, total: usize, spec: &KvSpec| {
            if total < spec.quantized_kv_start || pending < spec.residual + spec.block_tokens() {
                0
            } else {
                (pending - spec.residual) / spec.block_tokens() * spec.block_tokens()
            }
        };
        let pending = self.tail_k.len() + n_new;
        let n_flush = flushable(pending, self.offset, &self.spec);
        if self.tail_k.is_empty() && n_flush == n_new {
            // Common decode case: the new tokens go straight to the body, no tail copy.
            return self.write_body(&k, &v, start_pos);
        }
        if self.tail_k.is_empty() && n_flush > 0 {
            // Whole groups of a prefill chunk go to the body from the chunk itself (a narrowed
            // tail would round them first, so the codes would depend on where chunks end);
            // only the rest waits in the tail.
            let (f, z) = (n_flush as i32, n_new as i32);
            self.write_body(&k.index((.., .., 0..f, ..)), &v.index((.., .., 0..f, ..)), start_pos)?;
            self.tail_k.append(&k.index((.., .., f..z, ..)))?;
            return self.tail_v.append(&v.index((.., .., f..z, ..)));
        }
        let tail_start = start_pos - self.tail_k.len();
        self.tail_k.append(&k)?;
        self.tail_v.append(&v)?;
        if n_flush > 0 {
            let fk = self.tail_k.slice(0, n_flush).unwrap();
            let fv = self.tail_v.slice(0, n_flush).unwrap();
            self.write_body(&fk, &fv, tail_start)?;
            self.tail_k.drop_front(n_flush)?;
            self.tail_v.drop_front(n_flush)?;
        }
        Ok(())
    }

    fn write_body(&mut self, k: &Array, v: &Array, first_pos: usize) -> Result<()> {
        let n = k.shape()[2] as usize;
        let ring = self.ring_slots();
        let mut done = 0;
        while done < n {
            let slot = match ring {
                Some(r) => self.body_head % r,
                None => self.body_head,
            };
            let room = ring.map_or(n - done, |r| (r - slot).min(n - done));
            let (a, z) = (done as i32, (done + room) as i32);
            let (kp, vp) = if room == n {
                (k.clone(), v.clone())
            } else {
                (k.index((.., .., a..z, ..)), v.index((.., .., a..z, ..)))
            };
            self.body_k.write(slot, &kp)?;
            self.body_v.write(slot, &vp)?;
            for i in 0..room {
                let pos = (first_pos + done + i) as i32;
                if slot + i < self.body_pos.len() {
                    self.body_pos[slot + i] = pos;
                } else {
                    self.body_pos.push(pos);
                }
            }
            self.body_head += room;
            done += room;
        }
        Ok(())
    }

    /// Key positions in segment order: sinks, body slots, tail.
    fn key_positions(&self) -> Vec<i32> {
        let tail_start = (self.offset - self.tail_k.len()) as i32;
        (0..self.sink_k.len() as i32)
            .chain(self.body_pos.iter().copied())
            .chain(tail_start..self.offset as i32)
            .collect()
    }

    /// The visibility mask for the last `l` queries, or a cheaper equivalent.
    fn mask(&self, l: usize) -> Result<Mask> {
        let Some(w) = self.opts.max_size else {
            return Ok(if l > 1 { Mask::Causal } else { Mask::None });
        };
        let window = (w - self.spec.sinks) as i32;
        let kpos = self.key_positions();
        let first_q = (self.offset - l) as i32;
        let oldest_needed = first_q - window + 1;
        if l == 1 && kpos.iter().skip(self.sink_k.len()).all(|&p| p >= oldest_needed) {
            return Ok(Mask::None);
        }
        let n_sinks = self.sink_k.len() as i32;
        let t = kpos.len() as i32;
        let kp = Array::from_slice(&kpos, &[1, t]);
        let qp = Array::arange::<_, i32>(first_q, self.offset as i32, None)?.reshape(&[l as i32, 1])?;
        let is_sink = Array::arange::<_, i32>(None, t, None)?.lt(Array::from_int(n_sinks))?.reshape(&[1, t])?;
        let in_window = kp.gt(&(&qp - Array::from_int(window)))?;
        let visible = kp.le(&qp)?.logical_and(&is_sink.logical_or(&in_window)?)?;
        Ok(Mask::Visible(visible))
    }

    /// The body slots a decode query at position `qpos` sees in a rotating cache: the runs of
    /// its ring whose tokens lie inside the window (two at most, where the ring wraps), each
    /// ending on a key group (whole groups are written); `None` where that does not hold or
    /// nothing is visible (the masked MLX-ops path then runs).
    fn visible_body(&self, qpos: usize) -> Option<Vec<(usize, usize)>> {
        let w = self.opts.max_size?;
        let oldest = qpos as i64 - (w - self.spec.sinks) as i64 + 1;
        let mut runs = Vec::new();
        let mut start = None;
        for (slot, &p) in self.body_pos.iter().enumerate() {
            match (p as i64 >= oldest, start) {
                (true, None) => start = Some(slot),
                (false, Some(a)) => {
                    runs.push((a, slot));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(a) = start {
            runs.push((a, self.body_pos.len()));
        }
        let group = self.spec.block_tokens();
        (!runs.is_empty() && runs.len() <= 2 && runs.iter().all(|&(_, b)| b % group == 0)).then_some(runs)
    }

    fn segments(&self) -> Vec<Segment> {
        let mut segs = Vec::with_capacity(3);
        if let (Some(k), Some(v)) = (self.sink_k.view(), self.sink_v.view()) {
            segs.push(Segment { k: Tensor::Float(k), v: Tensor::Float(v), len: self.sink_k.len() });
        }
        let slots = self.body_pos.len();
        if let (Some(k), Some(v)) = (self.body_k.tensor(slots), self.body_v.tensor(slots)) {
            segs.push(Segment { k, v, len: slots });
        }
        if let (Some(k), Some(v)) = (self.tail_k.view(), self.tail_v.view()) {
            segs.push(Segment { k: Tensor::Float(k), v: Tensor::Float(v), len: self.tail_k.len() });
        }
        segs
    }

    /// Attention of `q` (`[B, Hq, L, D]`, the newest `L` tokens, already in the cache).
    pub fn attend(&self, q: &Array, scoring: impl Into<Scoring>, sinks: Option<&Array>) -> Result<Array> {
        let scoring = scoring.into();
        let l = q.shape()[2] as usize;
        if self.is_empty() {
            return Err(KvError::Shape("attend called on an empty cache".into()));
        }
        if sinks.is_some() && self.key_center.is_some() {
            // A learned sink logit is not shifted with the scores, so centering would change
            // its weight.
            return Err(KvError::InvalidSpec { flag: "--kv-key-layout", message: "centered keys cannot serve a model with learned attention sinks".into() });
        }
        let q = self.rotate_query(q)?;
        let segments = self.segments();
        if let Some(out) = self.attend_ring(&q, &segments, scoring, sinks)? {
            return self.rotate_output(out);
        }
        let mask = self.mask(l)?;
        let choice = attention::choose(&q, &segments, &mask, sinks, scoring);
        self.last_path.set(Some(choice));
        let out = attention::run(choice, &q, &segments, &mask, scoring, sinks)?;
        if self.spec.rotation.values() {
            self.rotate(&out)
        } else {
            Ok(out)
        }
    }

    /// One decode query of a rotating cache (packed per-token, or per-channel with its sinks and
    /// tail) on the CPU primitive, over the ring runs inside its window ([`Self::visible_body`])
    /// instead of a mask, which would send it to the block path (Gemma 3's sliding layers
    /// decoded at a third of the speed there); `None` where that does not apply.
    fn attend_ring(&self, q: &Array, segments: &[Segment], scoring: Scoring, sinks: Option<&Array>) -> Result<Option<Array>> {
        if self.opts.max_size.is_none() || q.shape()[2] != 1 || sinks.is_some() || crate::Backend::current() != crate::Backend::Cpu || !mlx_ext::options::current().cpu_kernels.on() {
            return Ok(None);
        }
        let Some(ranges) = self.visible_body(self.offset - 1) else { return Ok(None) };
        let out = if let Some((k, v, len, _)) = attention::types::single_packed_body(segments, &Mask::None, None) {
            if !attention::cpu::primitive_covers(&k, &v, self.head_dim) {
                return Ok(None);
            }
            attention::cpu::primitive_ranges(q, k, v, len, &ranges, scoring)?
        } else {
            let Some(b) = attention::types::channel_packed_body(segments, &Mask::None, None) else { return Ok(None) };
            if !attention::cpu::channel_primitive_covers(&b, self.head_dim) {
                return Ok(None);
            }
            attention::cpu::primitive_channels_ranges(q, &b, &ranges, scoring)?
        };
        self.last_path.set(Some(attention::Choice { path: attention::Path::CpuPrimitive, why: "a rotating cache's window, read as ring runs" }));
        Ok(Some(out))
    }

    /// `update` then `attend`: what an attention layer calls. `scoring`: the query scale, and
    /// a soft cap where the model has one ([`Scoring`]).
    pub fn update_and_attend(&mut self, q: &Array, k: &Array, v: &Array, scoring: impl Into<Scoring>, sinks: Option<&Array>) -> Result<Array> {
        let scoring = scoring.into();
        if mlx_ext::host_profile::enabled() {
            let t0 = std::time::Instant::now();
            let out = self.update_and_attend_inner(q, k, v, scoring, sinks);
            mlx_ext::host_profile::add_layer(t0.elapsed().as_nanos() as u64);
            return out;
        }
        self.update_and_attend_inner(q, k, v, scoring, sinks)
    }

    fn update_and_attend_inner(&mut self, q: &Array, k: &Array, v: &Array, scoring: Scoring, sinks: Option<&Array>) -> Result<Array> {
        if sinks.is_none() && k.shape()[0] == 1 {
            if let Some(out) = self.paged_step(q, k, v, scoring)? {
                return Ok(out);
            }
        }
        self.update_and_attend_plain(q, k, v, scoring, sinks)
    }

    /// One decode token of a pooled cache through the paged step, where a paged path reads
    /// its widths ([`attention::choose_paged`]); `None` otherwise.
    fn paged_step(&mut self, q: &Array, k: &Array, v: &Array, scoring: Scoring) -> Result<Option<Array>> {
        let (head_dim, at, capped) = (self.head_dim, self.offset, scoring.softcap.is_some());
        let rows = (q.shape()[1] / k.shape()[1]) as usize;
        if q.shape()[2] == 1 && k.shape()[2] == 1 {
            if let Some((ks, vs)) = self.paged_channels() {
                let Some(choice) = attention::choose_paged(ks.bits, ks.group, true, vs.bits, vs.group, head_dim, rows, capped) else { return Ok(None) };
                self.update(k, v)?;
                let q = self.rotate_query(q)?;
                let (ks, vs) = self.paged_channels().expect("checked above");
                let (past, floats) = self.paged_floats()?;
                let out = crate::paged_step::attend_channels(&[(ks, vs)], &[past], &[floats], self.sink_k.len(), &q, scoring)?;
                self.set_path(choice);
                return Ok(Some(self.rotate_output(out)?));
            }
        }
        let Some((ks, vs)) = self.paged_direct(k.shape()[2] as usize) else { return Ok(None) };
        let Some(choice) = attention::choose_paged(ks.bits, ks.group, false, vs.bits, vs.group, head_dim, rows, capped) else { return Ok(None) };
        let (q, k, v) = self.rotate_inputs(q, k, v)?;
        let k = self.center_keys(&k)?;
        let (ks, vs) = self.paged_direct(1).expect("checked above");
        let out = crate::paged_step::step(&[(&*ks, &*vs)], &[at], choice, &q, &k, &v, scoring)?;
        self.advance_one(choice);
        Ok(Some(self.rotate_output(out)?))
    }

    /// A decode step's query and new token in the stored frame: query and key rotated when keys
    /// are, value when values are. Kernels that write and attend in one go see only this frame.
    pub(crate) fn rotate_inputs(&self, q: &Array, k: &Array, v: &Array) -> Result<(Array, Array, Array)> {
        let r = self.spec.rotation;
        let rot = |x: &Array, on: bool| if on { self.rotate(x) } else { Ok(x.clone()) };
        Ok((rot(q, r.keys())?, rot(k, r.keys())?, rot(v, r.values())?))
    }

    pub(crate) fn centered(&self) -> bool {
        self.spec.key_layout == KeyLayout::Centered && self.spec.k.is_quantized()
    }

    /// Keys (already rotated) less the cache's key center, which the first keys set; unchanged
    /// unless keys are quantized and centered.
    pub(crate) fn center_keys(&mut self, k: &Array) -> Result<Array> {
        if !self.centered() {
            return Ok(k.clone());
        }
        let c = self.key_center_for(k)?;
        Ok(k.subtract(c.as_dtype(k.dtype())?)?)
    }

    /// The key center, taken from `k` (rotated keys) if the cache has none yet.
    pub(crate) fn key_center_for(&mut self, k: &Array) -> Result<Array> {
        if self.key_center.is_none() {
            self.key_center = Some(k.mean_axis(2, true)?);
        }
        Ok(self.key_center.clone().expect("set above"))
    }

    /// The attention output back from the values' rotated frame (Hadamard is its own inverse).
    pub(crate) fn rotate_output(&self, out: Array) -> Result<Array> {
        if self.spec.rotation.values() {
            self.rotate(&out)
        } else {
            Ok(out)
        }
    }

    /// For a sequence [`crate::batch`] could not group: the cache's own write and attention.
    pub(crate) fn update_and_attend_unpooled(&mut self, q: &Array, k: &Array, v: &Array, scoring: Scoring) -> Result<Array> {
        self.update_and_attend_plain(q, k, v, scoring, None)
    }

    fn update_and_attend_plain(&mut self, q: &Array, k: &Array, v: &Array, scoring: Scoring, sinks: Option<&Array>) -> Result<Array> {
        if sinks.is_none() {
            if let Some(out) = self.fused_step(q, k, v, scoring)? {
                return Ok(out);
            }
            if let Some(out) = self.channel_step(q, k, v, scoring)? {
                return Ok(out);
            }
        }
        self.chan_pos = None;
        self.update(k, v)?;
        self.attend(q, scoring, sinks)
    }

    /// One decode token through the fused GPU step, where [`attention::choose_step`] says so: the
    /// token's K and V are quantized and written into the body by the attention kernel itself
    /// ([`attention::fused::decode_step`]), so a layer's decode is one launch (two with
    /// `--gpu-fused-fold off`) and no other op (the MLX-ops write is a `quantize` and three
    /// slice updates each for K and V, and MLX's per-op cost dominates decode on the GPU).
    fn fused_step(&mut self, q: &Array, k: &Array, v: &Array, scoring: Scoring) -> Result<Option<Array>> {
        let centered = self.centered();
        let spec = &self.spec;
        let direct = k.shape()[2] == 1
            && q.shape()[2] == 1
            && spec.sinks == 0
            && spec.residual == 0
            && spec.block_tokens() == 1
            && self.opts.max_size.is_none()
            && self.tail_k.is_empty()
            && self.offset + 1 >= spec.quantized_kv_start;
        let (Body::Quant(bk), Body::Quant(bv)) = (&self.body_k, &self.body_v) else { return Ok(None) };
        let (ks, qs) = (k.shape(), q.shape());
        let (b, hkv) = (ks[0], ks[1]);
        let case = StepCase {
            direct: direct && bk.axis == TokenAxis::Rows,
            k_bits: bk.bits,
            k_group: bk.group,
            v_bits: bv.bits,
            v_group: bv.group,
            head_dim: self.head_dim,
            rows: (qs[1] % hkv == 0).then_some((qs[1] / hkv) as usize),
            softcap: scoring.softcap.is_some(),
        };
        let Some(choice) = attention::choose_step(&case) else { return Ok(None) };
        if choice.path == attention::Path::CpuStep {
            return self.cpu_step(q, k, v, scoring, choice).map(Some);
        }
        let (slot, scale) = (self.body_head, scoring.scale);
        // The stored frame (rotations, key center) is entered inside the one-launch kernel
        // (`--gpu-fused-rotate on`); otherwise MLX ops around the launch enter it and leave it,
        // and the kernel only sees the frame's values. Decided before any frame op is built:
        // building them costs host time per layer and token even when they are never run.
        let r = spec.rotation;
        let inside = (r != crate::Rotation::None || centered)
            && mlx_ext::options::current().gpu_fused_rotate.on()
            && attention::fused::step_fold_applies(slot + 1, (b * hkv) as usize, self.head_dim);
        let outside = if inside {
            if centered && self.key_center.is_none() {
                // Only a cache whose first stored token is this one: the kernel needs a center.
                let (_, rk, _) = self.rotate_inputs(q, k, v)?;
                self.key_center_for(&rk)?;
            }
            None
        } else {
            let (rq, rk, rv) = self.rotate_inputs(q, k, v)?;
            Some((rq, self.center_keys(&rk)?, rv))
        };
        let (Body::Quant(bk), Body::Quant(bv)) = (&mut self.body_k, &mut self.body_v) else { unreachable!("matched above") };
        bk.reserve_rows(slot + 1, b, hkv, self.head_dim)?;
        bv.reserve_rows(slot + 1, b, hkv, self.head_dim)?;
        let pos = match self.step_pos.take() {
            Some((p, at)) if at == slot => p,
            // Made on the device (an add of a host array, so the kernels' in-place updates hit a
            // device buffer), large enough for a buffer of its own: pos[0] = slot, then the
            // one-launch variant's arrival counters (see `fused::decode_step`).
            _ => {
                let mut init = vec![0i32; 1024];
                init[0] = slot as i32;
                Array::from_slice(&init, &[1024]).add(Array::from_int(0))?
            }
        };
        let ((kf, cap), (vf, _)) = (bk.full().expect("reserved"), bv.full().expect("reserved"));
        let kop = attention::PackedOperand { full: &kf, bits: bk.bits, group: bk.group };
        let vop = attention::PackedOperand { full: &vf, bits: bv.bits, group: bv.group };
        let mut out = match &outside {
            None => {
                let frame = attention::fused::StoredFrame { rot: r.bits(), center: if centered { self.key_center.as_ref() } else { None } };
                attention::fused::decode_step(q, k, v, kop, vop, &pos, slot + 1, cap, scale, Some(frame))?
            }
            Some((rq, rk, rv)) => attention::fused::decode_step(rq, rk, rv, kop, vop, &pos, slot + 1, cap, scale, None)?,
        };
        if let (Some(h), true, false) = (&self.rotation, r.values(), inside) {
            out = mlx_rs::ops::matmul(&out, rotation_in(&self.rotation_cast, h, out.dtype())?)?;
        }
        self.step_pos = Some((pos, slot + 1));
        self.advance_one(choice);
        Ok(Some(out))
    }

    /// [`Self::fused_step`] on the CPU ([`attention::Path::CpuStep`]): the frame is entered with
    /// MLX ops (rotations are matmuls, cheap there), then one op quantizes and writes the token
    /// into row `body_head` of the buffers and attends ([`mlx_ext::cpu::decode_step`]).
    fn cpu_step(&mut self, q: &Array, k: &Array, v: &Array, scoring: Scoring, choice: Choice) -> Result<Array> {
        let (rq, rk, rv) = self.rotate_inputs(q, k, v)?;
        let rk = self.center_keys(&rk)?;
        let (b, hkv) = (k.shape()[0], k.shape()[1]);
        let slot = self.body_head;
        let (Body::Quant(bk), Body::Quant(bv)) = (&mut self.body_k, &mut self.body_v) else { unreachable!("choose_step saw both quantized") };
        bk.reserve_rows(slot + 1, b, hkv, self.head_dim)?;
        bv.reserve_rows(slot + 1, b, hkv, self.head_dim)?;
        let ((kf, _), (vf, _)) = (bk.full().expect("reserved"), bv.full().expect("reserved"));
        let kop = attention::PackedOperand { full: &kf, bits: bk.bits, group: bk.group };
        let vop = attention::PackedOperand { full: &vf, bits: bv.bits, group: bv.group };
        let qs = rq.as_dtype(Dtype::Float32)? * Array::from_f32(scoring.scale);
        let out = mlx_ext::cpu::decode_step(&qs, &rk, &rv, kop.as_ref(), vop.as_ref(), slot, scoring.softcap)?;
        // The op wrote row `slot` in place: whatever touches these buffers next (the next
        // step reads the row) must come after it in the graph.
        let bufs = mlx_ext::graph::depends(&[&kf.w, &kf.scales, &kf.biases, &vf.w, &vf.scales, &vf.biases], &[&out])?;
        let mut bufs = bufs.into_iter();
        let mut take = || bufs.next().expect("six buffers");
        bk.share_buffers(crate::store::Packed { w: take(), scales: take(), biases: take() });
        bv.share_buffers(crate::store::Packed { w: take(), scales: take(), biases: take() });
        self.advance_one(choice);
        self.rotate_output(out.as_dtype(q.dtype())?)
    }

    /// One decode token of a per-channel cache through the fused per-channel step, where
    /// [`attention::choose_channel_step`] says so and the token fits the float tail without
    /// completing a key group: the kernel writes the token's K and V into the tail buffers in
    /// place and attends over body and tail in one launch ([`attention::fused::step_channels`]),
    /// where the MLX-ops step is two tail writes, two contiguity copies of the tail, a host
    /// array upload and two launches. The tail takes room for its whole group first (it grows
    /// 16 tokens at a time in prefill); the token that completes a group takes the MLX-ops path
    /// (quantizing a group is a whole-group op).
    fn channel_step(&mut self, q: &Array, k: &Array, v: &Array, scoring: Scoring) -> Result<Option<Array>> {
        let spec = &self.spec;
        let block = spec.block_tokens();
        let (ks, qs) = (k.shape(), q.shape());
        let direct = ks[2] == 1
            && qs[2] == 1
            && block > 1
            && spec.sinks <= attention::fused::MAX_SINKS
            && self.sink_k.len() == spec.sinks
            && !self.body_pos.is_empty()
            && self.tail_k.len() + 1 < spec.residual + block
            && self.body_pos.len().is_multiple_of(block);
        if !direct {
            return Ok(None);
        }
        let (Body::Quant(bk), Body::Quant(bv)) = (&self.body_k, &self.body_v) else { return Ok(None) };
        if bk.axis != TokenAxis::Cols || bv.axis != TokenAxis::Rows {
            return Ok(None);
        }
        let hkv = ks[1];
        let rows = (qs[1] % hkv == 0).then_some((qs[1] / hkv) as usize);
        let Some(choice) = attention::choose_channel_step(true, bk.bits, bk.group, bv.bits, bv.group, self.head_dim, rows, scoring.softcap.is_some()) else { return Ok(None) };
        // A rotating cache's window: its visible ring runs, read by the CPU step only (the fused
        // kernel reads every body slot).
        let ranges = match (self.opts.max_size, choice.path) {
            (None, _) => Vec::new(),
            (Some(_), attention::Path::CpuStep) => match self.visible_body(self.offset) {
                Some(r) => r,
                None => return Ok(None),
            },
            (Some(_), _) => return Ok(None),
        };
        let group_end = spec.residual + block;
        self.tail_k.reserve(group_end, k)?;
        self.tail_v.reserve(group_end, v)?;
        let (Some(tk), Some(tv)) = (self.tail_k.room_for_one(k.dtype()), self.tail_v.room_for_one(v.dtype())) else { return Ok(None) };
        let (Some((kf, _)), Some((vf, _))) = (bk.full(), bv.full()) else { return Ok(None) };
        let (row, body) = (self.tail_k.len(), self.body_pos.len());
        if choice.path == attention::Path::CpuStep {
            let (tk, tv) = (tk.clone(), tv.clone());
            let rot = self.spec.rotation.bits();
            let kop = attention::PackedOperand { full: &kf, bits: bk.bits, group: bk.group };
            let vop = attention::PackedOperand { full: &vf, bits: bv.bits, group: bv.group };
            let sinks = self.sink_k.view().zip(self.sink_v.view());
            let floats = mlx_ext::cpu::ChannelFloats { tail: (&tk, &tv), row, sinks: sinks.as_ref().map(|(k, v)| (k, v)) };
            let qs = attention::cpu::scaled(q, scoring)?;
            let body = mlx_ext::cpu::ChannelBody { len: body, ranges: &ranges };
            let out = mlx_ext::cpu::channel_decode_step(&qs, k, v, kop.as_ref(), vop.as_ref(), body, floats, rot, scoring.softcap)?;
            // The op wrote row `row` of the tail in place: whatever reads or writes the tail
            // next (the group's flush, the next step) must come after it in the graph.
            let bufs = mlx_ext::graph::depends(&[&tk, &tv], &[&out])?;
            let [nk, nv]: [Array; 2] = bufs.try_into().map_err(|_| KvError::Shape("depends gave back a wrong count".into()))?;
            self.tail_k.share_data(nk);
            self.tail_v.share_data(nv);
            self.tail_k.wrote_one();
            self.tail_v.wrote_one();
            self.chan_pos = None;
            self.last_path.set(Some(choice));
            self.offset += 1;
            return Ok(Some(out.as_dtype(q.dtype())?));
        }
        let pos = match self.chan_pos.take() {
            Some((p, r, b)) if (r, b) == (row, body) => p,
            // On the device (an add of a host array), as `fused_step`'s counter.
            _ => {
                let mut init = vec![0i32; 1024];
                init[0] = row as i32;
                init[1022] = body as i32;
                Array::from_slice(&init, &[1024]).add(Array::from_int(0))?
            }
        };
        // Rotations run inside the one-launch kernel (no matmul ops around it); with the merge
        // as a second launch they stay MLX ops.
        let t = body + row + 1;
        let r = self.spec.rotation;
        let inside = attention::fused::channel_fold_applies(t, (ks[0] * hkv) as usize, self.head_dim) && mlx_ext::options::current().gpu_fused_rotate.on();
        let kop = attention::PackedOperand { full: &kf, bits: bk.bits, group: bk.group };
        let vop = attention::PackedOperand { full: &vf, bits: bv.bits, group: bv.group };
        let (tk, tv) = (tk.clone(), tv.clone());
        let sinks = self.sink_k.view().zip(self.sink_v.view());
        let sinks = sinks.as_ref().map(|(k, v)| (k, v));
        let out = if inside {
            let rot = r.bits();
            attention::fused::step_channels(q, k, v, kop, vop, (&tk, &tv), sinks, &pos, t, scoring.scale, rot)?
        } else {
            let (rq, rk, rv) = self.rotate_inputs(q, k, v)?;
            let out = attention::fused::step_channels(&rq, &rk, &rv, kop, vop, (&tk, &tv), sinks, &pos, t, scoring.scale, 0)?;
            self.rotate_output(out)?
        };
        self.tail_k.wrote_one();
        self.tail_v.wrote_one();
        self.chan_pos = Some((pos, row + 1, body));
        self.last_path.set(Some(choice));
        self.offset += 1;
        Ok(Some(out))
    }

    /// Whether [`KvCache::trim`] can remove the newest `n` tokens in full: always within the
    /// float tail; into the body unless a ring has wrapped, and with per-channel keys only down
    /// to a whole key group (a group's codes share one scale per channel).
    pub fn can_trim(&self, n: usize) -> bool {
        if n <= self.tail_k.len() {
            return true;
        }
        let wrapped = self.ring_slots().is_some_and(|r| self.body_head > r);
        let from_body = n - self.tail_k.len();
        !wrapped && from_body <= self.body_pos.len() && (self.body_pos.len() - from_body).is_multiple_of(self.spec.block_tokens())
    }

    /// The most of the first `n` tokens this cache can be cut back to ([`Self::trim`],
    /// [`Self::fork`]): `n` itself, or with per-channel keys the last whole key group before it.
    pub fn reusable(&self, n: usize) -> usize {
        let n = n.min(self.offset);
        if self.can_trim(self.offset - n) {
            return n;
        }
        let block = self.spec.block_tokens();
        let sinks = self.sink_k.len();
        if n < sinks {
            return 0;
        }
        let m = sinks + (n - sinks) / block * block;
        if self.can_trim(self.offset - m) { m } else { 0 }
    }

    /// Removes the newest `n` tokens where possible; returns how many were removed. A ring that
    /// has wrapped cannot be cut into its body, and per-channel keys only to a whole key group.
    pub fn trim(&mut self, n: usize) -> usize {
        let from_tail = n.min(self.tail_k.len());
        self.tail_k.truncate(self.tail_k.len() - from_tail);
        self.tail_v.truncate(self.tail_v.len() - from_tail);
        let mut done = from_tail;
        let wrapped = self.ring_slots().is_some_and(|r| self.body_head > r);
        if done < n && !wrapped {
            let block = self.spec.block_tokens();
            let keep = (self.body_pos.len() - (n - done).min(self.body_pos.len())).div_ceil(block) * block;
            let m = self.body_pos.len() - keep;
            self.body_head -= m;
            self.body_pos.truncate(keep);
            done += m;
        }
        self.offset -= done;
        done
    }

    /// The live tokens as stored, for saving ([`crate::cache_file`]): exactly the valid tokens,
    /// never the allocated capacity. Names: `sink_k`/`sink_v` and `tail_k`/`tail_v` (float), and
    /// the body as `body_k`/`body_v` (float) or `body_k.w`, `body_k.scales`, `body_k.biases`
    /// (and the same for V). A ring is refused: its slots hold tokens out of order, and a
    /// sliding-window model's ring would need its slot positions saved too.
    pub fn state(&self) -> Result<Vec<(String, Array)>> {
        self.state_upto(self.offset)
    }

    /// The first `n` live tokens as stored, in [`Self::state`]'s names. Positions run sinks,
    /// body, tail (there is no ring), so the first `n` are a prefix of each part in turn.
    fn state_upto(&self, n: usize) -> Result<Vec<(String, Array)>> {
        if let Some(w) = self.opts.max_size {
            return Err(KvError::InvalidSpec {
                flag: "--max-kv-size",
                message: format!("a rotating cache (window {w}, from --max-kv-size or the model's sliding-window layers) cannot be saved or copied"),
            });
        }
        if n > self.offset || !self.can_trim(self.offset - n) {
            return Err(KvError::InvalidSpec { flag: "--kv", message: format!("the first {n} of {} tokens cannot be cut out of this cache ({})", self.offset, self.spec) });
        }
        let n_sink = n.min(self.sink_k.len());
        let n_body = (n - n_sink).min(self.body_pos.len());
        let n_tail = n - n_sink - n_body;
        let mut out = Vec::new();
        let floats = [("sink_k", &self.sink_k, n_sink), ("sink_v", &self.sink_v, n_sink), ("tail_k", &self.tail_k, n_tail), ("tail_v", &self.tail_v, n_tail)];
        for (name, store, keep) in floats {
            out.extend(store.slice(0, keep).map(|a| (name.to_string(), a)));
        }
        if let Some(c) = &self.key_center {
            out.push(("key_center".to_string(), c.clone()));
        }
        for (name, body) in [("body_k", &self.body_k), ("body_v", &self.body_v)] {
            match body {
                Body::Float(s) => out.extend(s.slots(0, n_body).map(|a| (name.to_string(), a))),
                Body::Quant(_) | Body::Paged(_) => {
                    let p = match body {
                        Body::Quant(s) => s.slice(0, n_body),
                        Body::Paged(s) => s.slice(0, n_body),
                        Body::Float(_) => None,
                    };
                    if let Some(p) = p {
                        out.push((format!("{name}.w"), p.w));
                        out.push((format!("{name}.scales"), p.scales));
                        out.push((format!("{name}.biases"), p.biases));
                    }
                }
            }
        }
        Ok(out)
    }

    /// A new cache holding a copy of the first `n` tokens, quantized as stored (nothing is
    /// requantized); this cache is unchanged. `None` where they cannot be cut out: a ring, or
    /// per-channel key groups cut inside a block. The copy owns fresh buffers sized for `n`
    /// tokens, so its resident bytes are its own and dropping this cache frees this one's.
    pub fn fork(&self, n: usize) -> Result<Option<KvCache>> {
        if self.opts.max_size.is_some() || n > self.offset || !self.can_trim(self.offset - n) {
            return Ok(None);
        }
        let state = self.state_upto(n)?;
        let float_dtype = state.iter().find(|(k, _)| !k.contains('.')).map_or(Dtype::Float32, |(_, a)| a.dtype());
        let mut arrays: std::collections::BTreeMap<String, Array> = state.into_iter().collect();
        let copy = KvCache::from_state(self.spec.clone(), self.head_dim, self.opts, float_dtype, &mut arrays)?;
        copy.last_path.set(self.last_path.get());
        Ok(Some(copy))
    }

    /// [`Self::fork`] into pool blocks of `table` (layer `layer` of a new sequence).
    pub fn fork_paged(&self, n: usize, table: SharedTable, layer: usize) -> Result<Option<KvCache>> {
        if self.opts.max_size.is_some() || n > self.offset || !self.can_trim(self.offset - n) {
            return Ok(None);
        }
        let state = self.state_upto(n)?;
        let float_dtype = state.iter().find(|(k, _)| !k.contains('.')).map_or(Dtype::Float32, |(_, a)| a.dtype());
        let mut arrays: std::collections::BTreeMap<String, Array> = state.into_iter().collect();
        let copy = KvCache::fill_from_state(KvCache::new_paged(self.spec.clone(), self.head_dim, table, layer)?, float_dtype, &mut arrays)?;
        copy.last_path.set(self.last_path.get());
        Ok(Some(copy))
    }

    /// A cache holding what [`Self::state`] gave, taking its arrays out of `arrays` by name.
    /// Every shape and dtype is checked first (float tokens must be `float_dtype`), so a damaged
    /// file fails here with the tensor's name instead of in a kernel.
    pub fn from_state(spec: KvSpec, head_dim: usize, opts: CacheOptions, float_dtype: Dtype, arrays: &mut std::collections::BTreeMap<String, Array>) -> Result<Self> {
        Self::fill_from_state(KvCache::new(spec, head_dim, opts)?, float_dtype, arrays)
    }

    /// [`Self::from_state`] into an empty `cache` (plain or pooled).
    pub fn fill_from_state(mut cache: KvCache, float_dtype: Dtype, arrays: &mut std::collections::BTreeMap<String, Array>) -> Result<Self> {
        let (opts, head_dim) = (cache.opts, cache.head_dim);
        if opts.max_size.is_some() {
            return Err(KvError::InvalidSpec { flag: "--max-kv-size", message: "a rotating cache cannot be restored from a file".into() });
        }
        let mut heads: Option<(i32, i32)> = None;
        let mut take_float = |name: &str| -> Result<Option<Array>> {
            let Some(a) = arrays.remove(name) else { return Ok(None) };
            let sh = a.shape();
            let (b, h) = *heads.get_or_insert((sh.first().copied().unwrap_or(0), sh.get(1).copied().unwrap_or(0)));
            if sh.len() != 4 || sh[0] != b || sh[1] != h || sh[3] != head_dim as i32 || a.dtype() != float_dtype {
                return Err(KvError::Shape(format!(
                    "'{name}' is {:?} {sh:?}; expected {float_dtype:?} [{b}, {h}, tokens, {head_dim}]",
                    a.dtype()
                )));
            }
            Ok(Some(a))
        };
        let center = take_float("key_center")?;
        if center.as_ref().is_some_and(|c| c.shape()[2] != 1) {
            return Err(KvError::Shape(format!("'key_center' is {:?}; expected one token", center.as_ref().map(|c| c.shape().to_vec()))));
        }
        let floats = ["sink_k", "sink_v", "tail_k", "tail_v"].map(&mut take_float);
        let [sink_k, sink_v, tail_k, tail_v] = floats;
        let (sink_k, sink_v, tail_k, tail_v) = (sink_k?, sink_v?, tail_k?, tail_v?);
        let len_of = |a: &Option<Array>| a.as_ref().map_or(0, |a| a.shape()[2] as usize);
        let body_k = take_body(&mut cache.body_k, "body_k", arrays, &mut heads, head_dim, float_dtype)?;
        let body_v = take_body(&mut cache.body_v, "body_v", arrays, &mut heads, head_dim, float_dtype)?;
        if let Some(extra) = arrays.keys().next() {
            return Err(KvError::Shape(format!("unexpected tensor '{extra}'")));
        }
        let (n_sink, n_tail) = (len_of(&sink_k), len_of(&tail_k));
        if n_sink != len_of(&sink_v) || n_tail != len_of(&tail_v) || body_k != body_v {
            return Err(KvError::Shape(format!(
                "K and V hold different token counts: sinks {n_sink}/{}, body {body_k}/{body_v}, tail {n_tail}/{}",
                len_of(&sink_v),
                len_of(&tail_v)
            )));
        }
        let sinks = cache.spec.sinks;
        if n_sink > sinks || (n_sink < sinks && body_k + n_tail > 0) {
            return Err(KvError::Shape(format!("{n_sink} sink tokens with {sinks} sinks (--kv-sinks) and {} later tokens", body_k + n_tail)));
        }
        for (store, x) in [(&mut cache.sink_k, &sink_k), (&mut cache.sink_v, &sink_v), (&mut cache.tail_k, &tail_k), (&mut cache.tail_v, &tail_v)] {
            if let Some(x) = x {
                store.restore(x)?;
            }
        }
        // Without a ring the positions are consecutive: sinks, then body, then tail.
        cache.body_pos = (n_sink as i32..(n_sink + body_k) as i32).collect();
        cache.body_head = body_k;
        cache.offset = n_sink + body_k + n_tail;
        if center.is_some() && !cache.centered() {
            return Err(KvError::Shape(format!("'key_center' saved for {}, whose keys are not centered", cache.spec)));
        }
        if center.is_none() && cache.offset > 0 && cache.centered() {
            return Err(KvError::Shape(format!("{} keys are centered, but no 'key_center' was saved", cache.spec)));
        }
        cache.key_center = center;
        Ok(cache)
    }

    pub fn reset(&mut self) {
        let fresh = match &self.body_k {
            Body::Paged(s) => {
                s.truncate_table(0);
                KvCache::new_paged(self.spec.clone(), self.head_dim, s.table().clone(), s.layer())
            }
            _ => KvCache::new(self.spec.clone(), self.head_dim, self.opts),
        };
        *self = fresh.expect("spec was valid at construction");
    }

    /// Every array the cache holds, for `eval`/`async_eval` by the caller.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut all = self.body_k.arrays();
        all.extend(self.body_v.arrays());
        all.extend(self.key_center.as_ref());
        for s in [&self.sink_k, &self.sink_v, &self.tail_k, &self.tail_v] {
            all.extend(s.arrays());
        }
        all
    }

    pub fn eval(&self) -> Result<()> {
        Ok(mlx_rs::transforms::eval(self.arrays())?)
    }

    pub fn bytes(&self) -> CacheBytes {
        let (kp, ks, kf) = self.body_k.bytes();
        let (vp, vs, vf) = self.body_v.bytes();
        CacheBytes {
            k_packed: kp,
            k_scales: ks,
            v_packed: vp,
            v_scales: vs,
            k_float: kf + self.sink_k.resident_bytes() + self.tail_k.resident_bytes(),
            v_float: vf + self.sink_v.resident_bytes() + self.tail_v.resident_bytes(),
        }
    }

    /// Keys in token order (sinks, dequantized body, tail), in the stored (rotated) frame:
    /// for tests and checks, never on the decode path.
    #[doc(hidden)]
    pub fn dequantized_keys(&self) -> Result<Option<Array>> {
        self.dequantized(&self.sink_k, &self.body_k, &self.tail_k)
    }

    /// Values in token order, as [`Self::dequantized_keys`].
    #[doc(hidden)]
    pub fn dequantized_values(&self) -> Result<Option<Array>> {
        self.dequantized(&self.sink_v, &self.body_v, &self.tail_v)
    }

    fn dequantized(&self, sinks: &FloatStore, body: &Body, tail: &FloatStore) -> Result<Option<Array>> {
        let mut parts = Vec::new();
        parts.extend(sinks.view());
        let slots = self.body_pos.len();
        match body {
            Body::Float(s) => parts.extend(s.slots(0, slots)),
            Body::Quant(s) => parts.extend(s.dequantize(0, slots, Dtype::Float32)?),
            Body::Paged(s) => parts.extend(s.slice(0, slots).map(|p| p.dequantize(s.group, s.bits, Dtype::Float32)).transpose()?),
        }
        parts.extend(tail.view());
        let parts: Vec<Array> = parts.into_iter().map(|p| p.as_dtype(Dtype::Float32)).collect::<std::result::Result<_, _>>()?;
        Ok(if parts.is_empty() { None } else { Some(concatenate(&parts, 2)?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A per-channel ring's visible runs (what the CPU decode reads instead of a mask) hold
    /// exactly the window's tokens beside the float tail, none older, across the ring's wrap.
    #[test]
    fn a_rings_visible_runs_hold_exactly_the_window() {
        let (w, d) = (128usize, 64usize);
        let mut channels = KvSpec::bits(4, 4);
        channels.key_layout = KeyLayout::PerChannel;
        channels.k.group = 32;
        for spec in [channels, KvSpec::bits(8, 4)] {
            let name = spec.to_string();
            let mut cache = KvCache::new(spec, d, CacheOptions { max_size: Some(w), max_chunk: 16 }).unwrap();
            let x = Array::zeros::<f32>(&[1, 1, 1, d as i32]).unwrap();
            let (mut checked, mut wrapped) = (0, false);
            for _ in 0..400 {
                cache.update(&x, &x).unwrap();
                let qpos = cache.offset - 1;
                let Some(runs) = cache.visible_body(qpos) else { continue };
                let body: usize = runs.iter().map(|(a, b)| b - a).sum();
                assert_eq!(body + cache.tail_k.len(), w.min(cache.offset), "{name} query at {qpos}: runs {runs:?}");
                for &(a, b) in &runs {
                    assert!((a..b).all(|s| cache.body_pos[s] as usize + w > qpos), "{name} query at {qpos}: run {a}..{b} holds a token outside the window");
                }
                checked += 1;
                wrapped |= runs.len() == 2;
            }
            assert!(checked > 300 && wrapped, "{name}: {checked} queries checked, wrapped: {wrapped}");
        }
    }
}

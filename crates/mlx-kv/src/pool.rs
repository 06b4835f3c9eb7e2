//! One KV memory pool for many sequences, in fixed blocks of [`BLOCK`] tokens (paged KV, as
//! vLLM's paged attention keeps it).
//!
//! A growing per-sequence buffer is re-allocated as it grows and leaves holes of every size
//! behind when sequences end; here every layer's keys and values live in one array per
//! layer and half (`[blocks, Hkv, BLOCK, packed]`), a sequence owns a list of block ids (its
//! [`BlockTable`], shared by all its layers: block `b` is slot `b` of every layer's array), and
//! a finished sequence's blocks go back to a free list that the next sequence takes whole. The
//! batched decode kernels read any number of sequences from the same arrays through a table of
//! block ids, which is what lets one launch per layer serve them all.
//!
//! Blocks of different precisions have different sizes, so each [`BlockFormat`] has its own
//! arena; all arenas draw on one byte budget (`--kv-budget`). Admission reserves a sequence's
//! worst case ([`KvPool::reserve`]) before any work, so a request that would not fit waits or
//! is refused exactly as [`KvPool::blocks_for`] predicts; blocks are then taken as tokens
//! arrive. A block freed by one format is not lent to another (their arrays never shrink).

use crate::error::{KvError, Result};
use crate::spec::{KeyLayout, KvSpec, Rotation};
use crate::store::{Packed, TokenAxis};
use mlx_rs::ops::indexing::{IndexMutOp, IndexOp};
use mlx_rs::ops::{concatenate, zeros_dtype};
use mlx_rs::{Array, Dtype};
use std::sync::{Arc, Mutex, MutexGuard};

/// Tokens per block: large enough that the per-block bookkeeping (a table entry, one kernel
/// work item on the CPU) is negligible, small enough that a sequence wastes at most 255 slots.
pub const BLOCK: usize = 256;

/// One layer's precision in the pool: K and V widths and groups (per-token groups along
/// head_dim, or for per-channel keys groups of `k_group` tokens along each channel) and the
/// Hadamard rotation the decode step applies around its kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerFormat {
    pub k_bits: u8,
    pub k_group: usize,
    pub v_bits: u8,
    pub v_group: usize,
    pub rotation: Rotation,
    /// Keys stored less the sequence's key center ([`KeyLayout::Centered`]); each sequence's
    /// cache keeps its own center, the blocks only codes.
    pub centered: bool,
    /// Keys per channel ([`KeyLayout::PerChannel`]): a block's keys are `[Hkv, D, BLOCK]`
    /// codes, whole groups only; each sequence keeps its unfinished group in float itself.
    pub k_channels: bool,
    /// First tokens kept in float by each sequence (`--kv-sinks`), per-channel keys only: the
    /// sequence keeps them beside its unfinished key group, and the blocks start after them.
    pub sinks: usize,
}

impl LayerFormat {
    /// The format of `spec`'s caches if they can live in the pool: K and V quantized and
    /// nothing kept beside the body (no residual tail, sinks or delayed start) but, with
    /// per-channel keys, the unfinished key group, whose groups must tile a block, and sink
    /// tokens. Other settings keep their own growing buffers.
    pub fn of(spec: &KvSpec) -> Option<LayerFormat> {
        let k_channels = spec.key_layout == KeyLayout::PerChannel;
        let plain = spec.k.is_quantized()
            && spec.v.is_quantized()
            && (!k_channels || BLOCK.is_multiple_of(spec.k.group))
            && spec.residual == 0
            && (spec.sinks == 0 || k_channels)
            && spec.quantized_kv_start == 0;
        plain.then_some(LayerFormat {
            k_bits: spec.k.bits,
            k_group: spec.k.group,
            v_bits: spec.v.bits,
            v_group: spec.v.group,
            rotation: spec.rotation,
            centered: spec.key_layout == KeyLayout::Centered,
            k_channels,
            sinks: spec.sinks,
        })
    }

    /// Bytes of one token of one head: packed codes plus a 16-bit scale and bias per group
    /// (per channel, a group's scale and bias are spread over its `group` tokens: the same sum).
    fn row_bytes(bits: u8, group: usize, head_dim: usize) -> usize {
        head_dim * bits as usize / 8 + 4 * (head_dim / group)
    }

    fn token_bytes(&self, head_dim: usize) -> usize {
        Self::row_bytes(self.k_bits, self.k_group, head_dim) + Self::row_bytes(self.v_bits, self.v_group, head_dim)
    }
}

/// The precision of a block: one [`LayerFormat`] per layer (a uniform preset repeats one; a
/// calibrated recipe gives each layer its own). Sequences of one format share an arena.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockFormat(Arc<[LayerFormat]>);

impl BlockFormat {
    /// Every layer at `spec` ([`LayerFormat::of`]).
    pub fn of(spec: &KvSpec, layers: usize) -> Option<BlockFormat> {
        let f = LayerFormat::of(spec)?;
        Some(BlockFormat(vec![f; layers].into()))
    }

    /// One spec per layer; `None` if any layer cannot live in the pool.
    pub fn of_layers(specs: &[KvSpec]) -> Option<BlockFormat> {
        Some(BlockFormat(specs.iter().map(LayerFormat::of).collect::<Option<Vec<_>>>()?.into()))
    }

    pub fn layer(&self, i: usize) -> LayerFormat {
        self.0[i]
    }

    /// Bytes of one block across every layer, K and V.
    pub fn block_bytes(&self, g: &Geometry) -> usize {
        self.0.iter().map(|f| f.token_bytes(g.head_dim)).sum::<usize>() * g.kv_heads * BLOCK
    }
}

/// The model shape the pool's arrays are made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One layer's keys and values in an arena: `[blocks, Hkv, BLOCK, ...]` each.
struct LayerArrays {
    k: Packed,
    v: Packed,
}

struct Arena {
    fmt: BlockFormat,
    layers: Vec<LayerArrays>,
    capacity: usize,
    free: Vec<u32>,
    /// Blocks promised to admitted sequences and not yet taken.
    promised: usize,
}

struct State {
    geometry: Geometry,
    budget: usize,
    arenas: Vec<Arena>,
    /// The CUDA step's arrival counters ([`PagedStore::counters`]).
    counters: Option<Array>,
}

impl State {
    fn allocated_bytes(&self) -> usize {
        self.arenas.iter().map(|a| a.capacity * a.fmt.block_bytes(&self.geometry)).sum()
    }

    fn arena(&mut self, fmt: BlockFormat) -> usize {
        if let Some(i) = self.arenas.iter().position(|a| a.fmt == fmt) {
            return i;
        }
        assert_eq!(fmt.0.len(), self.geometry.layers, "a block format has one layer format per layer of the pool");
        self.arenas.push(Arena { fmt, layers: Vec::new(), capacity: 0, free: Vec::new(), promised: 0 });
        self.arenas.len() - 1
    }

    /// Free blocks at the top of `arena` beyond its promises: what shrinking it gives back.
    fn spare_tail(&self, arena: usize) -> usize {
        let a = &self.arenas[arena];
        let free: std::collections::HashSet<u32> = a.free.iter().copied().collect();
        let tail = (0..a.capacity as u32).rev().take_while(|id| free.contains(id)).count();
        tail.min(a.free.len().saturating_sub(a.promised))
    }

    /// Bytes other arenas could give back by shrinking ([`Self::shrink_others`]).
    fn reclaimable(&self, except: usize) -> usize {
        (0..self.arenas.len()).filter(|&i| i != except).map(|i| self.spare_tail(i) * self.arenas[i].fmt.block_bytes(&self.geometry)).sum()
    }

    /// Blocks of `arena` that could still be promised: free ones plus what the unallocated
    /// budget (and other formats' spare blocks, once given back) would buy, minus promises
    /// already made.
    fn available(&self, arena: usize) -> usize {
        let a = &self.arenas[arena];
        let room = self.budget.saturating_sub(self.allocated_bytes()) + self.reclaimable(arena);
        (a.free.len() + room / a.fmt.block_bytes(&self.geometry)).saturating_sub(a.promised)
    }

    /// Gives back other arenas' spare top blocks until `bytes` are unallocated: their arrays are
    /// copied into smaller buffers (a slice would keep the old buffer alive).
    fn shrink_others(&mut self, except: usize, bytes: usize) -> Result<()> {
        for i in 0..self.arenas.len() {
            if i == except || self.budget.saturating_sub(self.allocated_bytes()) >= bytes {
                continue;
            }
            let drop = self.spare_tail(i);
            if drop == 0 {
                continue;
            }
            let a = &mut self.arenas[i];
            let keep = a.capacity - drop;
            let cut = |x: &Array| -> Result<Array> {
                let part = x.index((0..keep as i32, .., .., ..));
                Ok(part.add(mlx_rs::ops::zeros_dtype(&[1], x.dtype())?)?)
            };
            for l in &mut a.layers {
                for p in [&mut l.k, &mut l.v] {
                    *p = Packed { w: cut(&p.w)?, scales: cut(&p.scales)?, biases: cut(&p.biases)? };
                }
            }
            mlx_rs::transforms::eval(a.layers.iter().flat_map(|l| [&l.k.w, &l.k.scales, &l.k.biases, &l.v.w, &l.v.scales, &l.v.biases]))?;
            a.free.retain(|&id| (id as usize) < keep);
            a.capacity = keep;
        }
        Ok(())
    }

    /// Grows `arena`'s arrays by at least one block (doubling, within the budget).
    fn grow(&mut self, arena: usize) -> Result<()> {
        let g = self.geometry;
        let block_bytes = self.arenas[arena].fmt.block_bytes(&g);
        if self.budget.saturating_sub(self.allocated_bytes()) < block_bytes {
            self.shrink_others(arena, block_bytes)?;
        }
        let room = self.budget.saturating_sub(self.allocated_bytes()) / block_bytes;
        let a = &mut self.arenas[arena];
        let extra = a.capacity.max(16).min(room);
        if extra == 0 {
            return Err(KvError::Capacity { requested: a.capacity + 1, capacity: a.capacity });
        }
        // MLX's `zeros` is a broadcast of one element; adding a zero gives every array a
        // buffer of its own, which the CUDA step writes into in place.
        let own = |shape: &[i32], dtype: Dtype| -> Result<Array> { Ok(zeros_dtype(shape, dtype)?.add(zeros_dtype(&[1], dtype)?)?) };
        let fresh = |bits: u8, group: usize, channels: bool| -> Result<Packed> {
            let (n, h, d, b) = (extra as i32, g.kv_heads as i32, g.head_dim, BLOCK);
            // Rows of tokens (codes along head_dim) or, per channel, rows of channels.
            let (rows, along) = if channels { (d, b) } else { (b, d) };
            Ok(Packed {
                w: own(&[n, h, rows as i32, (along * bits as usize / 32) as i32], Dtype::Uint32)?,
                scales: own(&[n, h, rows as i32, (along / group) as i32], Dtype::Float16)?,
                biases: own(&[n, h, rows as i32, (along / group) as i32], Dtype::Float16)?,
            })
        };
        let grow = |old: Option<Packed>, new: Packed| -> Result<Packed> {
            Ok(match old {
                None => new,
                Some(o) => Packed {
                    w: concatenate(&[o.w, new.w], 0)?,
                    scales: concatenate(&[o.scales, new.scales], 0)?,
                    biases: concatenate(&[o.biases, new.biases], 0)?,
                },
            })
        };
        let fmt = a.fmt.clone();
        let old = std::mem::take(&mut a.layers);
        let mut layers = Vec::with_capacity(g.layers);
        let mut old = old.into_iter();
        for l in 0..g.layers {
            let prev = old.next();
            let (pk, pv) = match prev {
                Some(l) => (Some(l.k), Some(l.v)),
                None => (None, None),
            };
            let f = fmt.layer(l);
            layers.push(LayerArrays { k: grow(pk, fresh(f.k_bits, f.k_group, f.k_channels)?)?, v: grow(pv, fresh(f.v_bits, f.v_group, false)?)? });
        }
        // Evaluated now: a lazy concatenate would otherwise be re-run inside the next step.
        mlx_rs::transforms::eval(layers.iter().flat_map(|l| [&l.k.w, &l.k.scales, &l.k.biases, &l.v.w, &l.v.scales, &l.v.biases]))?;
        a.layers = layers;
        // Lowest ids first, so sequences fill the front of the arrays.
        a.free.extend((a.capacity as u32..(a.capacity + extra) as u32).rev());
        a.capacity += extra;
        Ok(())
    }
}

/// The pool: shared by every sequence of an engine (cloning shares it).
#[derive(Clone)]
pub struct KvPool(Arc<Mutex<State>>);

/// What [`KvPool::usage`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    pub budget_bytes: usize,
    pub allocated_bytes: usize,
    /// Blocks held by sequences, over all formats.
    pub used_blocks: usize,
    pub free_blocks: usize,
    pub promised_blocks: usize,
}

impl KvPool {
    /// An empty pool for a model of shape `geometry` that never holds more than `budget`
    /// bytes of blocks (`None`: no limit but memory).
    pub fn new(geometry: Geometry, budget: Option<usize>) -> KvPool {
        KvPool(Arc::new(Mutex::new(State { geometry, budget: budget.unwrap_or(usize::MAX), arenas: Vec::new(), counters: None })))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bookkeeping behind, still consistent
        // enough to free blocks: keep going rather than poison every later request.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn geometry(&self) -> Geometry {
        self.lock().geometry
    }

    /// Identity, for grouping sequences of one pool.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    /// Blocks a sequence of `tokens` tokens needs.
    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(BLOCK)
    }

    /// Bytes one block of `fmt` takes across all layers.
    pub fn block_bytes(&self, fmt: &BlockFormat) -> usize {
        fmt.block_bytes(&self.lock().geometry)
    }

    /// Blocks of `fmt` that a new reservation could still get.
    pub fn available(&self, fmt: &BlockFormat) -> usize {
        let mut s = self.lock();
        let i = s.arena(fmt.clone());
        s.available(i)
    }

    /// Allocates arrays for `blocks` blocks of `fmt` now (within the budget), so later growth
    /// never copies them: for a server that knows its format, or a benchmark.
    pub fn preallocate(&self, fmt: &BlockFormat, blocks: usize) -> Result<()> {
        let mut s = self.lock();
        let i = s.arena(fmt.clone());
        while s.arenas[i].capacity < blocks {
            s.grow(i)?;
        }
        Ok(())
    }

    /// Promises `tokens` tokens' worth of blocks of `fmt` to a new sequence, or `None` when
    /// they are not available (the caller waits or refuses).
    pub fn reserve(&self, fmt: &BlockFormat, tokens: usize) -> Option<BlockTable> {
        let need = Self::blocks_for(tokens);
        let mut s = self.lock();
        let i = s.arena(fmt.clone());
        if s.available(i) < need {
            return None;
        }
        s.arenas[i].promised += need;
        Some(BlockTable { pool: self.clone(), arena: i, fmt: fmt.clone(), ids: Vec::new(), promised: need, tokens: 0 })
    }

    pub fn usage(&self) -> PoolUsage {
        let s = self.lock();
        let mut u = PoolUsage { budget_bytes: s.budget, allocated_bytes: s.allocated_bytes(), ..Default::default() };
        for a in &s.arenas {
            u.free_blocks += a.free.len();
            u.used_blocks += a.capacity - a.free.len();
            u.promised_blocks += a.promised;
        }
        u
    }
}

/// A sequence's blocks, in token order, shared by its layers' caches. Dropping it returns the
/// blocks and any unused promise to the pool.
pub struct BlockTable {
    pool: KvPool,
    arena: usize,
    fmt: BlockFormat,
    ids: Vec<u32>,
    promised: usize,
    /// Tokens the table has room for and that a layer asked for ([`Self::ensure`]).
    tokens: usize,
}

impl BlockTable {
    pub fn format(&self) -> &BlockFormat {
        &self.fmt
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Makes room for `tokens` tokens: takes blocks from the promise first, then from the
    /// pool's free blocks if the sequence outgrows what it reserved.
    pub fn ensure(&mut self, tokens: usize) -> Result<()> {
        self.tokens = self.tokens.max(tokens);
        let need = KvPool::blocks_for(tokens);
        if need <= self.ids.len() {
            return Ok(());
        }
        let mut s = self.pool.lock();
        while self.ids.len() < need {
            let from_promise = self.promised > 0;
            if !from_promise && s.available(self.arena) == 0 {
                return Err(KvError::InvalidSpec {
                    flag: "--kv-budget",
                    message: format!("the KV pool has no free block for token {} of this sequence (budget {} bytes)", self.ids.len() * BLOCK + 1, s.budget),
                });
            }
            if s.arenas[self.arena].free.is_empty() {
                s.grow(self.arena)?;
            }
            let id = s.arenas[self.arena].free.pop().expect("grown");
            if from_promise {
                self.promised -= 1;
                s.arenas[self.arena].promised -= 1;
            }
            self.ids.push(id);
        }
        Ok(())
    }

    /// Returns the blocks promised and not taken (a finished request kept for its next turn
    /// holds only what it wrote).
    pub fn release_promise(&mut self) {
        let mut s = self.pool.lock();
        s.arenas[self.arena].promised -= self.promised;
        self.promised = 0;
    }

    /// Promises room for `tokens` tokens in all (a kept conversation's next turn); false when
    /// the pool cannot, and nothing changes.
    pub fn promise(&mut self, tokens: usize) -> bool {
        let want = KvPool::blocks_for(tokens).saturating_sub(self.ids.len() + self.promised);
        if want == 0 {
            return true;
        }
        let mut s = self.pool.lock();
        if s.available(self.arena) < want {
            return false;
        }
        s.arenas[self.arena].promised += want;
        self.promised += want;
        true
    }

    /// Gives back whole blocks past the first `tokens` tokens (a conversation cut back).
    pub fn truncate(&mut self, tokens: usize) {
        let keep = KvPool::blocks_for(tokens);
        if keep < self.ids.len() {
            let mut s = self.pool.lock();
            let freed: Vec<u32> = self.ids.drain(keep..).collect();
            s.arenas[self.arena].free.extend(freed);
        }
        self.tokens = self.tokens.min(tokens);
    }

    /// Row `(block, head, slot)` of token `t` in the flat `[blocks * Hkv * BLOCK, ...]` view.
    pub fn row(&self, t: usize, head: usize, kv_heads: usize) -> i32 {
        ((self.ids[t / BLOCK] as usize * kv_heads + head) * BLOCK + t % BLOCK) as i32
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        let mut s = self.pool.lock();
        let a = &mut s.arenas[self.arena];
        a.promised -= self.promised;
        a.free.append(&mut self.ids);
    }
}

/// The table as the layers of one sequence share it.
pub type SharedTable = Arc<Mutex<BlockTable>>;

/// Which half of a layer's arrays a store writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    K,
    V,
}

/// One layer's K or V of one sequence, stored in the pool's blocks: [`crate::store::QuantStore`]'s
/// role for a pooled cache.
pub struct PagedStore {
    table: SharedTable,
    layer: usize,
    half: Half,
    pub bits: u8,
    pub group: usize,
    /// `Cols` for per-channel keys: written and read in whole groups of `group` tokens.
    pub axis: TokenAxis,
    len: usize,
}

fn table_lock(t: &SharedTable) -> MutexGuard<'_, BlockTable> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

impl PagedStore {
    pub fn new(table: SharedTable, layer: usize, half: Half) -> PagedStore {
        let fmt = table_lock(&table).format().layer(layer);
        let (bits, group) = match half {
            Half::K => (fmt.k_bits, fmt.k_group),
            Half::V => (fmt.v_bits, fmt.v_group),
        };
        let axis = if half == Half::K && fmt.k_channels { TokenAxis::Cols } else { TokenAxis::Rows };
        PagedStore { table, layer, half, bits, group, axis, len: 0 }
    }

    pub fn table(&self) -> &SharedTable {
        &self.table
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `f` on this layer's half of the arena arrays.
    fn with_arrays<R>(&self, f: impl FnOnce(&mut Packed, usize) -> R) -> R {
        let t = table_lock(&self.table);
        let mut s = t.pool.lock();
        let kv_heads = s.geometry.kv_heads;
        let l = &mut s.arenas[t.arena].layers[self.layer];
        f(
            match self.half {
                Half::K => &mut l.k,
                Half::V => &mut l.v,
            },
            kv_heads,
        )
    }

    /// Flat row indices of tokens `[start, end)` for every head, head-major (the order of a
    /// `[1, Hkv, L, ...]` tensor's rows). Per channel a row is one channel's codes of one token
    /// group (see [`Self::unit_cols`]), in the order (head, channel, group) of a packed
    /// `[1, Hkv, D, L...]` tensor.
    fn rows(&self, start: usize, end: usize) -> Array {
        let t = table_lock(&self.table);
        let (h, d) = {
            let s = t.pool.lock();
            (s.geometry.kv_heads, s.geometry.head_dim)
        };
        let rows: Vec<i32> = match self.axis {
            TokenAxis::Rows => (0..h).flat_map(|head| (start..end).map(move |p| (head, p))).map(|(head, p)| t.row(p, head, h)).collect(),
            TokenAxis::Cols => {
                let per = BLOCK / self.group;
                let mut v = Vec::with_capacity(h * d * (end - start) / self.group);
                for head in 0..h {
                    for c in 0..d {
                        for g0 in (start..end).step_by(self.group) {
                            let id = t.ids[g0 / BLOCK] as usize;
                            v.push((((id * h + head) * d + c) * per + g0 % BLOCK / self.group) as i32);
                        }
                    }
                }
                v
            }
        };
        Array::from_slice(&rows, &[rows.len() as i32])
    }

    /// Columns of one row of `a` in the flat view [`Self::rows`] indexes: a token's codes, or
    /// per channel one group's (`a`'s last axis holds a block's BLOCK / group of them).
    fn unit_cols(&self, a: &Array) -> i32 {
        let cols = a.shape()[3];
        match self.axis {
            TokenAxis::Rows => cols,
            TokenAxis::Cols => cols / (BLOCK / self.group) as i32,
        }
    }

    fn check_groups(&self, at: usize, l: usize) -> Result<()> {
        if self.axis == TokenAxis::Cols && !(at.is_multiple_of(self.group) && l.is_multiple_of(self.group)) {
            return Err(KvError::Shape(format!("per-channel keys enter the pool in whole groups of {}: tokens {at}..{}", self.group, at + l)));
        }
        Ok(())
    }

    /// Quantizes `x` (`[1, Hkv, L, D]`) and writes it at token `at` (per channel: whole groups).
    pub fn write(&mut self, at: usize, x: &Array) -> Result<()> {
        let l = x.shape()[2] as usize;
        self.check_groups(at, l)?;
        table_lock(&self.table).ensure(at + l)?;
        let q = match self.axis {
            TokenAxis::Rows => Packed::quantize(x, self.group, self.bits)?,
            TokenAxis::Cols => Packed::quantize(&x.swap_axes(2, 3)?, self.group, self.bits)?,
        };
        self.put(at, l, &q)
    }

    /// Writes `l` packed tokens (`[1, Hkv, L, ...]`, per channel `[1, Hkv, D, ...]`) at token
    /// `at`; room must exist.
    fn put(&mut self, at: usize, l: usize, q: &Packed) -> Result<()> {
        self.put_rows(&self.rows(at, at + l), q)?;
        self.len = self.len.max(at + l);
        Ok(())
    }

    /// Replaces the contents with `len` packed tokens as [`Self::slice`] gives them.
    pub fn restore(&mut self, len: usize, q: &Packed) -> Result<()> {
        self.len = 0;
        self.check_groups(0, len)?;
        if len > 0 {
            table_lock(&self.table).ensure(len)?;
            self.put(0, len, q)?;
        }
        Ok(())
    }

    /// Tokens `[start, end)` gathered from their blocks as `[1, Hkv, L, ...]` (per channel
    /// `[1, Hkv, D, ...]`, whole groups): a copy of the packed rows, never dequantized, for
    /// prefill attention and saving.
    pub fn slice(&self, start: usize, end: usize) -> Option<Packed> {
        if end <= start || self.check_groups(start, end - start).is_err() {
            return None;
        }
        let rows = self.rows(start, end);
        let axis = self.axis;
        let (n, groups) = ((end - start) as i32, ((end - start) / self.group) as i32);
        let unit = |a: &Array| self.unit_cols(a);
        self.with_arrays(|p, h| {
            let d = p.w.shape()[2];
            let take = |a: &Array| -> Option<Array> {
                let cols = unit(a);
                let shape = match axis {
                    TokenAxis::Rows => [1, h as i32, n, cols],
                    TokenAxis::Cols => [1, h as i32, d, groups * cols],
                };
                a.reshape(&[-1, cols]).ok()?.take_axis(&rows, 0).ok()?.reshape(&shape).ok()
            };
            Some(Packed { w: take(&p.w)?, scales: take(&p.scales)?, biases: take(&p.biases)? })
        })
    }

    /// This layer's half of the arena arrays, for kernels that read the blocks through a table.
    pub fn arrays_now(&self) -> Packed {
        self.with_arrays(|p, _| p.clone())
    }

    /// Replaces this layer's half of the arena arrays (after a kernel wrote into them).
    pub fn set_arrays(&self, p: Packed) {
        self.with_arrays(|dst, _| *dst = p)
    }

    /// The fused CUDA step's 1024 arrival counters, zero between launches (each launch resets
    /// what it used), made once per pool as a device buffer of its own: an add of a host array,
    /// since MLX's `zeros` is a broadcast that a kernel would get as a copy.
    pub fn counters(&self) -> Result<Array> {
        let t = table_lock(&self.table);
        let mut s = t.pool.lock();
        if s.counters.is_none() {
            let c = Array::from_slice(&[0i32; 1024], &[1024]).add(Array::from_int(0))?;
            c.eval()?;
            s.counters = Some(c);
        }
        Ok(s.counters.clone().expect("made above"))
    }

    /// Records tokens up to `len` as written by a kernel.
    pub fn set_written(&mut self, len: usize) {
        self.len = self.len.max(len);
    }

    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Gives the sequence's blocks past `tokens` back to the pool (all layers share them).
    pub fn truncate_table(&self, tokens: usize) {
        table_lock(&self.table).truncate(tokens);
    }

    /// Writes packed rows at flat rows `rows` of this layer's half (rows of the group-row view
    /// per channel, see [`Self::rows`]): a write's scatter, and the batched step's one scatter
    /// for every sequence's new token.
    pub fn put_rows(&self, rows: &Array, q: &Packed) -> Result<()> {
        let unit = |a: &Array| self.unit_cols(a);
        self.with_arrays(|p, _| -> Result<()> {
            for (dst, src) in [(&mut p.w, &q.w), (&mut p.scales, &q.scales), (&mut p.biases, &q.biases)] {
                let sh = dst.shape().to_vec();
                let cols = unit(dst);
                // Scattered into a flat view and reshaped back: MLX writes in place when the
                // pool holds the only reference, which it does between steps.
                let mut flat = dst.reshape(&[-1, cols])?;
                flat.index_mut(rows.clone(), &src.reshape(&[-1, cols])?);
                *dst = flat.reshape(&sh)?;
            }
            Ok(())
        })
    }

    /// Bytes of the blocks this store's tokens occupy (packed, scales + biases).
    pub fn resident_bytes(&self) -> (usize, usize) {
        let t = table_lock(&self.table);
        let h = t.pool.lock().geometry.kv_heads;
        let d = t.pool.lock().geometry.head_dim;
        let slots = KvPool::blocks_for(self.len) * BLOCK * h;
        (slots * d * self.bits as usize / 8, slots * 4 * (d / self.group))
    }
}

/// `[S, 1 + max_blocks]` int32 for the paged kernels: each row the tokens sequence `s` will hold
/// (`lens[s]`), then its block ids (zero-padded).
pub fn table_array(tables: &[&BlockTable], lens: &[usize]) -> Array {
    let width = 1 + tables.iter().map(|t| t.ids().len()).max().unwrap_or(0);
    let mut v = vec![0i32; tables.len() * width];
    for (s, t) in tables.iter().enumerate() {
        v[s * width] = lens[s] as i32;
        for (j, &id) in t.ids().iter().enumerate() {
            v[s * width + 1 + j] = id as i32;
        }
    }
    Array::from_slice(&v, &[tables.len() as i32, width as i32])
}

/// Reads an arena's arrays for tests and the GPU check.
pub fn layer_rows(p: &Packed, rows: &Array) -> Result<Packed> {
    let take = |a: &Array| -> Result<Array> {
        let cols = a.shape()[3];
        Ok(a.reshape(&[-1, cols])?.take_axis(rows, 0)?)
    };
    Ok(Packed { w: take(&p.w)?, scales: take(&p.scales)?, biases: take(&p.biases)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::ops::indexing::IndexOp;

    fn geometry() -> Geometry {
        Geometry { layers: 2, kv_heads: 2, head_dim: 64 }
    }

    fn k8v4() -> BlockFormat {
        BlockFormat::of(&KvSpec::bits(8, 4), 2).expect("k8v4 pages")
    }

    #[test]
    fn block_bytes_follow_the_bits_and_groups() {
        let f = k8v4();
        // K: 64 bytes + 4 bytes of scale/bias per group of 64; V: 32 + 4. Per head, layer, token.
        assert_eq!(f.block_bytes(&geometry()), (68 + 36) * 2 * BLOCK * 2);
        // A recipe's layers add up their own widths: layer 0 k8v4, layer 1 k4v2 at group 32.
        let mut b = KvSpec::bits(4, 2);
        b.v.group = 32;
        let mixed = BlockFormat::of_layers(&[KvSpec::bits(8, 4), b]).unwrap();
        assert_eq!(mixed.block_bytes(&geometry()), (68 + 36 + 36 + 24) * 2 * BLOCK);
        let mut rotated = KvSpec::bits(8, 4);
        rotated.rotation = Rotation::KeysAndValues;
        assert_eq!(BlockFormat::of(&rotated, 2).unwrap().layer(1).rotation, Rotation::KeysAndValues);
        // Per-channel keys: a group's scale and bias spread over its tokens, the same bytes.
        let mut pc = KvSpec::bits(4, 4);
        pc.key_layout = KeyLayout::PerChannel;
        let f = BlockFormat::of_layers(&[KvSpec::bits(8, 4), pc.clone()]).expect("per-channel groups of 64 tile a block");
        assert!(f.layer(1).k_channels && !f.layer(0).k_channels);
        assert_eq!(f.block_bytes(&geometry()), (68 + 36 + 36 + 36) * 2 * BLOCK);
        pc.k.group = 96;
        assert!(LayerFormat::of(&pc).is_none(), "groups of 96 tokens do not tile a 256-token block");
    }

    #[test]
    fn per_channel_keys_land_in_whole_groups_and_read_back() {
        let g = geometry();
        let pool = KvPool::new(g, None);
        let mut pc = KvSpec::bits(4, 4);
        pc.key_layout = KeyLayout::PerChannel;
        let fmt = BlockFormat::of(&pc, 2).unwrap();
        // Another sequence first, so this one's blocks are not the arena's first.
        let other = Arc::new(Mutex::new(pool.reserve(&fmt, 256).unwrap()));
        other.lock().unwrap().ensure(256).unwrap();
        let t = Arc::new(Mutex::new(pool.reserve(&fmt, 384).unwrap()));
        let mut st = PagedStore::new(t.clone(), 1, Half::K);
        assert_eq!(st.axis, TokenAxis::Cols);
        let x = mlx_rs::random::normal::<f32>(&[1, 2, 384, 64], None, None, None).unwrap();
        // 192 then 192 tokens: the second write starts inside block 0 and ends in block 1.
        st.write(0, &x.index((.., .., 0..192, ..))).unwrap();
        st.write(192, &x.index((.., .., 192.., ..))).unwrap();
        assert!(st.write(384, &x.index((.., .., 0..10, ..))).is_err(), "a partial group never enters the blocks");
        let got = st.slice(0, 384).unwrap().dequantize(64, 4, Dtype::Float32).unwrap();
        let want = Packed::quantize(&x.swap_axes(2, 3).unwrap(), 64, 4).unwrap().dequantize(64, 4, Dtype::Float32).unwrap();
        let diff = (got - want).abs().unwrap().max(None).unwrap().item_cast::<f32>();
        assert_eq!(diff, 0.0, "the pooled codes must be the per-channel codes exactly");
        let mid = st.slice(128, 320).unwrap().dequantize(64, 4, Dtype::Float32).unwrap();
        assert_eq!(mid.shape(), &[1, 2, 64, 192]);
    }

    #[test]
    fn reservations_stop_exactly_at_the_budget_and_blocks_return_on_drop() {
        let g = geometry();
        let per = k8v4().block_bytes(&g);
        let pool = KvPool::new(g, Some(per * 5));
        let a = pool.reserve(&k8v4(), 3 * BLOCK).expect("3 of 5 blocks");
        assert!(pool.reserve(&k8v4(), 2 * BLOCK + 1).is_none(), "3 more blocks must not fit in the 2 left");
        let b = pool.reserve(&k8v4(), 2 * BLOCK).expect("the last 2");
        assert_eq!(pool.available(&k8v4()), 0);
        drop(a);
        assert_eq!(pool.available(&k8v4()), 3);
        drop(b);
        assert_eq!(pool.usage().promised_blocks, 0);
    }

    #[test]
    fn a_format_takes_the_spare_blocks_another_format_no_longer_uses() {
        let g = geometry();
        let k4v4 = BlockFormat::of(&KvSpec::bits(4, 4), 2).unwrap();
        let (a8, a4) = (k8v4().block_bytes(&g), k4v4.block_bytes(&g));
        let pool = KvPool::new(g, Some(a8 * 20));
        // k8v4 grows first and takes the whole budget (16 blocks, then the 4 left).
        let t = pool.reserve(&k8v4(), 17 * BLOCK).unwrap();
        let mut t = t;
        t.ensure(17 * BLOCK).unwrap();
        assert_eq!(pool.usage().allocated_bytes, 20 * a8);
        drop(t);
        // Every k8v4 block is free again: k4v4 may have what the budget buys once they go.
        let want = 20 * a8 / a4;
        assert_eq!(pool.available(&k4v4), want);
        let mut u = pool.reserve(&k4v4, want * BLOCK).expect("the k8v4 arena gives its blocks back");
        u.ensure(want * BLOCK).unwrap();
        assert!(pool.usage().allocated_bytes <= 20 * a8, "never past the budget");
    }

    #[test]
    fn writes_land_in_the_sequences_own_blocks_and_read_back() {
        let g = geometry();
        let pool = KvPool::new(g, None);
        let mut tables: Vec<SharedTable> = Vec::new();
        let mut stores = Vec::new();
        let mut inputs = Vec::new();
        for (i, n) in [300usize, 5].into_iter().enumerate() {
            let t = Arc::new(Mutex::new(pool.reserve(&k8v4(), n).unwrap()));
            let mut st = PagedStore::new(t.clone(), 1, Half::V);
            let x = mlx_rs::random::normal::<f32>(&[1, 2, n as i32, 64], None, None, None).unwrap();
            // Written in two pieces that cross a block edge for the first sequence.
            let cut = if i == 0 { 257 } else { 2 };
            st.write(0, &x.index((.., .., 0..cut, ..))).unwrap();
            st.write(cut as usize, &x.index((.., .., cut.., ..))).unwrap();
            tables.push(t);
            stores.push(st);
            inputs.push(x);
        }
        assert_eq!(table_lock(&tables[0]).ids().len(), 2);
        for (st, x) in stores.iter().zip(&inputs) {
            let n = st.len();
            let (g, b) = (st.group, st.bits);
            let got = st.slice(0, n).unwrap().dequantize(g, b, Dtype::Float32).unwrap();
            let want = Packed::quantize(x, g, b).unwrap().dequantize(g, b, Dtype::Float32).unwrap();
            let diff = (got - want).abs().unwrap().max(None).unwrap().item_cast::<f32>();
            assert_eq!(diff, 0.0, "the pooled rows must be the quantized rows exactly");
        }
        drop(stores);
        drop(tables);
        assert_eq!(pool.usage().used_blocks, 0);
    }
}

//! Token-axis storage for one of K or V: a float buffer, or a packed quantized triplet.
//!
//! Both grow in steps of [`STEP`] tokens and are written by slice. Growing on every token
//! would concatenate (copy) the whole cache each step; a step of 256 bounds the copies to one per
//! 256 tokens while wasting at most 255 slots.

use crate::error::Result;
use mlx_rs::ops::indexing::{IndexMutOp, IndexOp};
use mlx_rs::ops::{concatenate, dequantize, quantize, zeros_dtype};
use mlx_rs::{Array, Dtype};

pub const STEP: usize = 256;

fn round_up(n: usize, step: usize) -> usize {
    n.div_ceil(step) * step
}

fn nbytes(a: &Option<Array>) -> usize {
    a.as_ref().map_or(0, |a| a.nbytes())
}

/// Float tokens, `[B, H, cap, D]`; slots `[head, end)` are valid.
///
/// `head` lets the residual tail drop its oldest tokens without copying on every step; the
/// buffer is compacted once `head` passes a whole [`STEP`].
#[derive(Default)]
pub struct FloatStore {
    data: Option<Array>,
    head: usize,
    end: usize,
    /// Growth step in tokens; 0 means [`STEP`].
    step: usize,
    /// Stores float32 input at this narrower dtype; reads give float32 back.
    store_as: Option<Dtype>,
    narrowed: bool,
}

impl FloatStore {
    /// A store that grows in steps of `step` tokens and keeps float32 tokens as `dtype` (16-bit),
    /// for a tail whose tokens will be quantized anyway: half the bytes, and a rounding (2^-11
    /// relative for f16) far below any code's step. Reads widen back, so callers see the dtype
    /// they wrote.
    pub fn narrowed(step: usize, dtype: Dtype) -> Self {
        FloatStore { step, store_as: Some(dtype), ..Default::default() }
    }

    /// A store that grows in steps of `step` tokens and keeps tokens as written.
    pub fn with_step(step: usize) -> Self {
        FloatStore { step, ..Default::default() }
    }

    fn step(&self) -> usize {
        if self.step == 0 { STEP } else { self.step }
    }

    pub fn len(&self) -> usize {
        self.end - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.head
    }

    /// Writes `x` (`[B, H, L, D]`) at raw slot `at` (ring users pass slots; appends pass `end`).
    pub fn write(&mut self, at: usize, x: &Array) -> Result<()> {
        let x = &self.as_stored(x)?;
        let l = x.shape()[2] as usize;
        let need = at + l;
        self.grow_to(need, x)?;
        let data = self.data.as_mut().unwrap();
        data.index_mut((.., .., at as i32..need as i32, ..), x);
        if at == 0 && need == data.shape()[2] as usize {
            // A write over the whole buffer is `x` itself in MLX, maybe a strided slice of
            // a prompt chunk (a sink token always is): kept as a view, every CUDA launch that
            // reads it would copy it first (60 copies a decode step on SmolLM2's recipe).
            *data = mlx_ext::graph::contiguous(data)?;
        }
        self.end = self.end.max(need);
        Ok(())
    }

    /// `x` as this store keeps it: float32 narrowed to `store_as` where the store narrows.
    fn as_stored(&mut self, x: &Array) -> Result<Array> {
        match self.store_as {
            Some(d) if x.dtype() == Dtype::Float32 => {
                self.narrowed = true;
                Ok(x.as_dtype(d)?)
            }
            _ => Ok(x.clone()),
        }
    }

    /// Grows the buffer to at least `need` slots (a whole number of steps) for tokens shaped
    /// and typed like `x` as stored.
    fn grow_to(&mut self, need: usize, x: &Array) -> Result<()> {
        let cap = self.data.as_ref().map_or(0, |d| d.shape()[2] as usize);
        if need > cap {
            let sh = x.shape();
            let grow = round_up(need, self.step()) - cap;
            let fresh = zeros_dtype(&[sh[0], sh[1], grow as i32, sh[3]], x.dtype())?;
            self.data = Some(match self.data.take() {
                Some(old) => concatenate(&[old, fresh], 2)?,
                None => fresh,
            });
        }
        Ok(())
    }

    /// Room for `need` valid tokens like `x` (`[B, H, 1, D]`) without writing any, for a
    /// kernel that writes tokens in place ([`Self::room_for_one`]): a per-channel tail takes its
    /// whole group at once in decode, where growing a step at a time would send each growing
    /// token through MLX ops instead of the kernel.
    pub(crate) fn reserve(&mut self, need: usize, x: &Array) -> Result<()> {
        if self.head != 0 {
            return Ok(());
        }
        let x = self.as_stored(x)?;
        self.grow_to(need, &x)
    }

    pub fn append(&mut self, x: &Array) -> Result<()> {
        self.write(self.end, x)
    }

    /// Replaces the contents with `x` (`[B, H, L, D]`), allocated as appending it would.
    pub fn restore(&mut self, x: &Array) -> Result<()> {
        self.clear();
        self.append(x)
    }

    /// Raw slots `[start, end)` of the buffer.
    pub fn slots(&self, start: usize, end: usize) -> Option<Array> {
        let d = self.data.as_ref()?;
        // The whole buffer (a sink store, sized to its tokens) is passed as itself: a slice,
        // even of every slot, reaches a CUDA kernel as one more copy op per layer and step.
        if start == 0 && end == d.shape()[2] as usize && end > 0 && !self.narrowed {
            return Some(d.clone());
        }
        let widen = |a: Array| if self.narrowed { a.as_dtype(Dtype::Float32).unwrap_or(a) } else { a };
        (end > start).then(|| widen(d.index((.., .., start as i32..end as i32, ..))))
    }

    /// Raw slots `[start, end)` as stored (16-bit where the store narrows), for readers that
    /// widen as they go: the decode primitive and the CPU attention blocks.
    pub(crate) fn stored_slots(&self, start: usize, end: usize) -> Option<Array> {
        let d = self.data.as_ref()?;
        (end > start).then(|| d.index((.., .., start as i32..end as i32, ..)))
    }

    /// Valid tokens `[start, end)`, counted from the oldest valid token.
    pub fn slice(&self, start: usize, end: usize) -> Option<Array> {
        self.slots(self.head + start, self.head + end)
    }

    pub fn view(&self) -> Option<Array> {
        self.slots(self.head, self.end)
    }

    /// The whole buffer (`[B, H, cap, D]`, row-contiguous) when a kernel may write the next
    /// token into it in place (fused.rs `step_channels`): valid slots start at 0, there is room
    /// for one more, and a token of dtype `x` is stored as the buffer's dtype without widening
    /// changes (same dtype, or float32 into a store already narrowed).
    pub(crate) fn room_for_one(&self, x: Dtype) -> Option<&Array> {
        let d = self.data.as_ref()?;
        let same = d.dtype() == x || (x == Dtype::Float32 && self.narrowed && self.store_as == Some(d.dtype()));
        (self.head == 0 && self.end < d.shape()[2] as usize && same).then_some(d)
    }

    /// Swaps in a buffer that shares the current one's memory (same shape), such as
    /// [`mlx_ext::graph::depends`] gives after an op wrote into it in place, so that later
    /// readers and writers of this store come after that op in the graph.
    pub(crate) fn share_data(&mut self, d: Array) {
        debug_assert!(self.data.as_ref().is_some_and(|o| o.shape() == d.shape() && o.dtype() == d.dtype()));
        self.data = Some(d);
    }

    /// Counts the token a kernel wrote at slot `end` (after [`Self::room_for_one`]).
    pub(crate) fn wrote_one(&mut self) {
        self.end += 1;
    }

    /// Drops the oldest `n` valid tokens.
    pub fn drop_front(&mut self, n: usize) -> Result<()> {
        self.head = (self.head + n).min(self.end);
        if self.head == self.end {
            // Keep the buffer: the next append reuses it from slot 0.
            self.head = 0;
            self.end = 0;
        } else if self.head >= self.step() {
            let rest = self.view();
            self.clear();
            if let Some(rest) = rest {
                self.append(&rest)?;
            }
        }
        Ok(())
    }

    /// Keeps the oldest `len` valid tokens.
    pub fn truncate(&mut self, len: usize) {
        self.end = self.end.min(self.head + len);
    }

    pub fn clear(&mut self) {
        self.data = None;
        self.head = 0;
        self.end = 0;
    }

    pub fn resident_bytes(&self) -> usize {
        nbytes(&self.data)
    }

    pub fn arrays(&self) -> Vec<&Array> {
        self.data.iter().collect()
    }
}

/// One packed quantized tensor: data `u32`, scales and biases as 16-bit floats.
#[derive(Clone)]
pub struct Packed {
    pub w: Array,
    pub scales: Array,
    pub biases: Array,
}

impl Packed {
    /// Quantizes along the last axis. MLX's CUDA `quantize` is wrong on transposed views, so
    /// callers pass row-major data and we make sure it is contiguous.
    pub fn quantize(x: &Array, group: usize, bits: u8) -> Result<Packed> {
        let x = x.contiguous()?;
        let (w, scales, biases) = quantize(&x, group as i32, bits as i32)?;
        Ok(Packed {
            w,
            scales: scales.as_dtype(Dtype::Float16)?,
            biases: biases.as_dtype(Dtype::Float16)?,
        })
    }

    pub fn dequantize(&self, group: usize, bits: u8, dtype: Dtype) -> Result<Array> {
        let s = self.scales.as_dtype(dtype)?;
        let b = self.biases.as_dtype(dtype)?;
        Ok(dequantize(&self.w, &s, &b, group as i32, bits as i32)?)
    }
}

/// Which axis of a `[B, H, a, b]` layout holds tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAxis {
    /// `[B, H, T, D/el]`: groups along head_dim (per-token scales).
    Rows,
    /// `[B, H, D, T/el]`: groups along tokens (per-channel scales); writes are whole groups.
    Cols,
}

/// Packed quantized tokens with capacity in steps; `len` tokens are valid.
pub struct QuantStore {
    pub bits: u8,
    pub group: usize,
    pub axis: TokenAxis,
    packed: Option<Packed>,
    len: usize,
}

impl QuantStore {
    pub fn new(bits: u8, group: usize, axis: TokenAxis) -> Self {
        QuantStore { bits, group, axis, packed: None, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Columns of a packed row holding `tokens` tokens along the last axis.
    fn packed_cols(&self, tokens: usize) -> usize {
        tokens * self.bits as usize / 32
    }

    fn cap(&self) -> usize {
        let Some(p) = &self.packed else { return 0 };
        match self.axis {
            TokenAxis::Rows => p.w.shape()[2] as usize,
            TokenAxis::Cols => p.scales.shape()[3] as usize * self.group,
        }
    }

    /// Quantizes `x` (`[B, H, L, D]`) and writes it at token slot `at`.
    pub fn write(&mut self, at: usize, x: &Array) -> Result<()> {
        let l = x.shape()[2] as usize;
        let (g, bits) = (self.group, self.bits);
        let q = match self.axis {
            TokenAxis::Rows => Packed::quantize(x, g, bits)?,
            // Transposed in the graph, then made contiguous inside `quantize` (see there).
            TokenAxis::Cols => Packed::quantize(&x.swap_axes(2, 3)?, g, bits)?,
        };
        self.put(at, l, &q)
    }

    /// Replaces the contents with `len` packed tokens as [`Self::slice`] gave them, allocated
    /// in steps as writing them would, so the buffers a kernel sees have the same capacity.
    pub fn restore(&mut self, len: usize, q: &Packed) -> Result<()> {
        self.clear();
        if len > 0 {
            self.put(0, len, q)?;
        }
        Ok(())
    }

    /// Writes the `l` packed tokens `q` at token slot `at`.
    fn put(&mut self, at: usize, l: usize, q: &Packed) -> Result<()> {
        let (g, bits) = (self.group, self.bits);
        let need = at + l;
        if need > self.cap() {
            self.grow(round_up(need, STEP), q.w.shape(), q.scales.shape())?;
        }
        let p = self.packed.as_mut().unwrap();
        let (a, b) = (at as i32, need as i32);
        match self.axis {
            TokenAxis::Rows => {
                p.w.index_mut((.., .., a..b, ..), &q.w);
                p.scales.index_mut((.., .., a..b, ..), &q.scales);
                p.biases.index_mut((.., .., a..b, ..), &q.biases);
            }
            TokenAxis::Cols => {
                let (wa, wb) = ((at * bits as usize / 32) as i32, (need * bits as usize / 32) as i32);
                let (ga, gb) = ((at / g) as i32, (need / g) as i32);
                p.w.index_mut((.., .., .., wa..wb), &q.w);
                p.scales.index_mut((.., .., .., ga..gb), &q.scales);
                p.biases.index_mut((.., .., .., ga..gb), &q.biases);
            }
        }
        self.len = self.len.max(need);
        Ok(())
    }

    pub fn append(&mut self, x: &Array) -> Result<()> {
        self.write(self.len, x)
    }

    /// Makes room for `need` tokens of `[B, H, D]` rows without writing them, for a kernel that
    /// quantizes and writes tokens itself ([`crate::attention::fused::decode_step`]); row layout only.
    /// Mark them written with [`Self::set_written`].
    pub fn reserve_rows(&mut self, need: usize, b: i32, h: i32, d: usize) -> Result<()> {
        debug_assert_eq!(self.axis, TokenAxis::Rows);
        if need > self.cap() {
            let cols = (d * self.bits as usize / 32) as i32;
            let groups = (d / self.group) as i32;
            self.grow(round_up(need, STEP), &[b, h, 1, cols], &[b, h, 1, groups])?;
        }
        Ok(())
    }

    /// Swaps in buffers that share the current ones' memory (same shapes), such as
    /// [`mlx_ext::graph::depends`] gives after an op wrote into them in place, so that later
    /// readers and writers of this store come after that op in the graph.
    pub(crate) fn share_buffers(&mut self, p: Packed) {
        debug_assert!(self.packed.as_ref().is_some_and(|q| q.w.shape() == p.w.shape() && q.scales.shape() == p.scales.shape()));
        self.packed = Some(p);
    }

    /// Records that tokens up to `len` were written outside [`Self::write`].
    pub fn set_written(&mut self, len: usize) {
        debug_assert!(len <= self.cap());
        self.len = self.len.max(len);
    }

    /// Grows to `new_cap` tokens; `ws`/`ss` are the shapes of a packed/scales write (only
    /// their batch, head and non-token axes are used).
    fn grow(&mut self, new_cap: usize, ws: &[i32], ss: &[i32]) -> Result<()> {
        let old_cap = self.cap();
        let extra = new_cap - old_cap;
        let (w_shape, s_shape, axis) = match self.axis {
            TokenAxis::Rows => ([ws[0], ws[1], extra as i32, ws[3]], [ss[0], ss[1], extra as i32, ss[3]], 2),
            TokenAxis::Cols => (
                [ws[0], ws[1], ws[2], self.packed_cols(extra) as i32],
                [ss[0], ss[1], ss[2], (extra / self.group) as i32],
                3,
            ),
        };
        let fresh = Packed {
            w: zeros_dtype(&w_shape, Dtype::Uint32)?,
            scales: zeros_dtype(&s_shape, Dtype::Float16)?,
            biases: zeros_dtype(&s_shape, Dtype::Float16)?,
        };
        self.packed = Some(match self.packed.take() {
            None => fresh,
            Some(old) => Packed {
                w: concatenate(&[old.w, fresh.w], axis)?,
                scales: concatenate(&[old.scales, fresh.scales], axis)?,
                biases: concatenate(&[old.biases, fresh.biases], axis)?,
            },
        });
        Ok(())
    }

    /// The packed tokens `[start, end)`; with `Cols` both must be multiples of the group.
    pub fn slice(&self, start: usize, end: usize) -> Option<Packed> {
        let p = self.packed.as_ref()?;
        if end <= start {
            return None;
        }
        let (a, b) = (start as i32, end as i32);
        Some(match self.axis {
            TokenAxis::Rows => Packed {
                w: p.w.index((.., .., a..b, ..)),
                scales: p.scales.index((.., .., a..b, ..)),
                biases: p.biases.index((.., .., a..b, ..)),
            },
            TokenAxis::Cols => {
                let (wa, wb) = (self.packed_cols(start) as i32, self.packed_cols(end) as i32);
                let g = self.group;
                let (ga, gb) = ((start / g) as i32, (end / g) as i32);
                Packed {
                    w: p.w.index((.., .., .., wa..wb)),
                    scales: p.scales.index((.., .., .., ga..gb)),
                    biases: p.biases.index((.., .., .., ga..gb)),
                }
            }
        })
    }

    /// The whole allocated buffers and their token capacity (for kernels that index rows
    /// themselves; with `Cols` a row is one channel of every token).
    pub fn full(&self) -> Option<(Packed, usize)> {
        self.packed.as_ref().map(|p| (p.clone(), self.cap()))
    }

    /// Dequantized tokens `[start, end)` as `[B, H, L, D]` — one block at a time, never the
    /// whole window (prefill attention and tests use this).
    pub fn dequantize(&self, start: usize, end: usize, dtype: Dtype) -> Result<Option<Array>> {
        let Some(p) = self.slice(start, end) else { return Ok(None) };
        let x = p.dequantize(self.group, self.bits, dtype)?;
        Ok(Some(match self.axis {
            TokenAxis::Rows => x,
            TokenAxis::Cols => x.swap_axes(2, 3)?,
        }))
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        self.packed = None;
        self.len = 0;
    }

    pub fn arrays(&self) -> Vec<&Array> {
        self.packed.iter().flat_map(|p| [&p.w, &p.scales, &p.biases]).collect()
    }

    /// (packed data bytes, scale + bias bytes) actually allocated.
    pub fn resident_bytes(&self) -> (usize, usize) {
        self.packed
            .as_ref()
            .map_or((0, 0), |p| (p.w.nbytes(), p.scales.nbytes() + p.biases.nbytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_sliced_from_a_prompt_chunk_is_stored_contiguous() {
        // The first token of a chunk: a strided view (head stride 32 * 8, not 8).
        let chunk = mlx_rs::random::normal::<f32>(&[1, 3, 32, 8], None, None, None).unwrap().as_dtype(Dtype::Float16).unwrap();
        let first = chunk.index((.., .., 0..1, ..));
        let mut sink = FloatStore::with_step(1);
        sink.append(&first).unwrap();
        let v = sink.view().expect("one token");
        v.eval().unwrap();
        assert!(mlx_ext::graph::is_row_contiguous(&v), "a CUDA kernel would copy this buffer at every launch");
        assert_eq!(v.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>(), first.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>());
        first.eval().unwrap();
        assert!(!mlx_ext::graph::is_row_contiguous(&first), "the test's input must be a strided view");
    }

    #[test]
    fn a_kernel_may_write_the_next_token_only_into_room_from_slot_zero() {
        let mut t = FloatStore::narrowed(16, Dtype::Float16);
        assert!(t.room_for_one(Dtype::Float16).is_none(), "no buffer yet");
        t.append(&zeros_dtype(&[1, 2, 3, 8], Dtype::Float16).unwrap()).unwrap();
        let buf = t.room_for_one(Dtype::Float16).expect("16 slots, 3 used");
        assert_eq!(buf.shape(), [1, 2, 16, 8]);
        assert!(t.room_for_one(Dtype::Bfloat16).is_none() && t.room_for_one(Dtype::Float32).is_none(), "dtypes must match");
        t.wrote_one();
        assert_eq!(t.len(), 4);
        t.drop_front(1).unwrap();
        assert!(t.room_for_one(Dtype::Float16).is_none(), "valid slots must start at 0");
        t.drop_front(3).unwrap();
        assert!(t.room_for_one(Dtype::Float16).is_some(), "an emptied tail keeps its buffer");
        let mut full = FloatStore::narrowed(16, Dtype::Float16);
        full.append(&zeros_dtype(&[1, 1, 16, 8], Dtype::Float16).unwrap()).unwrap();
        assert!(full.room_for_one(Dtype::Float16).is_none(), "a full buffer grows through MLX ops");
    }

    #[test]
    fn a_reserved_tail_keeps_its_tokens_and_takes_float32_narrowed() {
        let tok = |v: f32| Array::full::<f32>(&[1, 2, 1, 8], Array::from_f32(v)).unwrap();
        let mut t = FloatStore::narrowed(16, Dtype::Float16);
        t.reserve(40, &tok(0.0)).unwrap();
        assert_eq!(t.len(), 0, "reserving writes no token");
        let buf = t.room_for_one(Dtype::Float32).expect("float32 tokens go in narrowed");
        assert_eq!((buf.shape(), buf.dtype()), ([1, 2, 48, 8].as_slice(), Dtype::Float16), "whole steps of 16");
        t.append(&tok(1.5)).unwrap();
        t.append(&tok(-2.0)).unwrap();
        t.reserve(64, &tok(0.0)).unwrap();
        assert_eq!(t.room_for_one(Dtype::Float32).unwrap().shape()[2], 64);
        let kept: Vec<f32> = t.view().unwrap().index((0, 1, .., 0)).as_slice::<f32>().to_vec();
        assert_eq!(kept, [1.5, -2.0], "growing keeps the tokens, read back as float32");
        t.drop_front(1).unwrap();
        t.reserve(80, &tok(0.0)).unwrap();
        assert_eq!(t.room_for_one(Dtype::Float32).map(|b| b.shape()[2]), None, "a tail not starting at slot 0 is left alone");
    }
}

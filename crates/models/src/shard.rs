//! Tensor parallelism over MLX's distributed group, as mlx-lm's `shard()` splits a model: the
//! q/k/v and gate/up projections by output rows (each rank computes its own attention heads and
//! its slice of the MLP's hidden units), o and down by input columns, each followed by one
//! `all_sum`. Every rank holds its own KV heads in its own cache at the same `KvSpec`, so the
//! group's cache capacity grows with its size. Embeddings, norms and the output head are
//! replicated: every rank computes the same logits and samples the same token.
//!
//! A process belongs to at most one group, so the group is installed once per process by the
//! front end ([`install`]) and read where a family builds and runs ([`current`]).

use crate::error::{ModelError, Result};
use crate::weights::Weight;
use mlx_ext::distributed::Group;
use mlx_ext::microscaled::MxFormat;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::Array;
use std::ops::Range;
use std::sync::OnceLock;

/// This process's place in a tensor-parallel group.
pub struct Shard {
    group: Group,
}

static SHARD: OnceLock<Shard> = OnceLock::new();

/// Makes `group` the process's tensor-parallel group; models built afterwards are sharded over
/// it. A group of one changes nothing. Installing twice is an error.
pub fn install(group: Group) -> Result<&'static Shard> {
    SHARD.set(Shard { group }).map_err(|_| ModelError::Invalid { flag: "--distributed", message: "the distributed group is already set for this process".into() })?;
    Ok(SHARD.get().expect("just set"))
}

/// The installed group, when it has more than one process.
pub fn current() -> Option<&'static Shard> {
    SHARD.get().filter(|s| s.size() > 1)
}

/// `y` summed over the group: the partial products of a row-parallel layer. Without a group,
/// `y` itself.
pub fn reduce(y: Array) -> Result<Array> {
    match current() {
        Some(s) => Ok(s.group.all_sum(&y)?),
        None => Ok(y),
    }
}

impl Shard {
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// This rank's part of `n` units (heads, hidden units); fails naming `what` and the numbers
    /// when `n` does not divide evenly.
    pub fn part(&self, what: &str, n: usize) -> Result<Range<usize>> {
        let size = self.size();
        if !n.is_multiple_of(size) {
            return Err(ModelError::Invalid {
                flag: "--distributed",
                message: format!("tensor parallelism over {size} processes needs {what} divisible by {size}; this model has {n}"),
            });
        }
        let per = n / size;
        Ok(self.rank() * per..(self.rank() + 1) * per)
    }
}

/// Output rows `r` of a `[out, in]` weight or of a bias `[out]` (column parallelism). Rows of
/// packed codes, scales and biases are exact. Gathered into new arrays rather than sliced: a
/// slice is a view that would keep the whole checkpoint tensor alive on every rank.
pub fn rows(w: Weight, r: Range<usize>) -> Result<Weight> {
    let idx = Array::from_iter(r.start as i32..r.end as i32, &[r.len() as i32]);
    let take = |a: &Array| a.take_axis(&idx, 0);
    Ok(match w {
        Weight::Dense(a) => Weight::Dense(take(&a)?),
        Weight::Quant { w, scales, biases, bits, group } => Weight::Quant { w: take(&w)?, scales: take(&scales)?, biases: take(&biases)?, bits, group },
        Weight::Mx { w, scales, format } => Weight::Mx { w: take(&w)?, scales: take(&scales)?, format },
    })
}

/// Input columns `r` of a `[out, in]` weight (row parallelism), copied row-contiguous (our
/// matvec and MLX's quantized kernels read rows whole). A quantized weight splits only at
/// whole quantization groups and whole 32-bit words of codes; `name` is in the error.
pub fn columns(w: Weight, r: Range<usize>, name: &str) -> Result<Weight> {
    let copy = |a: Array| -> Result<Array> { Ok(mlx_ext::graph::contiguous(&a)?) };
    Ok(match w {
        Weight::Dense(a) => Weight::Dense(copy(a.index((.., r.start as i32..r.end as i32)))?),
        Weight::Quant { w, scales, biases, bits, group } => {
            let (g, b) = (group as usize, bits as usize);
            if !r.start.is_multiple_of(g) || !r.end.is_multiple_of(g) || !(r.start * b).is_multiple_of(32) || !(r.end * b).is_multiple_of(32) {
                return Err(ModelError::Invalid {
                    flag: "--distributed",
                    message: format!("{name}: input columns {}..{} do not fall on whole {bits}-bit groups of {group}", r.start, r.end),
                });
            }
            let words = (r.start * b / 32) as i32..(r.end * b / 32) as i32;
            let groups = (r.start / g) as i32..(r.end / g) as i32;
            Weight::Quant {
                w: copy(w.index((.., words)))?,
                scales: copy(scales.index((.., groups.clone())))?,
                biases: copy(biases.index((.., groups)))?,
                bits,
                group,
            }
        }
        Weight::Mx { w, scales, format } => {
            let (g, b) = (MxFormat::GROUP as usize, format.bits() as usize);
            if !r.start.is_multiple_of(g) || !r.end.is_multiple_of(g) {
                return Err(ModelError::Invalid {
                    flag: "--distributed",
                    message: format!("{name}: input columns {}..{} do not fall on whole {} groups of {g}", r.start, r.end, format.mode()),
                });
            }
            let words = (r.start * b / 32) as i32..(r.end * b / 32) as i32;
            let groups = (r.start / g) as i32..(r.end / g) as i32;
            Weight::Mx { w: copy(w.index((.., words)))?, scales: copy(scales.index((.., groups)))?, format }
        }
    })
}

//! MLX's distributed layer: a group of processes (ring over TCP on CPUs, NCCL on NVIDIA GPUs,
//! MPI, JACCL over Thunderbolt on Macs) and the collective ops that run inside MLX's graph.
//!
//! The processes find each other as MLX's own launcher (`mlx.launch`) tells them: the ring
//! backend reads `MLX_RANK` and `MLX_HOSTFILE` (a JSON list, per rank, of `"ip:port"` strings),
//! NCCL reads `MLX_RANK`, `MLX_WORLD_SIZE`, `NCCL_HOST_IP` and `NCCL_PORT`. There is no transport
//! of our own. The ops are lazy like every MLX op: `all_sum` joins the graph and the processes
//! meet when it is evaluated, so every rank must build and evaluate the same collectives in the
//! same order.

use crate::{ffi, ExtError, Result};
use mlx_rs::Array;
use std::ffi::{c_void, CString};

/// Which of MLX's distributed backends to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DistBackend {
    /// The first one available whose launcher settings are present (MLX's order).
    Any,
    /// TCP ring: CPUs, or Macs over Ethernet/Thunderbolt.
    Ring,
    /// NVIDIA GPUs.
    Nccl,
    Mpi,
    /// RDMA over Thunderbolt (macOS).
    Jaccl,
}

impl DistBackend {
    pub fn name(self) -> &'static str {
        match self {
            DistBackend::Any => "any",
            DistBackend::Ring => "ring",
            DistBackend::Nccl => "nccl",
            DistBackend::Mpi => "mpi",
            DistBackend::Jaccl => "jaccl",
        }
    }

    /// Whether this libmlx was built with the backend.
    pub fn is_available(self) -> bool {
        let name = CString::new(self.name()).expect("backend names have no NUL");
        unsafe { ffi::kvsplit_dist_is_available(name.as_ptr()) }
    }
}

/// A group of processes; rank 0 is the one that prints and serves.
pub struct Group {
    raw: *mut c_void,
}

// The C++ group is an immutable handle (a shared pointer to the backend's communicator); MLX
// itself passes it between threads (the stream thread evaluates the collectives).
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Drop for Group {
    fn drop(&mut self) {
        unsafe { ffi::kvsplit_dist_free(self.raw) }
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {})", self.rank(), self.size())
    }
}

impl Group {
    /// Joins the group the launcher's environment describes. With `strict` false and no
    /// launcher settings, MLX returns a group of one (this process alone); with `strict` true
    /// that is an error naming the backend.
    pub fn init(backend: DistBackend, strict: bool) -> Result<Group> {
        let name = CString::new(backend.name()).expect("backend names have no NUL");
        let mut raw = std::ptr::null_mut();
        if unsafe { ffi::kvsplit_dist_init(name.as_ptr(), strict, &mut raw) } != 0 {
            return Err(ExtError::Primitive(format!("distributed backend '{}': {}", backend.name(), ffi::last_error())));
        }
        Ok(Group { raw })
    }

    pub fn rank(&self) -> usize {
        unsafe { ffi::kvsplit_dist_rank(self.raw) as usize }
    }

    pub fn size(&self) -> usize {
        unsafe { ffi::kvsplit_dist_size(self.raw) as usize }
    }

    /// The sub-group of every process that passed the same `color`, ranked by `key` (by the
    /// rank here when `key` is negative).
    pub fn split(&self, color: i32, key: i32) -> Result<Group> {
        let mut raw = std::ptr::null_mut();
        if unsafe { ffi::kvsplit_dist_split(self.raw, color, key, &mut raw) } != 0 {
            return Err(ExtError::Primitive(format!("distributed split: {}", ffi::last_error())));
        }
        Ok(Group { raw })
    }

    /// The element-wise sum of `x` over every rank (same shape and dtype everywhere).
    pub fn all_sum(&self, x: &Array) -> Result<Array> {
        self.op("all_sum", |res| unsafe { ffi::kvsplit_dist_all_sum(res, x.as_ptr(), self.raw) })
    }

    /// Every rank's `x` concatenated along the first axis, in rank order.
    pub fn all_gather(&self, x: &Array) -> Result<Array> {
        self.op("all_gather", |res| unsafe { ffi::kvsplit_dist_all_gather(res, x.as_ptr(), self.raw) })
    }

    /// Sends `x` to rank `dst`; evaluating the returned array performs the send.
    pub fn send(&self, x: &Array, dst: usize) -> Result<Array> {
        self.op("send", |res| unsafe { ffi::kvsplit_dist_send(res, x.as_ptr(), dst as i32, self.raw) })
    }

    /// Receives from rank `src` an array of `like`'s shape and dtype.
    pub fn recv_like(&self, like: &Array, src: usize) -> Result<Array> {
        self.op("recv", |res| unsafe { ffi::kvsplit_dist_recv_like(res, like.as_ptr(), src as i32, self.raw) })
    }

    fn op(&self, what: &str, f: impl FnOnce(&mut mlx_sys::mlx_array) -> i32) -> Result<Array> {
        ffi::array_from(&format!("distributed {what}"), f)
    }
}

//! Split-precision quantized KV cache: keys and values stored at independent bit widths and
//! group sizes, and the attention that reads them without dequantizing the whole window.

pub mod attention;
pub mod backend;
pub mod batch;
pub mod cache;
pub mod cache_file;
pub mod error;
mod paged_step;
pub mod pool;
pub mod rotation;
pub mod spec;
pub mod store;

pub use attention::Scoring;
pub use backend::Backend;
pub use cache::{CacheBytes, CacheOptions, KvCache};
pub use error::{KvError, Result};
pub use pool::{BlockFormat, Geometry, KvPool, PoolUsage};
pub use spec::{KeyLayout, KvSpec, LayerOverrides, QuantSpec, Rotation};

//! Split-precision quantized KV cache.

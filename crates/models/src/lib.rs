//! Model families, weight loading (GGUF, MLX/HF safetensors), tokenizer, sampling, generation.

pub mod allocate;
pub mod assets;
pub mod chat;
pub mod datasets;
pub mod decoder;
pub mod engine;
pub mod error;
pub mod families;
pub mod fast;
pub mod generate;
pub mod hub;
pub mod load;
pub mod mlx_dir;
pub mod model;
pub mod moe;
pub mod perplexity;
pub mod projections;
pub mod random;
pub mod random_gguf;
pub mod recipe;
pub mod sample;
pub mod shard;
pub mod weights;
pub mod gguf;
pub mod tokenizer;
pub mod tokenizer_json;

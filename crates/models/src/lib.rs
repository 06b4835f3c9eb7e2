//! Model families, weight loading (GGUF, MLX/HF safetensors), tokenizer, sampling, generation.

pub mod assets;
pub mod chat;
pub mod config;
pub mod datasets;
pub mod decoder;
pub mod error;
pub mod fast;
pub mod gemma3;
pub mod generate;
pub mod gguf_load;
pub mod llama;
pub mod hub;
pub mod mlx_dir;
pub mod model;
pub mod perplexity;
pub mod phi3;
pub mod random;
pub mod safetensors_load;
pub mod sample;
pub mod weights;
pub mod gguf;
pub mod tokenizer;
pub mod tokenizer_json;

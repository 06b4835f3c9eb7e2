//! Model families.
pub mod gguf;
pub mod tokenizer;

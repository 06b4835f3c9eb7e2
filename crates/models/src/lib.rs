//! Model families.
pub mod gguf;

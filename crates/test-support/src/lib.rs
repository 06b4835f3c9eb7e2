//! For tests only (a dev-dependency of the crates that test against real data).
//!
//! - [`assets`]: the real models, tokenizer vectors and text that tests need, fetched and cached
//!   by the project's own scripts the first time a test asks for them.
//! - [`hub_server`]: a loopback HTTP server in the Hub's URL layout, so hub downloads are tested
//!   without the hub.

pub mod assets;
pub mod hub_server;
pub mod gguf_writer;

//! introspect: test whether language models can introspect, on your own hardware.
//!
//! `model` loads Llama weights (HF safetensors or GGUF), the tokenizer and chat template; `engine` generates;
//! `registry` knows and installs models.

pub mod bench;
pub mod engine;
pub mod fsutil;
pub mod model;
pub mod registry;
pub mod runtime;

//! introspect: test whether language models can introspect, on your own hardware.
//!
//! `model` loads Llama weights (HF safetensors or GGUF), the tokenizer and chat template; `engine` generates;
//! `lora` holds adapters and their PEFT files; `train` finetunes them;
//! `memory` plans what a run holds on its device; `registry` knows and installs models.

pub mod activations;
pub mod awareness;
pub mod backend;
pub mod bench;
pub mod engine;
pub mod eval;
pub mod experiment;
pub mod fsutil;
pub mod lora;
pub mod memory;
pub mod model;
pub mod plot;
pub mod registry;
pub mod runs;
pub mod runtime;
pub mod server;
pub mod tasks;
pub mod train;
pub mod verify;

//! Generation on a loaded model: batching, KV cache, sampling, log-probabilities.

pub mod generate;
pub mod sampling;

pub use generate::{Completion, FinishReason, GenerationParams, Generator, TokenStep};

//! Generation on a loaded model: batching, KV cache, sampling, log-probabilities.

pub mod generate;
pub mod live;
pub mod sampling;
pub mod tree;

pub use generate::{Completion, FinishReason, GenerationParams, Generator, TokenStep};
pub use live::{Event, LiveBatch, RowSpec, Sequence};
pub use tree::{Expansion, Leaf, TreeParams};

//! LoRA finetuning: the hand-written training pass, the optimizer, the data and the loop around them.

pub mod adamw;
pub mod checkpoint;
pub mod data;
pub mod pass;
pub mod plot;
pub mod schedule;
pub mod trainer;

//! Subcommands of the `introspect` binary that are more than a few lines: each parses nothing itself
//! (clap did), calls the library and prints.

pub mod experiment;
pub mod tasks;

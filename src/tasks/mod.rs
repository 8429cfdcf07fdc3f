//! The paper's method, exactly: tasks and their prompt templates, response properties and their rules,
//! compliance filters, the DataRow JSONL format, and generators for introspect's own datasets.

pub mod build;
pub mod compliance;
pub mod datarow;
pub mod generate;
pub mod property;
pub mod task;
pub mod text;

pub use compliance::{complies, Group};
pub use datarow::{read_datarows, DataRow, SourcedRow};
pub use property::Property;
pub use task::{Task, TASKS};

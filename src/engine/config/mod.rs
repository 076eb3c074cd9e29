//! The pipeline file: reading (with `extends` and `--set`), checking every key and type, expanding
//! matrices and substituting `${...}`, into a [`Pipeline`] of stage instances. Every problem is
//! collected and reported at once with its file, line and column.

pub mod diagnostics;
mod every_error;
mod load;
mod node;
pub mod raw;
mod resolve;
pub mod template;

pub use diagnostics::{Diagnostic, Diagnostics, Location, Sources};
pub use node::Node;
pub use resolve::{load, Instance, Pipeline};

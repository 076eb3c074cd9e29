//! The pipeline file: reading (with `extends` and `--set`), checking every key and type, expanding
//! matrices and substituting `${...}`, into a [`Pipeline`] of stage instances. Every problem is
//! collected and reported at once with its file, line and column.

mod demand;
pub mod diagnostics;
mod every_error;
mod instances;
mod load;
mod matrix;
mod node;
mod overrides;
pub mod raw;
mod references;
mod resolve;
mod splice;
mod substitute;
pub mod template;
mod typed;
mod vars;

pub use diagnostics::{Diagnostic, Diagnostics, Location, Sources};
pub use node::Node;
pub use resolve::{load, Instance, Pipeline};

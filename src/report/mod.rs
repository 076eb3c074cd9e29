//! The report page (`nnflow report`, the `report` stage): what a pipeline did and what its models
//! predict, in one self-contained folder a browser opens without a server or a network.
//!
//! - [`sources`]: where the results are (stage states and outputs, from the engine);
//! - [`page`]: `index.html` and its pictures;
//! - [`overlay`]: the prediction overlays, drawn in Rust.

pub mod overlay;
pub mod page;
pub mod sources;

pub use page::{write_page, ReportError, Written};
pub use sources::{from_engine, Sources};

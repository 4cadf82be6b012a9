//! TMDM templates: pages that recur across many VMs (firmware, kernels, libraries),
//! kept at the destination so that the source can send a reference instead.
//!
//! - [`CatalogBuilder`] counts page contents over many VMs' migration streams or
//!   memory images and keeps those that reach a [`Threshold`];
//! - a [`Catalog`] holds the templates, is saved as a versioned file (layout in
//!   [`format`](mod@format)) and, at the destination, restores referenced pages;
//! - a [`TemplateIndex`] is the source's compact view of the same file: it finds
//!   whether a page is a template without keeping any template page;
//! - both ends compare the [`CatalogId`] before any reference is sent.
//!
//! ```no_run
//! use migstream::template::{Catalog, CatalogBuilder, TemplateIndex, Threshold};
//!
//! // offline: pages found in at least 3 of the VMs' streams become templates
//! let mut builder = CatalogBuilder::new(Threshold::Inputs(3));
//! for path in ["vm1.mig", "vm2.mig", "vm3.mig", "vm4.mig"] {
//!     builder.add(path)?;
//! }
//! builder.build()?.save("templates.cat")?;
//!
//! // source: index the file; destination: load it whole
//! let index = TemplateIndex::load("templates.cat")?;
//! let catalog = Catalog::load("templates.cat")?;
//! assert_eq!(index.id(), catalog.id());
//! # let page = [0u8; 4096];
//! if let Some((n, fp)) = index.lookup(&page) {
//!     assert_eq!(catalog.get(n), Some(&page[..])); // what the destination restores
//!     assert!(fp.matches(&page));
//! }
//! # Ok::<(), migstream::Error>(())
//! ```

mod builder;
mod catalog;
mod file;
pub mod format;
mod id;
mod index;
mod input;

pub use builder::{CatalogBuilder, InputStats, Threshold};
pub use catalog::Catalog;
pub use id::CatalogId;
pub use index::TemplateIndex;
pub use input::InputKind;

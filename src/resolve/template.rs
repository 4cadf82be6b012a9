//! Templates (TMDM): a page that is in the template catalog both ends hold travels as
//! its template number.
//!
//! The source needs only the catalog's [`TemplateIndex`] (pre-filter and fingerprints,
//! no page bytes); the destination holds the [`Catalog`], every page of which was
//! checked against its fingerprint when the catalog was built or loaded. Which
//! catalog is meant travels in the dedup stream's HELLO, and the destination refuses
//! a stream that names another.

use std::sync::Arc;

use super::{Claim, Fetch, Page, PageAt, PageOut, Restore, tag};
use crate::error::{Error, Result};
use crate::template::{Catalog, CatalogId, TemplateIndex};
use crate::varint;

/// The source half: claims pages found in the catalog's index.
#[derive(Debug, Clone)]
pub struct TemplateClaim {
    index: Arc<TemplateIndex>,
}

impl TemplateClaim {
    /// Claims the pages of `index`'s catalog.
    pub fn new(index: Arc<TemplateIndex>) -> Self {
        Self { index }
    }
}

impl Claim for TemplateClaim {
    fn tag(&self) -> u8 {
        tag::TEMPLATE
    }

    fn claim(&mut self, page: &Page<'_>, body: &mut Vec<u8>) -> bool {
        match self.index.lookup_hashed(page.prefilter(), page.data) {
            Some((template, _)) => {
                varint::put(body, u64::from(template));
                true
            }
            None => false,
        }
    }
}

/// The destination half: copies the template (checked against its fingerprint when
/// the catalog was loaded).
#[derive(Debug, Clone)]
pub struct TemplateRestore {
    catalog: Arc<Catalog>,
}

impl TemplateRestore {
    /// Restores pages of `catalog`.
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self { catalog }
    }
}

impl Restore for TemplateRestore {
    fn tag(&self) -> u8 {
        tag::TEMPLATE
    }

    fn restore(&mut self, _at: PageAt<'_>, body: &[u8], out: &mut PageOut<'_>) -> Result<()> {
        let template = match varint::get(body) {
            Some((n, len)) if len == body.len() => u32::try_from(n).ok(),
            _ => None,
        };
        let Some(page) = template.and_then(|t| self.catalog.get(t)) else {
            return Err(Error::Malformed {
                offset: 0,
                field: "template body",
                reason: "not a template number of this catalog",
            });
        };
        if page.len() != out.page_size() {
            return Err(Error::Malformed {
                offset: 0,
                field: "template body",
                reason: "the catalog's page size differs from the stream's",
            });
        }
        // checked when the catalog was built or loaded: a `Catalog` holds no page
        // that does not match its fingerprint, and nothing changes it afterwards
        out.copy_from_slice(page)
    }
}

/// Where a destination restores template pages from: the local [`Catalog`] (through
/// [`TemplateRestore`]) or a ring of store nodes. One store serves many migrations;
/// each gets its own resolver.
pub trait TemplateStore: Send + Sync + std::fmt::Debug {
    /// The identity of the catalog whose templates it serves.
    fn catalog_id(&self) -> CatalogId;

    /// The resolver of one migration, and its fetcher if the pages are not local.
    fn open(&self) -> (Box<dyn Restore>, Option<Box<dyn Fetch>>);
}

impl TemplateStore for TemplateRestore {
    fn catalog_id(&self) -> CatalogId {
        self.catalog.id()
    }

    fn open(&self) -> (Box<dyn Restore>, Option<Box<dyn Fetch>>) {
        (Box::new(self.clone()), None)
    }
}

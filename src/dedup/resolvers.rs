//! Which resolvers the two ends of a dedup stream run: the built-in ones, switched
//! on and off, and any custom ones, made anew for every stream.

use std::sync::Arc;

use super::{DedupDecoder, DedupEncoder, SEEN_WINDOW_BYTES};
use crate::error::Result;
#[cfg(doc)]
use crate::resolve::TemplateStore;
use crate::resolve::{
    Claim, DEFAULT_CACHE_BYTES, Fill, Restore, SeenBefore, SeenBeforeRestore, TemplateClaim,
    TemplateRestore, XbzrleDelta, XbzrleRestore,
};
use crate::template::{Catalog, CatalogId, TemplateIndex};

/// Makes a fresh custom source-side resolver for each stream.
type ClaimFactory = Arc<dyn Fn() -> Box<dyn Claim> + Send + Sync>;

/// Which resolvers a source runs, tried in this order: fill pages, templates, XBZRLE
/// deltas (64 MiB cache), seen-before ([`SEEN_WINDOW_BYTES`]), then the custom ones
/// in the order added. The decoders of [`DedupDecoder::with_default_resolvers`] and
/// its siblings understand every combination of the built-in ones; a custom
/// resolver needs its restoring half at the destination
/// ([`default_restores`] plus it, or `relay::DestinationConfig::with_restore`).
#[derive(Clone)]
#[non_exhaustive]
pub struct Resolvers {
    /// Pages filled with one byte value.
    pub fill: bool,
    /// Pages of the catalog this index was built from.
    pub templates: Option<Arc<TemplateIndex>>,
    /// XBZRLE deltas against the last version of a page sent.
    pub xbzrle: bool,
    /// References to pages already sent in this migration.
    pub seen: bool,
    /// Keep the seen-before window's pages at the source too
    /// ([`SeenBefore::holding`]): up to [`SEEN_WINDOW_BYTES`] (256 MiB),
    /// for a repeated page confirmed by comparing bytes instead of a BLAKE3.
    pub hold_seen: bool,
    custom: Vec<ClaimFactory>,
}

impl std::fmt::Debug for Resolvers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolvers")
            .field("fill", &self.fill)
            .field("templates", &self.templates.as_ref().map(|t| t.id()))
            .field("xbzrle", &self.xbzrle)
            .field("seen", &self.seen)
            .field("hold_seen", &self.hold_seen)
            .field("custom", &self.custom.len())
            .finish()
    }
}

impl Default for Resolvers {
    /// Every local resolver; no templates.
    fn default() -> Self {
        Self {
            fill: true,
            templates: None,
            xbzrle: true,
            seen: true,
            hold_seen: false,
            custom: Vec::new(),
        }
    }
}

impl Resolvers {
    /// No resolver at all: every page travels raw (compressed with its batch).
    pub fn none() -> Self {
        Self {
            fill: false,
            xbzrle: false,
            seen: false,
            ..Self::default()
        }
    }

    /// With or without fill pages.
    pub fn with_fill(mut self, on: bool) -> Self {
        self.fill = on;
        self
    }

    /// With templates of the catalog `index` was built from, or without.
    pub fn with_templates(mut self, index: Option<Arc<TemplateIndex>>) -> Self {
        self.templates = index;
        self
    }

    /// With or without XBZRLE deltas.
    pub fn with_xbzrle(mut self, on: bool) -> Self {
        self.xbzrle = on;
        self
    }

    /// With or without seen-before references.
    pub fn with_seen(mut self, on: bool) -> Self {
        self.seen = on;
        self
    }

    /// Holding the seen-before window's pages at the source, or not.
    pub fn with_hold_seen(mut self, on: bool) -> Self {
        self.hold_seen = on;
        self
    }

    /// With a custom resolver after the built-in ones, made by `make` for every
    /// stream (a resolver keeps per-stream state). Its tag must be one of
    /// [`CUSTOM_TAGS`](crate::resolve::CUSTOM_TAGS).
    pub fn with_custom(
        mut self,
        make: impl Fn() -> Box<dyn Claim> + Send + Sync + 'static,
    ) -> Self {
        self.custom.push(Arc::new(make));
        self
    }

    /// A fresh resolver chain for one stream.
    pub fn claims(&self) -> Vec<Box<dyn Claim>> {
        let mut claims: Vec<Box<dyn Claim>> = Vec::new();
        if self.fill {
            claims.push(Box::new(Fill));
        }
        if let Some(index) = &self.templates {
            claims.push(Box::new(TemplateClaim::new(index.clone())));
        }
        if self.xbzrle {
            claims.push(Box::new(XbzrleDelta::new(DEFAULT_CACHE_BYTES)));
        }
        match (self.seen, self.hold_seen) {
            (true, false) => claims.push(Box::new(SeenBefore::new(SEEN_WINDOW_BYTES))),
            (true, true) => claims.push(Box::new(SeenBefore::holding(SEEN_WINDOW_BYTES))),
            (false, _) => {}
        }
        claims.extend(self.custom.iter().map(|make| make()));
        claims
    }
}

impl DedupEncoder {
    /// An encoder running `resolvers`; the template catalog's identity, if any, goes
    /// in the HELLO. Fails with [`Error::Config`](crate::Error::Config) if a custom
    /// resolver has a reserved tag or another's.
    pub fn with_resolvers(resolvers: &Resolvers) -> Result<Self> {
        let encoder = Self::new(resolvers.claims())?;
        Ok(match &resolvers.templates {
            Some(index) => encoder.with_catalog_id(index.id()),
            None => encoder,
        })
    }

    /// An encoder with every built-in local resolver ([`Resolvers::default`]).
    pub fn with_default_resolvers() -> Self {
        Self::with_resolvers(&Resolvers::default()).expect(BUILT_IN)
    }

    /// The built-in resolvers plus templates of the catalog `index` was built from.
    pub fn with_templates(index: Arc<TemplateIndex>) -> Self {
        Self::with_resolvers(&Resolvers::default().with_templates(Some(index))).expect(BUILT_IN)
    }
}

impl DedupDecoder {
    /// A decoder for streams of any built-in [`Resolvers`] without templates.
    pub fn with_default_resolvers() -> Self {
        Self::new(default_restores(None)).expect(BUILT_IN)
    }

    /// A decoder for streams of any built-in [`Resolvers`], templates of `catalog`
    /// included; refuses a stream that names another catalog.
    pub fn with_templates(catalog: Arc<Catalog>) -> Self {
        let id = catalog.id();
        Self::with_template_resolver(Box::new(TemplateRestore::new(catalog)), id).expect(BUILT_IN)
    }

    /// Like [`with_templates`](Self::with_templates) with templates of catalog `id`
    /// restored by `templates` (e.g. from [`TemplateStore::open`]). Fails with
    /// [`Error::Config`](crate::Error::Config) unless `templates` has the TEMPLATE
    /// tag.
    pub fn with_template_resolver(templates: Box<dyn Restore>, id: CatalogId) -> Result<Self> {
        if templates.tag() != crate::resolve::tag::TEMPLATE {
            return Err(crate::Error::Config {
                what: "resolvers",
                reason: format!("a template resolver with tag {:#04x}", templates.tag()),
            });
        }
        Ok(Self::new(default_restores(Some(templates)))?.with_catalog_id(id))
    }
}

/// The built-in resolvers have distinct tags of their own.
const BUILT_IN: &str = "the built-in resolvers' tags are valid and distinct";

/// The restoring halves of every built-in resolver, `templates` among them if given:
/// what a destination runs to read any stream of the built-in [`Resolvers`]. Add the
/// restoring halves of custom resolvers and hand the list to [`DedupDecoder::new`].
pub fn default_restores(templates: Option<Box<dyn Restore>>) -> Vec<Box<dyn Restore>> {
    let mut restores: Vec<Box<dyn Restore>> = vec![Box::new(Fill)];
    restores.extend(templates);
    restores.push(Box::new(XbzrleRestore::new(DEFAULT_CACHE_BYTES)));
    restores.push(Box::new(SeenBeforeRestore::new(SEEN_WINDOW_BYTES)));
    restores
}

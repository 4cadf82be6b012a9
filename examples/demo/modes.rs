//! The resolver modes compared, and the template stores the last two need: the
//! catalog itself at the destination, or a ring of three in-process store nodes.

use std::sync::Arc;

use migstream::dedup::Resolvers;
use migstream::dht::{self, Cluster, DEFAULT_REPLICAS, DhtOptions, DhtTemplates, MemoryNode, Node};
use migstream::relay::{DestinationConfig, SourceConfig};
use migstream::resolve::TemplateRestore;
use migstream::template::{Catalog, TemplateIndex};

use super::Error;

/// One way of running the two ends, each adding to the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Zero pages aside, every page LZ4-compressed in batches.
    Lz4,
    /// + pages of one repeated byte sent as that byte.
    Fill,
    /// + pages already sent in this migration sent as a reference, and re-sent pages
    ///   as an XBZRLE delta against their previous version.
    Seen,
    /// + pages of the template catalog sent as a template number; the destination
    ///   holds the catalog.
    Catalog,
    /// The same, the destination fetching templates from a DHT ring of store nodes.
    Dht,
}

impl Mode {
    pub(crate) const ALL: [Mode; 5] = [Mode::Lz4, Mode::Fill, Mode::Seen, Mode::Catalog, Mode::Dht];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Mode::Lz4 => "lz4 only",
            Mode::Fill => "+ fill",
            Mode::Seen => "+ seen-before + xbzrle",
            Mode::Catalog => "+ templates (local catalog)",
            Mode::Dht => "+ templates (3-node DHT)",
        }
    }

    pub(crate) fn uses_templates(self) -> bool {
        matches!(self, Mode::Catalog | Mode::Dht)
    }

    /// The source end's settings (what `proxy source --resolvers ... --catalog` sets).
    pub(crate) fn source(self, templates: &Templates) -> SourceConfig {
        let on = |since: Mode| self as u8 >= since as u8;
        SourceConfig::default().with_resolvers(
            Resolvers::default()
                .with_fill(on(Mode::Fill))
                .with_xbzrle(on(Mode::Seen))
                .with_seen(on(Mode::Seen))
                .with_templates(self.uses_templates().then(|| templates.index.clone())),
        )
    }

    /// The destination end's settings: where it restores templates from.
    pub(crate) fn destination(self, templates: &Templates) -> DestinationConfig {
        let config = DestinationConfig::default();
        match self {
            Mode::Catalog => config.with_templates(templates.local.clone()),
            Mode::Dht => config.with_templates(Arc::new(templates.dht.clone())),
            _ => config,
        }
    }
}

/// A catalog as both ends see it.
#[derive(Debug)]
pub(crate) struct Templates {
    /// The source's index of the catalog (no page bytes).
    pub(crate) index: Arc<TemplateIndex>,
    /// The destination's local copy.
    pub(crate) local: Arc<TemplateRestore>,
    /// The destination's view of the ring the catalog was pushed to.
    pub(crate) dht: DhtTemplates,
    /// The ring's nodes, to count what was fetched from them.
    pub(crate) nodes: Vec<Arc<MemoryNode>>,
}

impl Templates {
    /// Indexes `catalog` and pushes it to a ring of three in-process nodes, each
    /// template on [`DEFAULT_REPLICAS`] of them.
    pub(crate) async fn new(catalog: Catalog) -> Result<Self, Error> {
        let catalog = Arc::new(catalog);
        let nodes: Vec<Arc<MemoryNode>> = (1..=3)
            .map(|i| Arc::new(MemoryNode::new(format!("node-{i}"))))
            .collect();
        let members = nodes.iter().map(|n| n.clone() as Arc<dyn Node>).collect();
        let cluster = Arc::new(Cluster::new(
            members,
            DEFAULT_REPLICAS,
            DhtOptions::default(),
        )?);
        dht::push(&cluster, &catalog).await?;
        let dht =
            DhtTemplates::from_cluster(cluster, Some(catalog.id()), DhtOptions::default()).await?;
        Ok(Self {
            index: Arc::new(TemplateIndex::new(&catalog)),
            local: Arc::new(TemplateRestore::new(catalog)),
            dht,
            nodes,
        })
    }

    /// Templates fetched from the ring's nodes so far, per node.
    pub(crate) fn fetched(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.gets()).collect()
    }
}

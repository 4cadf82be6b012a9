//! Where a destination gets template pages: `--catalog FILE` or `--dht URLS`, and
//! how the examples reach a ring of Redis nodes (shared with `catalog push|verify`).
//!
//! The ring flags, as the examples spell them ([`DhtArgs`], flattened into
//! `proxy destination` and `dedup decode`):
//!
//! - `--dht URLS` (`--nodes` for `catalog`): comma-separated
//!   `redis://[[USER]:PASSWORD@]HOST:PORT` or `rediss://...` URLs, or `@FILE`, a
//!   file of them (separated by commas, spaces or lines; `#` starts a comment
//!   line), which keeps passwords out of the process list;
//! - `--replicas R`: copies per template, as pushed;
//! - `--dht-catalog ID`: serve catalog ID (64 hex digits, as `catalog info`
//!   prints it) rather than the one the nodes name current;
//! - `--redis-ca PEM`: trust only this CA for `rediss://` nodes (default: the
//!   system's roots);
//! - `--redis-cert PEM --redis-key PEM`: the client certificate and key shown to
//!   `rediss://` nodes that ask for one.
//!
//! The three TLS flags are [`RedisTlsArgs`], which `catalog push|verify` flatten
//! too; [`dht_options`] turns them into the ring's options.

use std::error::Error;
use std::sync::Arc;

use clap::Args;
use migstream::dht::{DEFAULT_REPLICAS, DhtOptions, DhtTemplates, RedisTls};
use migstream::resolve::{TemplateRestore, TemplateStore};
use migstream::template::{Catalog, CatalogId};

/// How a destination reaches its ring (see the module's list of flags). The
/// command that flattens it must have a `--catalog` of its own: `--dht` conflicts
/// with it.
#[derive(Debug, Clone, Args)]
pub(crate) struct DhtArgs {
    /// Templates from this ring of Redis nodes: comma-separated
    /// redis://[[USER]:PASSWORD@]HOST:PORT or rediss:// URLs, or @FILE of them (keeps
    /// passwords out of the process list).
    #[arg(long, value_name = "URLS|@FILE", conflicts_with = "catalog")]
    pub(crate) dht: Option<String>,
    /// Copies of each template on the ring, as pushed.
    #[arg(long, value_name = "R", default_value_t = DEFAULT_REPLICAS)]
    pub(crate) replicas: usize,
    /// Serve this catalog of the ring (64 hex digits, as `catalog info` prints it)
    /// instead of the one the nodes name current.
    #[arg(long, value_name = "ID", requires = "dht")]
    pub(crate) dht_catalog: Option<CatalogId>,
    #[command(flatten)]
    pub(crate) tls: RedisTlsArgs,
}

/// The TLS settings for `rediss://` nodes.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct RedisTlsArgs {
    /// Trust only this CA (PEM) for rediss:// nodes [default: the system's roots].
    #[arg(long, value_name = "PEM")]
    pub(crate) redis_ca: Option<String>,
    /// Client certificate (PEM) for rediss:// nodes that ask for one.
    #[arg(long, value_name = "PEM", requires = "redis_key")]
    pub(crate) redis_cert: Option<String>,
    /// Its key (PEM).
    #[arg(long, value_name = "PEM", requires = "redis_cert")]
    pub(crate) redis_key: Option<String>,
}

impl RedisTlsArgs {
    /// Whether any of the flags is given.
    fn any(&self) -> bool {
        self.redis_ca.is_some() || self.redis_cert.is_some() || self.redis_key.is_some()
    }
}

/// The template store of the local catalog file at `catalog` or of the ring `dht`
/// describes (its pinned catalog, or the one the nodes name current); none without
/// either.
pub(crate) async fn template_store(
    catalog: Option<&str>,
    dht: &DhtArgs,
) -> Result<Option<Arc<dyn TemplateStore>>, Box<dyn Error>> {
    if dht.dht.is_none() && dht.tls.any() {
        return Err("--redis-ca, --redis-cert and --redis-key go with --dht".into());
    }
    Ok(match (catalog, &dht.dht) {
        (Some(_), Some(_)) => return Err("--catalog or --dht, not both".into()),
        (Some(path), None) => Some(Arc::new(TemplateRestore::new(Arc::new(
            Catalog::load(path).map_err(|e| format!("--catalog {path}: {e}"))?,
        )))),
        (None, Some(spec)) => {
            let urls = node_urls(spec).map_err(|e| format!("--dht: {e}"))?;
            let options = dht_options(&dht.tls)?;
            let store = match dht.dht_catalog {
                Some(id) => DhtTemplates::connect_to(&urls, dht.replicas, id, options).await?,
                None => DhtTemplates::connect(&urls, dht.replicas, options).await?,
            };
            eprintln!(
                "templates of catalog {}{} from {} nodes",
                store.catalog_id(),
                if dht.dht_catalog.is_some() {
                    " (pinned)"
                } else {
                    ""
                },
                urls.len()
            );
            Some(Arc::new(store))
        }
        (None, None) => None,
    })
}

/// The node URLs of `spec`: comma-separated, or `@FILE`, a file of URLs separated
/// by commas, spaces or lines, `#` starting a comment line.
pub(crate) fn node_urls(spec: &str) -> Result<Vec<String>, Box<dyn Error>> {
    let text = match spec.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
        None => spec.to_string(),
    };
    let urls: Vec<String> = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(|line| line.split([',', ' ', '\t']))
        .filter(|url| !url.is_empty())
        .map(str::to_string)
        .collect();
    if urls.is_empty() {
        return Err("no node URL given".into());
    }
    Ok(urls)
}

/// The ring's options: the defaults, with the TLS settings of `--redis-ca`,
/// `--redis-cert` and `--redis-key` if any is given.
pub(crate) fn dht_options(tls: &RedisTlsArgs) -> Result<DhtOptions, Box<dyn Error>> {
    let mut options = DhtOptions::default();
    let ca = match &tls.redis_ca {
        Some(path) => Some(RedisTls::from_ca_file(path).map_err(|e| format!("--redis-ca: {e}"))?),
        None => None,
    };
    options.redis_tls = match (&tls.redis_cert, &tls.redis_key) {
        (Some(cert), Some(key)) => Some(
            ca.unwrap_or_default()
                .with_client_identity_files(cert, key)
                .map_err(|e| format!("--redis-cert/--redis-key: {e}"))?,
        ),
        (None, None) => ca,
        _ => return Err("--redis-cert and --redis-key go together".into()),
    };
    Ok(options)
}

//! Where a destination gets template pages: `--catalog FILE` or `--dht URLS`, and
//! how the examples reach a ring of Redis nodes (shared with `catalog push|verify`).
//!
//! The ring flags, as the examples spell them:
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

use std::error::Error;
use std::sync::Arc;

use migstream::dht::{DhtOptions, DhtTemplates, RedisTls};
use migstream::resolve::{TemplateRestore, TemplateStore};
use migstream::template::{Catalog, CatalogId};

/// How a destination reaches its ring (see the module's list of flags).
#[derive(Debug, Clone, Default)]
pub(crate) struct DhtArgs {
    /// `--dht`: the node URLs, or `@FILE`.
    pub(crate) urls: String,
    /// `--replicas`.
    pub(crate) replicas: usize,
    /// `--dht-catalog`: the pinned catalog id, in hex.
    pub(crate) catalog: Option<String>,
    /// `--redis-ca`: a PEM file of the CA to trust.
    pub(crate) redis_ca: Option<String>,
    /// `--redis-cert`: a PEM file of the client certificate chain.
    pub(crate) redis_cert: Option<String>,
    /// `--redis-key`: a PEM file of its key.
    pub(crate) redis_key: Option<String>,
}

/// The template store of a local catalog file or of the ring of Redis nodes at the
/// comma-separated `dht` URLs (the catalog the nodes name current, `replicas`
/// copies per template as pushed); none without either.
#[allow(dead_code)] // the dedup example's; the proxy takes every ring flag
pub(crate) async fn template_store(
    catalog: Option<&str>,
    dht: Option<&str>,
    replicas: usize,
) -> Result<Option<Arc<dyn TemplateStore>>, Box<dyn Error>> {
    let dht = dht.map(|urls| DhtArgs {
        urls: urls.to_string(),
        replicas,
        ..DhtArgs::default()
    });
    template_store_with(catalog, dht.as_ref()).await
}

/// The template store of a local catalog file or of the ring `dht` describes:
/// its pinned catalog, or the one the nodes name current; none without either.
pub(crate) async fn template_store_with(
    catalog: Option<&str>,
    dht: Option<&DhtArgs>,
) -> Result<Option<Arc<dyn TemplateStore>>, Box<dyn Error>> {
    Ok(match (catalog, dht) {
        (Some(_), Some(_)) => return Err("--catalog or --dht, not both".into()),
        (Some(path), None) => Some(Arc::new(TemplateRestore::new(Arc::new(Catalog::load(
            path,
        )?)))),
        (None, Some(args)) => {
            let urls = node_urls(&args.urls)?;
            let options = dht_options(
                args.redis_ca.as_deref(),
                args.redis_cert.as_deref(),
                args.redis_key.as_deref(),
            )?;
            let pinned = match &args.catalog {
                Some(id) => Some(id.parse::<CatalogId>()?),
                None => None,
            };
            let store = match pinned {
                Some(id) => DhtTemplates::connect_to(&urls, args.replicas, id, options).await?,
                None => DhtTemplates::connect(&urls, args.replicas, options).await?,
            };
            eprintln!(
                "templates of catalog {}{} from {} nodes",
                store.catalog_id(),
                if pinned.is_some() { " (pinned)" } else { "" },
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
pub(crate) fn dht_options(
    ca: Option<&str>,
    cert: Option<&str>,
    key: Option<&str>,
) -> Result<DhtOptions, Box<dyn Error>> {
    let mut options = DhtOptions::default();
    let tls = match ca {
        Some(path) => Some(RedisTls::from_ca_file(path)?),
        None => None,
    };
    options.redis_tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(
            tls.unwrap_or_default()
                .with_client_identity_files(cert, key)?,
        ),
        (None, None) => tls,
        _ => return Err("--redis-cert and --redis-key go together".into()),
    };
    Ok(options)
}

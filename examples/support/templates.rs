//! Where a destination gets template pages: `--catalog FILE` or `--dht URLS`.

use std::sync::Arc;

use migstream::dht::{DhtOptions, DhtTemplates};
use migstream::resolve::{TemplateRestore, TemplateStore};
use migstream::template::Catalog;

/// The template store of a local catalog file or of the ring of Redis nodes at the
/// comma-separated `dht` URLs (the catalog pushed there last, `replicas` copies per
/// template as pushed); none without either.
pub(crate) async fn template_store(
    catalog: Option<&str>,
    dht: Option<&str>,
    replicas: usize,
) -> Result<Option<Arc<dyn TemplateStore>>, Box<dyn std::error::Error>> {
    Ok(match (catalog, dht) {
        (Some(_), Some(_)) => return Err("--catalog or --dht, not both".into()),
        (Some(path), None) => Some(Arc::new(TemplateRestore::new(Arc::new(Catalog::load(
            path,
        )?)))),
        (None, Some(urls)) => {
            let urls: Vec<&str> = urls.split(',').collect();
            let store = DhtTemplates::connect(&urls, replicas, DhtOptions::default()).await?;
            eprintln!(
                "templates of catalog {:?} from {} nodes",
                store.catalog_id(),
                urls.len()
            );
            Some(Arc::new(store))
        }
        (None, None) => None,
    })
}

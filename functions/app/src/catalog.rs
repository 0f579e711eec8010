//! Changing the model catalog: a runner's start offers its version, operators (`kiln-admin
//! models`) add, weigh, promote, retire and shadow versions. Each change re-reads the model and
//! writes only if nobody changed it meanwhile (the rules are [`kiln_domain::catalog`]'s).

use chrono::Utc;
use kiln_domain::{CatalogError, CatalogModel, ModelSpec, Offered};
use std::sync::Arc;

use crate::ports::{ModelCatalog, PortError};

/// How many times a change re-reads and retries when another writer won.
const MAX_RACES: usize = 8;

/// Why a catalog change was not made.
#[derive(Debug, thiserror::Error)]
pub enum CatalogChangeError {
    #[error(transparent)]
    Rule(#[from] CatalogError),
    #[error("no model `{0}` in the catalog")]
    NoSuchModel(String),
    #[error("the catalog entry kept changing under this change; try again")]
    Contention,
    #[error(transparent)]
    Port(#[from] PortError),
}

/// The catalog's changes over its port.
pub struct Catalog {
    port: Arc<dyn ModelCatalog>,
}

impl Catalog {
    pub fn new(port: Arc<dyn ModelCatalog>) -> Self {
        Self { port }
    }

    /// A runner serving `spec` starts: a new model is added with this version taking every
    /// request; a new version of a known model is added as a candidate (no traffic); a known
    /// version takes a changed description, its traffic kept; a retired one is left as it is.
    pub async fn offer(&self, spec: &ModelSpec) -> Result<Offered, CatalogChangeError> {
        for _ in 0..MAX_RACES {
            let (outcome, written) = match self.port.model(&spec.name).await? {
                None => (Offered::NewModel, self.port.put(&CatalogModel::new(spec.clone(), Utc::now()), None).await?),
                Some(mut stored) => match stored.model.offer(spec.clone(), Utc::now()) {
                    changed @ (Offered::Candidate | Offered::Updated) => {
                        (changed, self.port.put(&stored.model, Some(stored.revision)).await?)
                    }
                    unchanged => return Ok(unchanged),
                },
            };
            if written {
                return Ok(outcome);
            }
        }
        Err(CatalogChangeError::Contention)
    }

    /// An operator adds `spec` with `weight` (a new model gets every request whatever the
    /// weight).
    pub async fn add(&self, spec: &ModelSpec, weight: u32) -> Result<CatalogModel, CatalogChangeError> {
        for _ in 0..MAX_RACES {
            let (model, written) = match self.port.model(&spec.name).await? {
                None => {
                    let model = CatalogModel::new(spec.clone(), Utc::now());
                    let written = self.port.put(&model, None).await?;
                    (model, written)
                }
                Some(mut stored) => {
                    stored.model.add(spec.clone(), weight, Utc::now())?;
                    let written = self.port.put(&stored.model, Some(stored.revision)).await?;
                    (stored.model, written)
                }
            };
            if written {
                return Ok(model);
            }
        }
        Err(CatalogChangeError::Contention)
    }

    /// Applies `change` to model `name` and writes it.
    pub async fn change(
        &self,
        name: &str,
        change: impl Fn(&mut CatalogModel) -> Result<(), CatalogError>,
    ) -> Result<CatalogModel, CatalogChangeError> {
        for _ in 0..MAX_RACES {
            let mut stored =
                self.port.model(name).await?.ok_or_else(|| CatalogChangeError::NoSuchModel(name.to_owned()))?;
            change(&mut stored.model)?;
            if self.port.put(&stored.model, Some(stored.revision)).await? {
                return Ok(stored.model);
            }
        }
        Err(CatalogChangeError::Contention)
    }

    pub async fn models(&self) -> Result<Vec<CatalogModel>, PortError> {
        self.port.models().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryCatalog;

    fn spec(version: &str) -> ModelSpec {
        let mut spec: ModelSpec =
            serde_json::from_str(include_str!("../../../gpu-runner/models/kiln-demo/manifest.json")).unwrap();
        spec.version = version.into();
        spec
    }

    #[tokio::test]
    async fn runners_offer_versions_and_operators_move_the_traffic() {
        let catalog = Catalog::new(Arc::new(MemoryCatalog::default()));
        assert_eq!(catalog.offer(&spec("1")).await.unwrap(), Offered::NewModel);
        assert_eq!(catalog.offer(&spec("2")).await.unwrap(), Offered::Candidate);
        assert_eq!(catalog.offer(&spec("1")).await.unwrap(), Offered::AlreadyThere);
        let weights = |model: &CatalogModel| model.versions.iter().map(|v| v.weight).collect::<Vec<_>>();
        let canary = catalog.change("kiln-demo", |m| m.set_weight("2", 5)).await.unwrap();
        assert_eq!(weights(&canary), [100, 5]);
        let promoted = catalog.change("kiln-demo", |m| m.promote("2")).await.unwrap();
        assert_eq!(weights(&promoted), [0, 100]);
        catalog.change("kiln-demo", |m| m.retire("1")).await.unwrap();
        assert_eq!(catalog.offer(&spec("1")).await.unwrap(), Offered::Retired);
        assert!(matches!(catalog.change("nope", |m| m.promote("1")).await, Err(CatalogChangeError::NoSuchModel(_))));
        assert!(matches!(
            catalog.add(&spec("2"), 1).await,
            Err(CatalogChangeError::Rule(CatalogError::AlreadyThere { .. }))
        ));
        assert_eq!(weights(&catalog.add(&spec("3"), 7).await.unwrap()), [0, 100, 7]);
    }
}

//! The model catalog's rules: each model holds the versions it serves, each with a traffic
//! weight (requests without a version are spread by it, e.g. 95/5 for a canary) and a shadow
//! share (that fraction of the requests another version serves is also rendered by this one,
//! for comparison, never returned). Versions are added (a runner's start adds its own as a
//! candidate, with no traffic, unless the model is new), weighted, promoted and retired by
//! operators; nothing a runner does takes traffic from a version or brings a retired one back,
//! so the catalog never goes backwards.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ModelSpec;

/// A model and every version it has served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogModel {
    pub name: String,
    /// In the order they were added.
    pub versions: Vec<ServedVersion>,
}

/// One version of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedVersion {
    pub spec: ModelSpec,
    /// Its share of requests that name no version, relative to the others' (0: only requests
    /// that pin it, `name@version`).
    pub weight: u32,
    /// Percent of the requests served by another version that this one also renders, as a
    /// shadow job nobody is answered with.
    #[serde(default)]
    pub shadow_percent: u32,
    /// Retired: takes no requests, pinned or not, and is never added back.
    #[serde(default)]
    pub retired: bool,
    pub added_at: DateTime<Utc>,
}

impl ServedVersion {
    pub fn version(&self) -> &str {
        &self.spec.version
    }
}

/// A change the catalog's rules refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("model `{model}` has no version `{version}`")]
    NoSuchVersion { model: String, version: String },
    #[error("model `{model}` already has version `{version}`")]
    AlreadyThere { model: String, version: String },
    #[error("model `{model}` version `{version}` is retired")]
    Retired { model: String, version: String },
    #[error("model `{model}` version `{version}` is the only version with traffic: give another version weight first")]
    OnlyTraffic { model: String, version: String },
    #[error("a shadow share is a percent: 0 to 100, not {0}")]
    Percent(u32),
    #[error("the package is model `{found}`, not `{model}`")]
    OtherModel { model: String, found: String },
}

/// What offering a runner's version to the catalog did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// A new model, its version taking every request.
    NewModel,
    /// A new version of a model, as a candidate: no traffic until an operator gives it some.
    Candidate,
    /// The version was there already (its traffic unchanged).
    AlreadyThere,
    /// The version was there with another description (a changed manifest, or one stored
    /// before costs and presets were kept): the description is replaced, its traffic kept.
    Updated,
    /// The version is retired; it stays so.
    Retired,
}

impl CatalogModel {
    /// A new model whose one version takes every request.
    pub fn new(spec: ModelSpec, now: DateTime<Utc>) -> Self {
        let name = spec.name.clone();
        Self {
            name,
            versions: vec![ServedVersion { spec, weight: 100, shadow_percent: 0, retired: false, added_at: now }],
        }
    }

    /// The versions that take requests.
    pub fn active(&self) -> impl Iterator<Item = &ServedVersion> {
        self.versions.iter().filter(|v| !v.retired)
    }

    pub fn version(&self, version: &str) -> Option<&ServedVersion> {
        self.versions.iter().find(|v| v.version() == version)
    }

    /// The version shown for the model (`GET /v1/models`): the most weighted active one, the
    /// newest among equals.
    pub fn default_version(&self) -> Option<&ServedVersion> {
        self.active().max_by_key(|v| (v.weight, v.added_at))
    }

    /// The version a request without one gets, by weight, from `key` (a hash of the request:
    /// identical requests get the same version, so they still meet in the cache).
    pub fn pick(&self, key: u64) -> Option<&ServedVersion> {
        let total: u64 = self.active().map(|v| u64::from(v.weight)).sum();
        if total == 0 {
            return self.default_version();
        }
        let mut point = key % total;
        for version in self.active().filter(|v| v.weight > 0) {
            if point < u64::from(version.weight) {
                return Some(version);
            }
            point -= u64::from(version.weight);
        }
        self.default_version()
    }

    /// The versions that shadow a request served by `served`, from `key` (another hash of the
    /// request than [`CatalogModel::pick`]'s).
    pub fn shadows(&self, served: &str, key: u64) -> Vec<&ServedVersion> {
        self.active().filter(|v| v.version() != served && key % 100 < u64::from(v.shadow_percent)).collect()
    }

    /// A runner serving `spec` started: a version the catalog lacks is added as a candidate.
    pub fn offer(&mut self, spec: ModelSpec, now: DateTime<Utc>) -> Offered {
        match self.versions.iter_mut().find(|v| v.spec.version == spec.version) {
            Some(there) if there.retired => Offered::Retired,
            Some(there) if there.spec == spec => Offered::AlreadyThere,
            Some(there) => {
                there.spec = spec;
                Offered::Updated
            }
            None => {
                self.versions.push(ServedVersion { spec, weight: 0, shadow_percent: 0, retired: false, added_at: now });
                Offered::Candidate
            }
        }
    }

    /// An operator adds a version with `weight`.
    pub fn add(&mut self, spec: ModelSpec, weight: u32, now: DateTime<Utc>) -> Result<(), CatalogError> {
        if spec.name != self.name {
            return Err(CatalogError::OtherModel { model: self.name.clone(), found: spec.name });
        }
        if self.version(&spec.version).is_some() {
            return Err(CatalogError::AlreadyThere { model: self.name.clone(), version: spec.version });
        }
        self.versions.push(ServedVersion { spec, weight, shadow_percent: 0, retired: false, added_at: now });
        Ok(())
    }

    fn active_mut(&mut self, version: &str) -> Result<&mut ServedVersion, CatalogError> {
        let model = self.name.clone();
        let found = self.versions.iter_mut().find(|v| v.spec.version == version);
        match found {
            None => Err(CatalogError::NoSuchVersion { model, version: version.to_owned() }),
            Some(v) if v.retired => Err(CatalogError::Retired { model, version: version.to_owned() }),
            Some(v) => Ok(v),
        }
    }

    /// Sets a version's traffic weight; the last weight of the model is never taken away.
    pub fn set_weight(&mut self, version: &str, weight: u32) -> Result<(), CatalogError> {
        if weight == 0 {
            self.keep_traffic_without(version)?;
        }
        self.active_mut(version)?.weight = weight;
        Ok(())
    }

    /// Sets a version's shadow share, in percent.
    pub fn set_shadow(&mut self, version: &str, percent: u32) -> Result<(), CatalogError> {
        if percent > 100 {
            return Err(CatalogError::Percent(percent));
        }
        self.active_mut(version)?.shadow_percent = percent;
        Ok(())
    }

    /// Every request without a version goes to `version` (weight 100, the others 0); it
    /// shadows nothing.
    pub fn promote(&mut self, version: &str) -> Result<(), CatalogError> {
        self.active_mut(version)?;
        for v in self.versions.iter_mut().filter(|v| !v.retired) {
            let promoted = v.spec.version == version;
            v.weight = if promoted { 100 } else { 0 };
            if promoted {
                v.shadow_percent = 0;
            }
        }
        Ok(())
    }

    /// Retires a version: it takes no more requests (jobs already queued for it still run).
    pub fn retire(&mut self, version: &str) -> Result<(), CatalogError> {
        self.keep_traffic_without(version)?;
        let v = self.active_mut(version)?;
        (v.retired, v.weight, v.shadow_percent) = (true, 0, 0);
        Ok(())
    }

    /// Refuses when no other active version would have traffic without `version`'s.
    fn keep_traffic_without(&self, version: &str) -> Result<(), CatalogError> {
        let others = self.active().any(|v| v.version() != version && v.weight > 0);
        let has_traffic = self.active().any(|v| v.version() == version && v.weight > 0);
        if has_traffic && !others {
            return Err(CatalogError::OnlyTraffic { model: self.name.clone(), version: version.to_owned() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::demo;

    fn spec(version: &str) -> ModelSpec {
        ModelSpec { version: version.into(), ..demo() }
    }

    fn versions(model: &CatalogModel) -> Vec<(String, u32, u32, bool)> {
        model.versions.iter().map(|v| (v.spec.version.clone(), v.weight, v.shadow_percent, v.retired)).collect()
    }

    #[test]
    fn a_runners_new_version_is_a_candidate_and_an_old_one_changes_nothing() {
        let now = Utc::now();
        let mut model = CatalogModel::new(spec("1"), now);
        assert_eq!(model.offer(spec("2"), now), Offered::Candidate);
        assert_eq!(model.offer(spec("1"), now), Offered::AlreadyThere);
        assert_eq!(versions(&model), [("1".into(), 100, 0, false), ("2".into(), 0, 0, false)]);
        let cheaper = ModelSpec { cost: crate::CostModel { unit_scale: 0.5 }, ..spec("1") };
        assert_eq!(model.offer(cheaper, now), Offered::Updated, "a changed manifest is taken");
        assert_eq!((model.versions[0].spec.cost.unit_scale, model.versions[0].weight), (0.5, 100), "its traffic kept");
        assert_eq!(model.default_version().unwrap().version(), "1");
        model.promote("2").unwrap();
        model.retire("1").unwrap();
        // A v1 runner starting late neither takes traffic back nor revives v1.
        assert_eq!(model.offer(spec("1"), now), Offered::Retired);
        assert_eq!(versions(&model), [("1".into(), 0, 0, true), ("2".into(), 100, 0, false)]);
    }

    #[test]
    fn requests_spread_by_weight_and_identical_ones_meet() {
        let now = Utc::now();
        let mut model = CatalogModel::new(spec("1"), now);
        model.add(spec("2"), 0, now).unwrap();
        model.set_weight("1", 95).unwrap();
        model.set_weight("2", 5).unwrap();
        let picks: Vec<&str> =
            (0..10_000u64).map(|k| model.pick(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)).unwrap().version()).collect();
        let canary = picks.iter().filter(|v| **v == "2").count();
        assert!((400..=600).contains(&canary), "5% of 10,000: {canary}");
        assert_eq!(model.pick(42).unwrap().version(), model.pick(42).unwrap().version());
        model.set_shadow("2", 10).unwrap();
        assert_eq!(model.shadows("1", 7).len(), 1);
        assert_eq!(model.shadows("1", 17).len(), 0);
        assert!(model.shadows("2", 7).is_empty(), "a version never shadows itself");
    }

    #[test]
    fn the_rules_refuse_what_would_leave_a_model_without_traffic_or_undo_a_retirement() {
        let now = Utc::now();
        let mut model = CatalogModel::new(spec("1"), now);
        assert!(matches!(model.retire("1"), Err(CatalogError::OnlyTraffic { .. })));
        assert!(matches!(model.set_weight("1", 0), Err(CatalogError::OnlyTraffic { .. })));
        assert!(matches!(model.add(spec("1"), 1, now), Err(CatalogError::AlreadyThere { .. })));
        assert!(matches!(model.set_weight("3", 1), Err(CatalogError::NoSuchVersion { .. })));
        assert!(matches!(model.set_shadow("1", 101), Err(CatalogError::Percent(101))));
        model.add(spec("2"), 1, now).unwrap();
        model.retire("1").unwrap();
        assert!(matches!(model.promote("1"), Err(CatalogError::Retired { .. })));
        assert!(matches!(model.set_weight("1", 5), Err(CatalogError::Retired { .. })));
        let other = ModelSpec { name: "other".into(), ..spec("9") };
        assert!(matches!(model.add(other, 1, now), Err(CatalogError::OtherModel { .. })));
    }
}

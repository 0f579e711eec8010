//! Tenants and API keys. A key is `kiln_` and 40 random base62 characters; only its SHA-256
//! is stored. Lookups are cached briefly per process, so a revoked key stops working within
//! [`Authenticator::CACHE_FOR`].

use kiln_domain::TenantId;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{error::AppError, ports::TenantDirectory};

/// A customer account; every job belongs to exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    #[serde(default)]
    pub disabled: bool,
    /// Its own limits on new jobs; None: the deployment's defaults (`JobsConfig`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::limits::TenantLimits>,
    /// Its weight in fair share across tenants on the GPUs (`kiln-admin tenant-weight`); None: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_weight: Option<u32>,
    /// The highest `priority` its jobs get (`kiln-admin tenant-priority`); None: normal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_priority: Option<kiln_domain::Priority>,
}

impl Tenant {
    /// An enabled tenant with the deployment's limits and weight 1.
    pub fn new(id: TenantId, name: impl Into<String>) -> Self {
        Self { id, name: name.into(), disabled: false, limits: None, share_weight: None, max_priority: None }
    }
}

/// A freshly made API key. Its text is shown once and never stored.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    const PREFIX: &'static str = "kiln_";

    pub fn generate() -> Self {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut rng = rand::rng();
        let body: String = (0..40).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
        Self(format!("{}{body}", Self::PREFIX))
    }

    /// Wraps a key given by an operator (e.g. a fixed key for local development).
    pub fn from_text(text: &str) -> Self {
        Self(text.to_owned())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The stored form: lowercase hex SHA-256 of the key text.
    pub fn hash(&self) -> String {
        hash_key(&self.0)
    }

    /// What the tenants directory keeps of the key, made `now`.
    pub fn stored(&self, now: chrono::DateTime<chrono::Utc>) -> crate::ports::StoredKey {
        crate::ports::StoredKey { hash: self.hash(), hint: self.hint(), created_at: now }
    }

    /// The key's last four characters, stored to tell a tenant's keys apart when listed (four
    /// of 40 random characters leave the rest unguessable).
    pub fn hint(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        chars[chars.len().saturating_sub(4)..].iter().collect()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

fn hash_key(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Turns an `Authorization` header into a tenant.
pub struct Authenticator {
    tenants: Arc<dyn TenantDirectory>,
    cache: Mutex<HashMap<String, (Instant, Tenant)>>,
}

impl Authenticator {
    /// How long a successful lookup is trusted.
    pub const CACHE_FOR: Duration = Duration::from_secs(30);
    const CACHE_ENTRIES: usize = 10_000;

    pub fn new(tenants: Arc<dyn TenantDirectory>) -> Self {
        Self { tenants, cache: Mutex::new(HashMap::new()) }
    }

    /// Checks `Authorization: Bearer <key>`.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Tenant, AppError> {
        let header = authorization
            .ok_or(AppError::Unauthorized("missing Authorization header; send `Authorization: Bearer <api key>`"))?;
        let key = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|key| !key.is_empty() && key.len() <= 256)
            .ok_or(AppError::Unauthorized("malformed Authorization header; send `Authorization: Bearer <api key>`"))?;
        let key_hash = hash_key(key);
        if let Some(tenant) = self.cached(&key_hash) {
            return Ok(tenant);
        }
        let tenant = self.tenants.tenant_by_key_hash(&key_hash).await?;
        match tenant {
            Some(tenant) if !tenant.disabled => {
                self.remember(key_hash, tenant.clone());
                Ok(tenant)
            }
            Some(_) => Err(AppError::Unauthorized("this tenant is disabled")),
            None => Err(AppError::Unauthorized("invalid API key")),
        }
    }

    fn cached(&self, key_hash: &str) -> Option<Tenant> {
        let cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.get(key_hash).filter(|(at, _)| at.elapsed() < Self::CACHE_FOR).map(|(_, tenant)| tenant.clone())
    }

    fn remember(&self, key_hash: String, tenant: Tenant) {
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if cache.len() >= Self::CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key_hash, (Instant::now(), tenant));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryTenants;

    #[tokio::test]
    async fn keys_authenticate_their_tenant_only() {
        let tenants = Arc::new(MemoryTenants::default());
        let acme = Tenant::new(TenantId::parse("acme").unwrap(), "Acme");
        tenants.create_tenant(&acme).await.unwrap();
        let key = ApiKey::generate();
        assert!(tenants.add_key(&acme.id, &key.stored(chrono::Utc::now())).await.unwrap());
        let auth = Authenticator::new(tenants.clone());

        assert_eq!(auth.authenticate(Some(&format!("Bearer {}", key.expose()))).await.unwrap(), acme);
        for bad in [None, Some("Basic abc"), Some("Bearer "), Some("Bearer kiln_wrong")] {
            assert!(matches!(auth.authenticate(bad).await, Err(AppError::Unauthorized(_))), "{bad:?}");
        }
    }

    #[test]
    fn keys_are_random_and_hashed() {
        let (a, b) = (ApiKey::generate(), ApiKey::generate());
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("kiln_") && a.expose().len() == 45);
        assert_eq!(a.hash().len(), 64);
        assert!(!format!("{a:?}").contains(a.expose()));
    }
}

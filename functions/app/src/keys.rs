//! Tenants' API keys, for operators (`kiln-admin`): make a tenant with its first key, make
//! another key for a tenant that exists, list a tenant's keys, revoke one of them.

use chrono::Utc;
use kiln_domain::TenantId;
use std::sync::Arc;

use crate::{
    auth::{ApiKey, Tenant},
    ports::{PortError, StoredKey, TenantDirectory, key_id},
};

/// Why a key operation did nothing.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no tenant `{0}`; create it with tenant-create first")]
    NoTenant(TenantId),
    #[error("tenant `{0}` already exists; use `keys create` for another key")]
    TenantExists(TenantId),
    #[error("tenant `{tenant}` has no key `{key}`")]
    NoKey { tenant: TenantId, key: String },
    #[error("`{0}` matches several keys; give more of its id")]
    Ambiguous(String),
    #[error(transparent)]
    Port(#[from] PortError),
}

/// Which key to revoke: its id as listed, or the key itself.
#[derive(Debug, Clone)]
pub enum KeyRef {
    /// `key_` and hex digits of its hash (as `keys list` shows it; a unique beginning will do).
    Id(String),
    /// The key's text.
    Secret(ApiKey),
}

/// The key operations over the tenants directory.
pub struct TenantKeys {
    tenants: Arc<dyn TenantDirectory>,
}

impl TenantKeys {
    pub fn new(tenants: Arc<dyn TenantDirectory>) -> Self {
        Self { tenants }
    }

    /// Creates a tenant and its first key.
    pub async fn create_tenant(&self, tenant: &Tenant) -> Result<ApiKey, KeyError> {
        if !self.tenants.create_tenant(tenant).await? {
            return Err(KeyError::TenantExists(tenant.id.clone()));
        }
        self.create(&tenant.id).await
    }

    /// A new key for an existing tenant (a key for a tenant that does not exist yet would
    /// become valid for whoever is later created under that id).
    pub async fn create(&self, tenant: &TenantId) -> Result<ApiKey, KeyError> {
        let key = ApiKey::generate();
        if !self.tenants.add_key(tenant, &key.stored(Utc::now())).await? {
            return Err(KeyError::NoTenant(tenant.clone()));
        }
        Ok(key)
    }

    /// The tenant's keys, oldest first.
    pub async fn list(&self, tenant: &TenantId) -> Result<Vec<StoredKey>, KeyError> {
        if self.tenants.tenant(tenant).await?.is_none() {
            return Err(KeyError::NoTenant(tenant.clone()));
        }
        let mut keys = self.tenants.keys(tenant).await?;
        keys.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.hash.cmp(&b.hash)));
        Ok(keys)
    }

    /// Revokes one of the tenant's keys (it stops working within the authenticator's cache
    /// time); another tenant's key is not touched. Returns the revoked key's id.
    pub async fn revoke(&self, tenant: &TenantId, which: &KeyRef) -> Result<String, KeyError> {
        let hash = match which {
            KeyRef::Secret(key) => key.hash(),
            KeyRef::Id(id) => {
                let keys = self.list(tenant).await?;
                let mut matching =
                    keys.iter().filter(|key| id.len() > "key_".len() && key.id().starts_with(id.as_str()));
                let first =
                    matching.next().ok_or_else(|| KeyError::NoKey { tenant: tenant.clone(), key: id.clone() })?;
                if matching.next().is_some() {
                    return Err(KeyError::Ambiguous(id.clone()));
                }
                first.hash.clone()
            }
        };
        let id = key_id(&hash);
        if !self.tenants.revoke_key(tenant, &hash).await? {
            return Err(KeyError::NoKey { tenant: tenant.clone(), key: id });
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Authenticator, memory::MemoryTenants};

    fn tenant(id: &str) -> Tenant {
        Tenant::new(TenantId::parse(id).unwrap(), id)
    }

    fn bearer(key: &ApiKey) -> String {
        format!("Bearer {}", key.expose())
    }

    #[tokio::test]
    async fn a_key_is_made_only_for_a_tenant_that_exists() {
        let directory = Arc::new(MemoryTenants::default());
        let keys = TenantKeys::new(directory.clone());
        keys.create_tenant(&tenant("acme")).await.unwrap();
        let typo = TenantId::parse("acme-inc").unwrap();
        assert!(matches!(keys.create(&typo).await, Err(KeyError::NoTenant(_))));
        assert!(directory.keys(&typo).await.unwrap().is_empty(), "a key was stored for a tenant that does not exist");
        assert!(matches!(keys.create_tenant(&tenant("acme")).await, Err(KeyError::TenantExists(_))));
    }

    #[tokio::test]
    async fn keys_are_listed_and_revoked_per_tenant() {
        let directory = Arc::new(MemoryTenants::default());
        let keys = TenantKeys::new(directory.clone());
        let acme = tenant("acme");
        let first = keys.create_tenant(&acme).await.unwrap();
        let second = keys.create(&acme.id).await.unwrap();
        let other = keys.create_tenant(&tenant("globex")).await.unwrap();
        let listed = keys.list(&acme.id).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(
            listed.iter().any(|key| key.hint == first.hint()) && listed.iter().any(|key| key.hint == second.hint())
        );
        assert!(listed.iter().all(|key| key.id().starts_with("key_") && key.id().len() == 16));

        // Another tenant's key, by id or by text, is not acme's to revoke.
        let globex_id = keys.list(&tenant("globex").id).await.unwrap()[0].id();
        assert!(matches!(keys.revoke(&acme.id, &KeyRef::Id(globex_id)).await, Err(KeyError::NoKey { .. })));
        assert!(matches!(keys.revoke(&acme.id, &KeyRef::Secret(other.clone())).await, Err(KeyError::NoKey { .. })));

        let auth = Authenticator::new(directory.clone());
        let second_id = listed.iter().find(|key| key.hint == second.hint()).unwrap().id();
        assert_eq!(keys.revoke(&acme.id, &KeyRef::Id(second_id.clone())).await.unwrap(), second_id);
        assert!(auth.authenticate(Some(&bearer(&second))).await.is_err(), "a revoked key still works");
        assert!(auth.authenticate(Some(&bearer(&first))).await.is_ok());
        assert!(auth.authenticate(Some(&bearer(&other))).await.is_ok());
        assert_eq!(keys.list(&acme.id).await.unwrap().len(), 1);
    }
}

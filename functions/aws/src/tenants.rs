//! Tenants and API key hashes in DynamoDB: `tenant#<id>` items hold the tenant, `key#<sha256>`
//! items point a key hash at its tenant.

use async_trait::async_trait;
use aws_sdk_dynamodb::{Client, types::AttributeValue};
use chrono::Utc;
use kiln_app::{
    Tenant, TenantLimits,
    ports::{PortError, TenantDirectory},
};
use kiln_domain::TenantId;

use crate::{unavailable, written};

#[derive(Clone)]
pub struct DynamoTenants {
    client: Client,
    table: String,
}

impl DynamoTenants {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }

    async fn get(&self, pk: String) -> Result<Option<std::collections::HashMap<String, AttributeValue>>, PortError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(pk))
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        Ok(output.item)
    }
}

fn corrupt(detail: impl Into<String>) -> PortError {
    PortError::Corrupt { what: "tenant", detail: detail.into() }
}

#[async_trait]
impl TenantDirectory for DynamoTenants {
    async fn tenant_by_key_hash(&self, key_hash: &str) -> Result<Option<Tenant>, PortError> {
        let Some(key) = self.get(format!("key#{key_hash}")).await? else { return Ok(None) };
        let tenant_id =
            key.get("tenant_id").and_then(|v| v.as_s().ok()).ok_or_else(|| corrupt("key without tenant_id"))?;
        self.tenant(&TenantId::parse(tenant_id).map_err(|e| corrupt(e.to_string()))?).await
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>, PortError> {
        let Some(item) = self.get(format!("tenant#{id}")).await? else { return Ok(None) };
        let name = item.get("name").and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
        let disabled = item.get("disabled").and_then(|v| v.as_bool().ok()).copied().unwrap_or(false);
        let number = |name: &str| item.get(name).and_then(|v| v.as_n().ok()).and_then(|n| n.parse::<u32>().ok());
        let limits = match (number("max_active_jobs"), number("jobs_per_minute")) {
            (Some(max_active_jobs), Some(jobs_per_minute)) => Some(TenantLimits { max_active_jobs, jobs_per_minute }),
            _ => None,
        };
        Ok(Some(Tenant { id: id.clone(), name, disabled, limits }))
    }

    async fn create_tenant(&self, tenant: &Tenant) -> Result<bool, PortError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(format!("tenant#{}", tenant.id)))
            .item("name", AttributeValue::S(tenant.name.clone()))
            .item("disabled", AttributeValue::Bool(tenant.disabled))
            .item("created_at", AttributeValue::S(Utc::now().to_rfc3339()))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        written(result)
    }

    async fn add_key(&self, tenant: &TenantId, key_hash: &str) -> Result<(), PortError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(format!("key#{key_hash}")))
            .item("tenant_id", AttributeValue::S(tenant.to_string()))
            .item("created_at", AttributeValue::S(Utc::now().to_rfc3339()))
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        Ok(())
    }

    async fn set_limits(&self, tenant: &TenantId, limits: Option<TenantLimits>) -> Result<bool, PortError> {
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(format!("tenant#{tenant}")))
            .condition_expression("attribute_exists(pk)");
        let update = match limits {
            Some(limits) => update
                .update_expression("SET max_active_jobs = :active, jobs_per_minute = :rate")
                .expression_attribute_values(":active", AttributeValue::N(limits.max_active_jobs.to_string()))
                .expression_attribute_values(":rate", AttributeValue::N(limits.jobs_per_minute.to_string())),
            None => update.update_expression("REMOVE max_active_jobs, jobs_per_minute"),
        };
        written(update.send().await)
    }

    async fn revoke_key(&self, key_hash: &str) -> Result<bool, PortError> {
        let output = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(format!("key#{key_hash}")))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        Ok(output.attributes.is_some())
    }
}

/// Webhook signing secrets, one `webhook#<tenant>` item per tenant in the tenants table, written
/// conditionally on its version.
#[async_trait]
impl kiln_app::ports::SecretStore for DynamoTenants {
    async fn secrets(&self, tenant: &TenantId) -> Result<Option<kiln_app::ports::SecretSet>, PortError> {
        let Some(item) = self.get(format!("webhook#{tenant}")).await? else { return Ok(None) };
        let text = item.get("secrets").and_then(|v| v.as_s().ok()).ok_or_else(|| corrupt("webhook secrets"))?;
        serde_json::from_str(text).map(Some).map_err(|e| corrupt(e.to_string()))
    }

    async fn put_secrets(&self, tenant: &TenantId, set: &kiln_app::ports::SecretSet) -> Result<bool, PortError> {
        let text = serde_json::to_string(set).map_err(|e| corrupt(e.to_string()))?;
        let request = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(format!("webhook#{tenant}")))
            .item("secrets", AttributeValue::S(text))
            .item("version", AttributeValue::N(set.version.to_string()));
        let request = match set.version {
            0 | 1 => request.condition_expression("attribute_not_exists(pk)"),
            previous => request
                .condition_expression("version = :previous")
                .expression_attribute_values(":previous", AttributeValue::N((previous - 1).to_string())),
        };
        written(request.send().await)
    }
}

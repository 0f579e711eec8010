//! Tenants and API key hashes in DynamoDB: `tenant#<id>` items hold the tenant, `key#<sha256>`
//! items point a key hash at its tenant.

use async_trait::async_trait;
use aws_sdk_dynamodb::{
    Client,
    operation::transact_write_items::TransactWriteItemsError,
    types::{AttributeValue, ConditionCheck, Put, TransactWriteItem},
};
use chrono::Utc;
use kiln_app::{
    Tenant, TenantLimits,
    ports::{PortError, StoredKey, TenantDirectory},
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

    /// An update of an existing tenant's item (it fails the condition when there is none).
    fn update_tenant(
        &self,
        tenant: &TenantId,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(format!("tenant#{tenant}")))
            .condition_expression("attribute_exists(pk)")
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
            (Some(max_active_jobs), Some(jobs_per_minute)) => Some(TenantLimits {
                max_active_jobs,
                jobs_per_minute,
                // Limits set before units were counted: the built-in daily units.
                units_per_day: item
                    .get("units_per_day")
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(TenantLimits::default().units_per_day),
            }),
            _ => None,
        };
        let share_weight = number("share_weight");
        let max_priority =
            item.get("max_priority").and_then(|v| v.as_s().ok()).and_then(|p| kiln_domain::Priority::parse(p));
        Ok(Some(Tenant { id: id.clone(), name, disabled, limits, share_weight, max_priority }))
    }

    async fn create_tenant(&self, tenant: &Tenant) -> Result<bool, PortError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(format!("tenant#{}", tenant.id)))
            .item("name", AttributeValue::S(tenant.name.clone()))
            .item("disabled", AttributeValue::Bool(tenant.disabled))
            .item("created_at", AttributeValue::S(Utc::now().to_rfc3339()));
        let result = match tenant.limits {
            Some(limits) => result
                .item("max_active_jobs", AttributeValue::N(limits.max_active_jobs.to_string()))
                .item("jobs_per_minute", AttributeValue::N(limits.jobs_per_minute.to_string()))
                .item("units_per_day", AttributeValue::N(limits.units_per_day.to_string())),
            None => result,
        };
        let result = match tenant.share_weight {
            Some(weight) => result.item("share_weight", AttributeValue::N(weight.to_string())),
            None => result,
        };
        let result = match tenant.max_priority {
            Some(max) => result.item("max_priority", AttributeValue::S(max.as_str().to_owned())),
            None => result,
        };
        let result = result.condition_expression("attribute_not_exists(pk)").send().await;
        written(result)
    }

    async fn add_key(&self, tenant: &TenantId, key: &StoredKey) -> Result<bool, PortError> {
        let tenant_exists = ConditionCheck::builder()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(format!("tenant#{tenant}")))
            .condition_expression("attribute_exists(pk)")
            .build()
            .map_err(|err| corrupt(err.to_string()))?;
        let put = Put::builder()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(format!("key#{}", key.hash)))
            .item("tenant_id", AttributeValue::S(tenant.to_string()))
            .item("hint", AttributeValue::S(key.hint.clone()))
            .item("created_at", AttributeValue::S(key.created_at.to_rfc3339()))
            .build()
            .map_err(|err| corrupt(err.to_string()))?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().condition_check(tenant_exists).build())
            .transact_items(TransactWriteItem::builder().put(put).build())
            .send()
            .await;
        let err = match result {
            Ok(_) => return Ok(true),
            Err(err) => err,
        };
        if let Some(TransactWriteItemsError::TransactionCanceledException(canceled)) = err.as_service_error()
            && canceled.cancellation_reasons().first().and_then(|r| r.code()) == Some("ConditionalCheckFailed")
        {
            return Ok(false);
        }
        Err(PortError::unavailable("dynamodb", err))
    }

    async fn keys(&self, tenant: &TenantId) -> Result<Vec<StoredKey>, PortError> {
        // An operator's listing: a scan of the (small) tenants table for the tenant's key items.
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .scan()
            .table_name(&self.table)
            .filter_expression("tenant_id = :tenant AND begins_with(pk, :key)")
            .expression_attribute_values(":tenant", AttributeValue::S(tenant.to_string()))
            .expression_attribute_values(":key", AttributeValue::S("key#".into()))
            .into_paginator()
            .items()
            .send();
        while let Some(item) = pages.next().await {
            let item = item.map_err(unavailable("dynamodb"))?;
            let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
            let hash = text("pk").trim_start_matches("key#").to_owned();
            let created_at = chrono::DateTime::parse_from_rfc3339(&text("created_at"))
                .map_err(|err| corrupt(format!("key created_at: {err}")))?
                .with_timezone(&Utc);
            keys.push(StoredKey { hash, hint: text("hint"), created_at });
        }
        Ok(keys)
    }

    async fn set_limits(&self, tenant: &TenantId, limits: Option<TenantLimits>) -> Result<bool, PortError> {
        let update = self.update_tenant(tenant);
        let update = match limits {
            Some(limits) => update
                .update_expression("SET max_active_jobs = :active, jobs_per_minute = :rate, units_per_day = :units")
                .expression_attribute_values(":active", AttributeValue::N(limits.max_active_jobs.to_string()))
                .expression_attribute_values(":rate", AttributeValue::N(limits.jobs_per_minute.to_string()))
                .expression_attribute_values(":units", AttributeValue::N(limits.units_per_day.to_string())),
            None => update.update_expression("REMOVE max_active_jobs, jobs_per_minute, units_per_day"),
        };
        written(update.send().await)
    }

    async fn set_share_weight(&self, tenant: &TenantId, weight: Option<u32>) -> Result<bool, PortError> {
        let update = self.update_tenant(tenant);
        let update = match weight {
            Some(weight) => update
                .update_expression("SET share_weight = :weight")
                .expression_attribute_values(":weight", AttributeValue::N(weight.to_string())),
            None => update.update_expression("REMOVE share_weight"),
        };
        written(update.send().await)
    }

    async fn set_max_priority(&self, tenant: &TenantId, max: Option<kiln_domain::Priority>) -> Result<bool, PortError> {
        let update = self.update_tenant(tenant);
        let update = match max {
            Some(max) => update
                .update_expression("SET max_priority = :max")
                .expression_attribute_values(":max", AttributeValue::S(max.as_str().to_owned())),
            None => update.update_expression("REMOVE max_priority"),
        };
        written(update.send().await)
    }

    async fn revoke_key(&self, tenant: &TenantId, key_hash: &str) -> Result<bool, PortError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(format!("key#{key_hash}")))
            .condition_expression("tenant_id = :tenant")
            .expression_attribute_values(":tenant", AttributeValue::S(tenant.to_string()))
            .send()
            .await;
        written(result)
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

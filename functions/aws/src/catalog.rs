//! The model catalog in DynamoDB: one item per model (`name`), its versions as JSON
//! (`catalog`) and a `revision` every write is conditional on. Items written before versions
//! were kept (a single `spec`) read as a model whose one version takes every request, at
//! revision 0; the first change rewrites them.

use async_trait::async_trait;
use aws_sdk_dynamodb::{Client, types::AttributeValue};
use chrono::{DateTime, Utc};
use kiln_app::ports::{ModelCatalog, PortError, StoredModel};
use kiln_domain::{CatalogModel, ModelSpec};
use std::collections::HashMap;

use crate::{unavailable, written};

#[derive(Clone)]
pub struct DynamoModelCatalog {
    client: Client,
    table: String,
}

impl DynamoModelCatalog {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }
}

fn corrupt(detail: impl ToString) -> PortError {
    PortError::Corrupt { what: "model", detail: detail.to_string() }
}

fn stored_from_item(item: &HashMap<String, AttributeValue>) -> Result<StoredModel, PortError> {
    let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok());
    let revision = item.get("revision").and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok()).unwrap_or(0);
    let model = match (text("catalog"), text("spec")) {
        (Some(catalog), _) => serde_json::from_str(catalog).map_err(corrupt)?,
        (None, Some(spec)) => {
            let spec: ModelSpec = serde_json::from_str(spec).map_err(corrupt)?;
            CatalogModel::new(spec, DateTime::<Utc>::UNIX_EPOCH)
        }
        (None, None) => return Err(corrupt("neither catalog nor spec")),
    };
    Ok(StoredModel { model, revision })
}

#[async_trait]
impl ModelCatalog for DynamoModelCatalog {
    async fn models(&self) -> Result<Vec<CatalogModel>, PortError> {
        let mut models = Vec::new();
        let mut pages = self.client.scan().table_name(&self.table).into_paginator().items().send();
        while let Some(item) = pages.next().await {
            models.push(stored_from_item(&item.map_err(unavailable("dynamodb"))?)?.model);
        }
        Ok(models)
    }

    async fn model(&self, name: &str) -> Result<Option<StoredModel>, PortError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("name", AttributeValue::S(name.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        output.item.as_ref().map(stored_from_item).transpose()
    }

    async fn put(&self, model: &CatalogModel, revision: Option<u64>) -> Result<bool, PortError> {
        let catalog = serde_json::to_string(model).map_err(corrupt)?;
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("name", AttributeValue::S(model.name.clone()))
            .item("catalog", AttributeValue::S(catalog))
            .item("revision", AttributeValue::N((revision.unwrap_or(0) + 1).to_string()));
        let put = match revision {
            None => put.condition_expression("attribute_not_exists(#name)").expression_attribute_names("#name", "name"),
            // Read from an item written before revisions were kept.
            Some(0) => put.condition_expression("attribute_not_exists(revision)"),
            Some(revision) => put
                .condition_expression("revision = :revision")
                .expression_attribute_values(":revision", AttributeValue::N(revision.to_string())),
        };
        written(put.send().await)
    }
}

//! Model descriptions in DynamoDB: one item per model, the description as JSON.

use async_trait::async_trait;
use aws_sdk_dynamodb::{Client, types::AttributeValue};
use kiln_app::ports::{ModelCatalog, PortError};
use kiln_domain::ModelSpec;

use crate::unavailable;

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

#[async_trait]
impl ModelCatalog for DynamoModelCatalog {
    async fn models(&self) -> Result<Vec<ModelSpec>, PortError> {
        let mut models = Vec::new();
        let mut pages = self.client.scan().table_name(&self.table).into_paginator().items().send();
        while let Some(item) = pages.next().await {
            let item = item.map_err(unavailable("dynamodb"))?;
            let spec = item
                .get("spec")
                .and_then(|v| v.as_s().ok())
                .ok_or(PortError::Corrupt { what: "model", detail: "no spec attribute".into() })?;
            models.push(
                serde_json::from_str(spec).map_err(|e| PortError::Corrupt { what: "model", detail: e.to_string() })?,
            );
        }
        Ok(models)
    }

    async fn publish(&self, model: &ModelSpec) -> Result<(), PortError> {
        let spec =
            serde_json::to_string(model).map_err(|e| PortError::Corrupt { what: "model", detail: e.to_string() })?;
        self.client
            .put_item()
            .table_name(&self.table)
            .item("name", AttributeValue::S(model.name.clone()))
            .item("version", AttributeValue::S(model.version.clone()))
            .item("spec", AttributeValue::S(spec))
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        Ok(())
    }
}

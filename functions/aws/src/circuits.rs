//! Webhook endpoints' circuits in the requests table: one `circuit#<tenant>#<origin>` item per
//! endpoint that failed lately (`failures` in a row, `open_until` in epoch seconds), gone a day
//! after its last failure (DynamoDB's TTL on `purge_at`).

use async_trait::async_trait;
use aws_sdk_dynamodb::{Client, types::AttributeValue, types::ReturnValue};
use chrono::{DateTime, Utc};
use kiln_app::ports::{EndpointCircuits, EndpointHealth, PortError};

use crate::unavailable;

/// How long a quiet endpoint's record is kept.
const KEEP_FOR: chrono::Duration = chrono::Duration::days(1);

#[derive(Clone)]
pub struct DynamoCircuits {
    client: Client,
    table: String,
}

impl DynamoCircuits {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }

    fn key(endpoint: &str) -> AttributeValue {
        AttributeValue::S(format!("circuit#{endpoint}"))
    }

    fn number(item: &std::collections::HashMap<String, AttributeValue>, name: &str) -> Option<i64> {
        item.get(name).and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok())
    }
}

#[async_trait]
impl EndpointCircuits for DynamoCircuits {
    async fn health(&self, endpoint: &str) -> Result<EndpointHealth, PortError> {
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", Self::key(endpoint))
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        let Some(item) = got.item else { return Ok(EndpointHealth::default()) };
        Ok(EndpointHealth {
            failures: Self::number(&item, "failures").and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
            open_until: Self::number(&item, "open_until").and_then(|at| DateTime::from_timestamp(at, 0)),
        })
    }

    async fn failed(&self, endpoint: &str) -> Result<u32, PortError> {
        let updated = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", Self::key(endpoint))
            .update_expression("ADD failures :one SET purge_at = :purge")
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":purge", AttributeValue::N((Utc::now() + KEEP_FOR).timestamp().to_string()))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        let failures = updated.attributes.as_ref().and_then(|item| Self::number(item, "failures")).unwrap_or(1);
        Ok(u32::try_from(failures).unwrap_or(u32::MAX))
    }

    async fn open(&self, endpoint: &str, until: DateTime<Utc>) -> Result<(), PortError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", Self::key(endpoint))
            .update_expression("SET open_until = :until")
            .expression_attribute_values(":until", AttributeValue::N(until.timestamp().to_string()))
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        Ok(())
    }

    async fn recovered(&self, endpoint: &str) -> Result<(), PortError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", Self::key(endpoint))
            .update_expression("SET failures = :none REMOVE open_until")
            .expression_attribute_values(":none", AttributeValue::N("0".into()))
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        Ok(())
    }
}

//! Runners' capacity per model in DynamoDB: one item per model in the requests table
//! (`fleet#<model>`), one attribute per runner (`r_<runner>`, its last report as JSON). A report
//! is one UpdateItem that also removes the runners it was told to forget; reading the board is
//! one GetItem. DynamoDB's TTL removes the item a day after its last report.

use async_trait::async_trait;
use aws_sdk_dynamodb::{
    Client,
    types::{AttributeValue, ReturnValue},
};
use chrono::Utc;
use kiln_app::ports::{FleetBoard, PortError, RunnerReport};
use std::collections::HashMap;

use crate::unavailable;

/// How long a model's board outlives its last report.
const BOARD_RETENTION_SECS: i64 = 24 * 3600;
const RUNNER_PREFIX: &str = "r_";

/// [`FleetBoard`] over the requests table.
#[derive(Clone)]
pub struct DynamoFleet {
    client: Client,
    table: String,
}

impl DynamoFleet {
    pub fn new(client: Client, requests_table: impl Into<String>) -> Self {
        Self { client, table: requests_table.into() }
    }
}

fn board_pk(model: &str) -> String {
    format!("fleet#{model}")
}

fn reports_of(item: &HashMap<String, AttributeValue>) -> Vec<RunnerReport> {
    item.iter()
        .filter(|(name, _)| name.starts_with(RUNNER_PREFIX))
        // An entry that does not decode (a newer runner's) is left out, not fatal.
        .filter_map(|(_, value)| value.as_s().ok().and_then(|json| serde_json::from_str(json).ok()))
        .collect()
}

#[async_trait]
impl FleetBoard for DynamoFleet {
    async fn report(
        &self,
        model: &str,
        report: &RunnerReport,
        forget: &[String],
    ) -> Result<Vec<RunnerReport>, PortError> {
        let json = serde_json::to_string(report)
            .map_err(|e| PortError::Corrupt { what: "runner report", detail: e.to_string() })?;
        let mut expression = "SET #me = :report, purge_at = :purge".to_owned();
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(board_pk(model)))
            .expression_attribute_names("#me", format!("{RUNNER_PREFIX}{}", report.runner))
            .expression_attribute_values(":report", AttributeValue::S(json))
            .expression_attribute_values(
                ":purge",
                AttributeValue::N((Utc::now().timestamp() + BOARD_RETENTION_SECS).to_string()),
            );
        let gone: Vec<&String> = forget.iter().filter(|runner| **runner != report.runner).collect();
        if !gone.is_empty() {
            let names: Vec<String> = (0..gone.len()).map(|i| format!("#gone{i}")).collect();
            expression.push_str(&format!(" REMOVE {}", names.join(", ")));
            for (name, runner) in names.iter().zip(gone) {
                update = update.expression_attribute_names(name, format!("{RUNNER_PREFIX}{runner}"));
            }
        }
        let output = update
            .update_expression(expression)
            .return_values(ReturnValue::AllNew)
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        Ok(output.attributes.as_ref().map(reports_of).unwrap_or_default())
    }

    async fn reports(&self, model: &str) -> Result<Vec<RunnerReport>, PortError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(board_pk(model)))
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        Ok(output.item.as_ref().map(reports_of).unwrap_or_default())
    }
}

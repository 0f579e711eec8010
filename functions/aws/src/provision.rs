//! Creates the data layer (tables, queues, bucket) described by `terraform/stack.json`, the
//! same file terraform reads, so the local stack and the tests run against what AWS runs.
//! Creating what already exists is not an error.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType,
    ScalarAttributeType, TimeToLiveSpecification,
};
use aws_sdk_sqs::types::QueueAttributeName;
use serde::Deserialize;
use std::collections::BTreeMap;

use crate::config::{AwsClients, Resources};

/// The shape of the data layer.
pub const STACK_JSON: &str = include_str!("../../../terraform/stack.json");

#[derive(Debug, Deserialize)]
pub struct Stack {
    pub tables: BTreeMap<String, TableSpec>,
    pub queues: BTreeMap<String, QueueSpec>,
    pub buckets: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct TableSpec {
    pub hash_key: String,
    pub attributes: BTreeMap<String, String>,
    pub indexes: Vec<IndexSpec>,
    pub ttl_attribute: Option<String>,
    /// A DynamoDB stream of changes (`NEW_AND_OLD_IMAGES`): the jobs table's feeds webhooks.
    #[serde(default)]
    pub stream: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct IndexSpec {
    pub name: String,
    pub hash_key: String,
    pub range_key: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct QueueSpec {
    pub visibility_timeout_seconds: u32,
    pub receive_wait_time_seconds: u32,
    pub message_retention_seconds: u32,
    pub dead_letter: DeadLetterSpec,
}

#[derive(Debug, Deserialize)]
pub struct DeadLetterSpec {
    pub max_receive_count: u32,
    pub message_retention_seconds: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("terraform/stack.json is invalid: {0}")]
    Stack(#[from] serde_json::Error),
    #[error("creating {what}")]
    Aws {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Stack {
    pub fn load() -> Result<Self, ProvisionError> {
        Ok(serde_json::from_str(STACK_JSON)?)
    }
}

fn aws_error<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> ProvisionError {
    let what = what.into();
    move |err| ProvisionError::Aws { what, source: Box::new(err) }
}

fn key(name: &str, key_type: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder().attribute_name(name).key_type(key_type).build().expect("name and type are set")
}

/// Creates every resource with names `<prefix>-<name>` and returns their names and URLs.
pub async fn provision(
    clients: &AwsClients,
    prefix: &str,
    endpoint_url: Option<&str>,
) -> Result<Resources, ProvisionError> {
    let stack = Stack::load()?;
    for (name, table) in &stack.tables {
        create_table(clients, &format!("{prefix}-{name}"), table).await?;
    }
    let mut queue_urls = BTreeMap::new();
    for (name, queue) in &stack.queues {
        queue_urls.insert(name.clone(), create_queue(clients, &format!("{prefix}-{name}"), queue).await?);
    }
    for name in stack.buckets.keys() {
        let bucket = format!("{prefix}-{name}");
        let result = clients.s3().create_bucket().bucket(&bucket).send().await;
        if let Err(err) = result {
            let code = err.as_service_error().map(|e| e.meta().code().unwrap_or_default().to_owned());
            if !matches!(code.as_deref(), Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")) {
                return Err(aws_error(format!("bucket {bucket}"))(err));
            }
        }
    }
    Ok(Resources {
        jobs_table: format!("{prefix}-jobs"),
        requests_table: format!("{prefix}-requests"),
        tenants_table: format!("{prefix}-tenants"),
        models_table: format!("{prefix}-models"),
        job_queue_url: queue_urls.remove("jobs").unwrap_or_default(),
        webhook_queue_url: queue_urls.remove("webhooks").unwrap_or_default(),
        artifacts_bucket: format!("{prefix}-artifacts"),
        endpoint_url: endpoint_url.map(str::to_owned),
    })
}

async fn create_table(clients: &AwsClients, name: &str, spec: &TableSpec) -> Result<(), ProvisionError> {
    let attribute_type = |t: &str| if t == "N" { ScalarAttributeType::N } else { ScalarAttributeType::S };
    let mut request = clients
        .dynamodb()
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key(&spec.hash_key, KeyType::Hash));
    for (attribute, kind) in &spec.attributes {
        request = request.attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(attribute)
                .attribute_type(attribute_type(kind))
                .build()
                .expect("name and type are set"),
        );
    }
    for index in &spec.indexes {
        let mut schema = vec![key(&index.hash_key, KeyType::Hash)];
        schema.extend(index.range_key.as_deref().map(|range| key(range, KeyType::Range)));
        request = request.global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(&index.name)
                .set_key_schema(Some(schema))
                .projection(Projection::builder().projection_type(ProjectionType::All).build())
                .build()
                .expect("name, schema and projection are set"),
        );
    }
    if let Some(view) = &spec.stream {
        request = request.stream_specification(
            aws_sdk_dynamodb::types::StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(view.as_str().into())
                .build()
                .map_err(aws_error(format!("stream of {name}")))?,
        );
    }
    match request.send().await {
        Ok(_) => {}
        Err(err) if err.as_service_error().is_some_and(|e| e.is_resource_in_use_exception()) => return Ok(()),
        Err(err) => return Err(aws_error(format!("table {name}"))(err)),
    }
    if let Some(attribute) = &spec.ttl_attribute {
        clients
            .dynamodb()
            .update_time_to_live()
            .table_name(name)
            .time_to_live_specification(
                TimeToLiveSpecification::builder().attribute_name(attribute).enabled(true).build().expect("set"),
            )
            .send()
            .await
            .map_err(aws_error(format!("time to live of {name}")))?;
    }
    Ok(())
}

async fn create_queue(clients: &AwsClients, name: &str, spec: &QueueSpec) -> Result<String, ProvisionError> {
    let dlq_name = format!("{name}-dlq");
    let dlq_url = clients
        .sqs()
        .create_queue()
        .queue_name(&dlq_name)
        .attributes(QueueAttributeName::MessageRetentionPeriod, spec.dead_letter.message_retention_seconds.to_string())
        .send()
        .await
        .map_err(aws_error(format!("queue {dlq_name}")))?
        .queue_url
        .unwrap_or_default();
    let dlq_arn = clients
        .sqs()
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(aws_error(format!("queue {dlq_name}")))?
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .unwrap_or_default();
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": spec.dead_letter.max_receive_count.to_string(),
    });
    let url = clients
        .sqs()
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::VisibilityTimeout, spec.visibility_timeout_seconds.to_string())
        .attributes(QueueAttributeName::ReceiveMessageWaitTimeSeconds, spec.receive_wait_time_seconds.to_string())
        .attributes(QueueAttributeName::MessageRetentionPeriod, spec.message_retention_seconds.to_string())
        .attributes(QueueAttributeName::RedrivePolicy, redrive.to_string())
        .send()
        .await
        .map_err(aws_error(format!("queue {name}")))?
        .queue_url
        .unwrap_or_default();
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stack_file_parses_and_indexes_name_declared_attributes() {
        let stack = Stack::load().unwrap();
        for (name, table) in &stack.tables {
            assert!(table.attributes.contains_key(&table.hash_key), "{name}");
            for index in &table.indexes {
                assert!(table.attributes.contains_key(&index.hash_key), "{name}.{}", index.name);
                if let Some(range) = &index.range_key {
                    assert!(table.attributes.contains_key(range), "{name}.{}", index.name);
                }
            }
        }
        assert!(stack.queues.contains_key("jobs"));
        assert!(stack.buckets.contains_key("artifacts"));
    }
}

//! The AWS side of the ports: DynamoDB stores, the SQS job queue, S3 download links. Also the
//! one place that builds the SDK configuration, and the provisioning of the data layer from
//! `terraform/stack.json` for the local stack and the tests.

pub mod artifacts;
pub mod catalog;
pub mod circuits;
pub mod config;
pub mod counting;
pub mod fleet;
pub mod jobs;
pub mod links;
pub mod provision;
pub mod queue;
pub mod tenants;
pub mod wiring;

pub use artifacts::S3ArtifactStore;
pub use catalog::DynamoModelCatalog;
pub use circuits::DynamoCircuits;
pub use config::{AwsClients, Resources, load_sdk_config};
pub use counting::{AwsCallCounters, CallCounter};
pub use fleet::DynamoFleet;
pub use jobs::DynamoJobStore;
pub use links::S3ArtifactLinks;
pub use queue::{SqsJobQueue, SqsWebhookQueue, SqsWorkQueue};
pub use tenants::DynamoTenants;
pub use wiring::AwsPorts;

use kiln_app::ports::PortError;

/// A DynamoDB conditional failure (`ConditionalCheckFailedException`): the item was not as the
/// write required.
pub(crate) fn is_conditional_failure<E, R>(err: &aws_sdk_dynamodb::error::SdkError<E, R>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    err.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException")
}

/// A conditional write's answer: true when written, false when its condition failed.
pub(crate) fn written<T, E, R>(result: Result<T, aws_sdk_dynamodb::error::SdkError<E, R>>) -> Result<bool, PortError>
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match result {
        Ok(_) => Ok(true),
        Err(err) if is_conditional_failure(&err) => Ok(false),
        Err(err) => Err(PortError::unavailable("dynamodb", err)),
    }
}

/// Wraps an SDK error, keeping it as the source.
pub(crate) fn unavailable<E>(backend: &'static str) -> impl FnOnce(E) -> PortError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |err| PortError::unavailable(backend, err)
}

//! The AWS side of the ports: DynamoDB stores, the SQS job queue, S3 download links. Also the
//! one place that builds the SDK configuration, and the provisioning of the data layer from
//! `terraform/stack.json` for the local stack and the tests.

pub mod artifacts;
pub mod catalog;
pub mod config;
pub mod counting;
pub mod jobs;
pub mod links;
pub mod provision;
pub mod queue;
pub mod tenants;

pub use artifacts::S3ArtifactStore;
pub use catalog::DynamoModelCatalog;
pub use config::{AwsClients, Resources, load_sdk_config};
pub use counting::{AwsCallCounters, CallCounter};
pub use jobs::DynamoJobStore;
pub use links::S3ArtifactLinks;
pub use queue::{SqsJobQueue, SqsWebhookQueue, SqsWorkQueue};
pub use tenants::DynamoTenants;

use kiln_app::ports::PortError;

/// Wraps an SDK error, keeping it as the source.
pub(crate) fn unavailable<E>(backend: &'static str) -> impl FnOnce(E) -> PortError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |err| PortError::unavailable(backend, err)
}

//! The HTTP API as Lambda handlers. Every route is served by the same [`Api::handle`], whether
//! the request came from API Gateway (through `lambda_http`) or from the local HTTP server.
//! Each Lambda function (one binary under `src/bin/`) serves one [`Function`]'s routes.

pub mod config;
pub mod dead_letters;
pub mod deliver;
pub mod error;
pub mod inbox;
pub mod job_events;
pub mod lambda;
pub mod routes;
pub mod sweeper;
pub mod views;

pub use config::ApiConfig;
pub use routes::{Api, Function, Ports, Route};

/// The webhook use cases on AWS: the jobs table, the webhook queue, secrets in the tenants table.
pub fn webhooks_on(clients: &kiln_aws::AwsClients, config: &ApiConfig) -> kiln_app::Webhooks {
    let r = &config.resources;
    kiln_app::Webhooks::new(
        std::sync::Arc::new(kiln_aws::DynamoJobStore::new(clients.dynamodb.clone(), &r.jobs_table, &r.requests_table)),
        std::sync::Arc::new(kiln_aws::SqsWebhookQueue::new(clients.sqs.clone(), &r.webhook_queue_url)),
        std::sync::Arc::new(kiln_aws::DynamoTenants::new(clients.dynamodb.clone(), &r.tenants_table)),
    )
}

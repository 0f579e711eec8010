//! The one place that builds the AWS adapters of the ports, from one set of clients and the
//! resources terraform names. Every entry point that has the resources (each Lambda function,
//! the runner, the local stack) wires its ports here, taking only those it uses (see
//! [`kiln_app::wiring`]); [`AwsPorts::all`] wires every one. (`kiln-admin` knows only two table
//! names and builds those two adapters itself.)

use kiln_app::{
    Ports,
    ports::{
        ArtifactLinks, ArtifactStore, EndpointCircuits, FleetBoard, JobQueue, JobStore, ModelCatalog, ObjectStore,
        SecretStore, TenantDirectory, WebhookQueue, WorkQueue,
    },
};
use std::sync::Arc;

use crate::{
    AwsClients, DynamoCircuits, DynamoFleet, DynamoJobStore, DynamoModelCatalog, DynamoTenants, Resources,
    S3ArtifactLinks, S3ArtifactStore, SqsJobQueue, SqsWebhookQueue, SqsWorkQueue,
};

/// The AWS adapters of every port, each built on demand.
#[derive(Clone, Debug)]
pub struct AwsPorts {
    pub clients: AwsClients,
    pub resources: Resources,
}

impl AwsPorts {
    pub fn new(clients: AwsClients, resources: Resources) -> Self {
        Self { clients, resources }
    }

    /// Clients for `resources` (on their endpoint, when one is set: the local moto server).
    pub async fn connect(resources: &Resources) -> Self {
        Self::new(AwsClients::connect(resources.endpoint_url.as_deref()).await, resources.clone())
    }

    /// A Lambda function's clients for `resources` (see [`crate::config::lambda_sdk_config`]).
    pub fn for_lambda(resources: &Resources) -> Self {
        Self::new(AwsClients::for_lambda(resources.endpoint_url.as_deref()), resources.clone())
    }

    /// Nothing wired yet: start from here and set the ports an entry point uses.
    pub fn none(&self) -> Ports {
        Ports::unwired()
    }

    /// Every port wired (the local stack, tests, tools).
    pub fn all(&self) -> Ports {
        Ports {
            store: self.job_store(),
            queue: self.job_queue(),
            work_queue: self.work_queue(),
            catalog: self.catalog(),
            tenants: self.tenants(),
            secrets: self.secrets(),
            webhook_queue: self.webhook_queue(),
            circuits: self.circuits(),
            links: self.links(),
            artifacts: self.artifacts(),
            objects: self.objects(),
            fleet: self.fleet(),
        }
    }

    /// Runners' capacity per model: the requests table.
    pub fn fleet(&self) -> Arc<dyn FleetBoard> {
        Arc::new(DynamoFleet::new(self.clients.dynamodb().clone(), &self.resources.requests_table))
    }

    /// Jobs and request records: the jobs and requests tables.
    pub fn job_store(&self) -> Arc<dyn JobStore> {
        let r = &self.resources;
        Arc::new(DynamoJobStore::new(self.clients.dynamodb().clone(), &r.jobs_table, &r.requests_table))
    }

    /// Sending new jobs: the job queue.
    pub fn job_queue(&self) -> Arc<dyn JobQueue> {
        Arc::new(SqsJobQueue::new(self.clients.sqs().clone(), &self.resources.job_queue_url))
    }

    /// Receiving jobs (the runner): the job queue.
    pub fn work_queue(&self) -> Arc<dyn WorkQueue> {
        Arc::new(SqsWorkQueue::new(self.clients.sqs().clone(), &self.resources.job_queue_url))
    }

    /// The models table.
    pub fn catalog(&self) -> Arc<dyn ModelCatalog> {
        Arc::new(DynamoModelCatalog::new(self.clients.dynamodb().clone(), &self.resources.models_table))
    }

    /// Tenants and key hashes: the tenants table.
    pub fn tenants(&self) -> Arc<dyn TenantDirectory> {
        Arc::new(self.dynamo_tenants())
    }

    /// Webhook signing secrets: the tenants table.
    pub fn secrets(&self) -> Arc<dyn SecretStore> {
        Arc::new(self.dynamo_tenants())
    }

    /// The tenants table's adapter itself (tenants, keys, secrets).
    pub fn dynamo_tenants(&self) -> DynamoTenants {
        DynamoTenants::new(self.clients.dynamodb().clone(), &self.resources.tenants_table)
    }

    /// The webhook queue.
    pub fn webhook_queue(&self) -> Arc<dyn WebhookQueue> {
        Arc::new(SqsWebhookQueue::new(self.clients.sqs().clone(), &self.resources.webhook_queue_url))
    }

    /// Webhook endpoints' circuits: the requests table.
    pub fn circuits(&self) -> Arc<dyn EndpointCircuits> {
        Arc::new(DynamoCircuits::new(self.clients.dynamodb().clone(), &self.resources.requests_table))
    }

    /// Presigned links into the artifacts bucket.
    pub fn links(&self) -> Arc<dyn ArtifactLinks> {
        Arc::new(S3ArtifactLinks::new(self.clients.s3().clone(), &self.resources.artifacts_bucket))
    }

    /// Writing objects into the artifacts bucket.
    pub fn artifacts(&self) -> Arc<dyn ArtifactStore> {
        Arc::new(S3ArtifactStore::new(self.clients.s3().clone(), &self.resources.artifacts_bucket))
    }

    /// Reading and copying objects of the artifacts bucket (the inbox, outboxes).
    pub fn objects(&self) -> Arc<dyn ObjectStore> {
        Arc::new(S3ArtifactStore::new(self.clients.s3().clone(), &self.resources.artifacts_bucket))
    }
}

//! One local deployment: the data layer on an AWS endpoint (moto), models published, the API
//! served on 127.0.0.1.

use anyhow::Context;
use aws_lambda_events::sqs::SqsMessage;
use kiln_api::{Api, ApiConfig, dead_letters, routes::Ports};
use kiln_app::{
    ApiKey, Tenant,
    ports::{ModelCatalog, TenantDirectory},
};
use kiln_aws::{AwsClients, DynamoModelCatalog, DynamoTenants, Resources, provision::provision};
use kiln_domain::{ModelSpec, TenantId};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// The workspace root (where `.venv`, `terraform/` and `gpu-runner/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap_or_else(|_| PathBuf::from("."))
}

/// How to set up a local deployment.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Resource names are `<prefix>-<name>`, as in terraform.
    pub prefix: String,
    /// Where the API listens (port 0 picks a free one).
    pub api_addr: SocketAddr,
    /// Seconds a queued job waits for a runner before it expires.
    pub queued_ttl_secs: u32,
    /// Accept http:// and loopback webhook URLs.
    pub allow_local_webhooks: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            prefix: "kiln".into(),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            queued_ttl_secs: 3600,
            allow_local_webhooks: true,
        }
    }
}

/// A running local deployment. The API server stops when this is dropped or stopped.
pub struct LocalStack {
    pub resources: Resources,
    pub clients: AwsClients,
    pub api: Arc<Api>,
    pub api_url: String,
    pub config: ApiConfig,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    relay: Option<JoinHandle<()>>,
}

impl LocalStack {
    /// Creates the resources on `endpoint_url` and starts serving the API.
    pub async fn start(endpoint_url: &str, options: StackOptions) -> anyhow::Result<Self> {
        let clients = AwsClients::connect(Some(endpoint_url)).await;
        let resources = provision(&clients, &options.prefix, Some(endpoint_url)).await.context("provisioning")?;
        let mut config = ApiConfig::for_resources(resources.clone());
        config.queued_ttl_secs = options.queued_ttl_secs;
        config.allow_local_webhooks = options.allow_local_webhooks;
        Self::serve(clients, resources, config, options.api_addr).await
    }

    /// Serves the API with `config` on resources that already exist.
    pub async fn serve(
        clients: AwsClients,
        resources: Resources,
        config: ApiConfig,
        api_addr: SocketAddr,
    ) -> anyhow::Result<Self> {
        let api = Arc::new(Api::new(Ports::aws(&clients, &config), &config));
        let listener = TcpListener::bind(api_addr).await.with_context(|| format!("binding {api_addr}"))?;
        let api_url = format!("http://{}", listener.local_addr()?);
        let (shutdown, stopped) = oneshot::channel();
        let server = tokio::spawn(crate::server::serve(listener, api.clone(), async {
            let _ = stopped.await;
        }));
        Ok(Self {
            resources,
            clients,
            api,
            api_url,
            config,
            shutdown: Some(shutdown),
            server: Some(server),
            relay: None,
        })
    }

    /// Publishes every model package under `dir` to the model catalog.
    pub async fn publish_models(&self, dir: &Path) -> anyhow::Result<Vec<ModelSpec>> {
        let mut published = Vec::new();
        for (_, model) in ModelSpec::read_packages(dir)? {
            self.publish_model(&model).await?;
            published.push(model);
        }
        Ok(published)
    }

    pub async fn publish_model(&self, model: &ModelSpec) -> anyhow::Result<()> {
        DynamoModelCatalog::new(self.clients.dynamodb.clone(), &self.resources.models_table).publish(model).await?;
        Ok(())
    }

    /// Creates a tenant (if new) with a fresh API key, and returns the key.
    pub async fn create_tenant(&self, id: &str, name: &str) -> anyhow::Result<ApiKey> {
        let key = ApiKey::generate();
        self.add_tenant_key(id, name, &key).await?;
        Ok(key)
    }

    /// Creates a tenant (if new) and gives it `key`.
    pub async fn add_tenant_key(&self, id: &str, name: &str, key: &ApiKey) -> anyhow::Result<()> {
        let tenants = DynamoTenants::new(self.clients.dynamodb.clone(), &self.resources.tenants_table);
        let tenant = Tenant { id: TenantId::parse(id)?, name: name.into(), disabled: false };
        tenants.create_tenant(&tenant).await?;
        tenants.add_key(&tenant.id, &key.hash()).await?;
        Ok(())
    }

    /// The job queue's dead-letter queue (named `<job queue>-dlq`, as provisioning creates it).
    pub fn dead_letter_queue_url(&self) -> String {
        format!("{}-dlq", self.resources.job_queue_url)
    }

    /// Feeds the dead-letter queue to the `job-dead-letters` handler, as its SQS trigger does in
    /// AWS, until the stack stops.
    pub fn start_dead_letter_relay(&mut self) {
        let (sqs, api, url) = (self.clients.sqs.clone(), self.api.clone(), self.dead_letter_queue_url());
        self.relay = Some(tokio::spawn(async move {
            loop {
                let received = sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                    .send()
                    .await;
                let Ok(received) = received else {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                };
                for message in received.messages.unwrap_or_default() {
                    let mut record = SqsMessage::default();
                    record.message_id = message.message_id.clone();
                    record.body = message.body.clone();
                    record.attributes = message
                        .attributes
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(name, value)| (name.as_str().to_owned(), value))
                        .collect();
                    if dead_letters::handle_record(&api, &record).await.is_ok()
                        && let Some(receipt) = message.receipt_handle
                    {
                        let _ = sqs.delete_message().queue_url(&url).receipt_handle(receipt).send().await;
                    }
                }
            }
        }));
    }

    /// Stops the API server.
    pub async fn stop(mut self) {
        if let Some(relay) = self.relay.take() {
            relay.abort();
        }
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        if let Some(relay) = self.relay.take() {
            relay.abort();
        }
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

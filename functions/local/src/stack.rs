//! One local deployment: the data layer on an AWS endpoint (moto), models published, the API
//! served on 127.0.0.1.

use crate::faults::{FaultPlan, FaultProxy};
use anyhow::Context;
use kiln_api::Api;
use kiln_app::{ApiKey, Tenant};
use kiln_aws::{AwsClients, AwsPorts, Resources, provision::provision};
use kiln_domain::{ModelSpec, TenantId};
use kiln_events::{deliver_webhooks::DeliveryConfig, inbox_trigger, job_dead_letters, job_events};
use kiln_lambda::FunctionConfig;
use std::time::Duration;
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
    /// Seconds outputs are kept after their job ends (the bucket's lifecycle in a deployment;
    /// moto does not run lifecycles, so locally it only decides what the cache still serves).
    pub output_retention_secs: u64,
    /// Seconds a download link stays valid.
    pub link_ttl_secs: u32,
    /// Seconds the API reuses the model catalog it read.
    pub catalog_ttl_secs: u64,
    /// Accept http:// and loopback webhook URLs (and deliver to them).
    pub allow_local_webhooks: bool,
    /// First webhook retry delay in seconds (the cap is 4× this); short locally so tests see
    /// retries and the DLQ in seconds.
    pub webhook_retry_base_secs: u64,
    /// Put a fault-injecting proxy between every client of the stack and moto (see
    /// [`crate::faults`]); it injects nothing until [`LocalStack::start_faults`].
    pub faults: Option<FaultPlan>,
    /// Print the API's and the webhook deliverer's metric lines (CloudWatch Embedded Metric
    /// Format, as the deployed functions write them) on stdout.
    pub emit_metrics: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            prefix: "kiln".into(),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            queued_ttl_secs: 3600,
            output_retention_secs: 30 * 24 * 3600,
            link_ttl_secs: 3600,
            catalog_ttl_secs: 30,
            allow_local_webhooks: true,
            webhook_retry_base_secs: 1,
            faults: None,
            emit_metrics: false,
        }
    }
}

/// What a stack's own machinery talks to: the backend itself, and the fault proxy in front of
/// it (when there is one) that the stack's functions talk to instead.
struct Backend {
    direct: AwsClients,
    /// The endpoint of `direct` (moto's URL).
    endpoint: String,
    fault_proxy: Option<FaultProxy>,
}

/// A running local deployment. The API server stops when this is dropped or stopped.
pub struct LocalStack {
    /// The resources as the stack's functions and runners see them (with the fault proxy's
    /// endpoint when there is one).
    pub resources: Resources,
    /// The clients of the stack's functions (through the fault proxy when there is one).
    pub clients: AwsClients,
    /// Clients straight to the backend, never faulted: what stands in for AWS's own machinery
    /// (the relays' event sources), and what checks the stack from outside.
    pub direct: AwsClients,
    /// The endpoint of `direct` (moto's URL).
    direct_endpoint: String,
    fault_proxy: Option<FaultProxy>,
    /// Every port on the stack's resources (what `kiln-aws` wires for each function).
    pub aws: AwsPorts,
    pub api: Arc<Api>,
    pub api_url: String,
    pub config: FunctionConfig,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    relays: Vec<JoinHandle<()>>,
    options: StackOptions,
}

impl LocalStack {
    /// Creates the resources on `endpoint_url` and starts serving the API; with
    /// `options.faults`, behind a fault proxy of its own.
    pub async fn start(endpoint_url: &str, options: StackOptions) -> anyhow::Result<Self> {
        let direct = AwsClients::connect(Some(endpoint_url)).await;
        let mut resources = provision(&direct, &options.prefix, Some(endpoint_url)).await.context("provisioning")?;
        let fault_proxy = match &options.faults {
            Some(plan) => {
                Some(FaultProxy::start(endpoint_url, plan.clone()).await.context("starting the fault proxy")?)
            }
            None => None,
        };
        let clients = match &fault_proxy {
            Some(proxy) => {
                resources.endpoint_url = Some(proxy.url.clone());
                AwsClients::connect(Some(&proxy.url)).await
            }
            None => direct.clone(),
        };
        let mut config = FunctionConfig::for_resources(resources.clone());
        config.queued_ttl_secs = options.queued_ttl_secs;
        config.catalog_ttl_secs = options.catalog_ttl_secs;
        config.output_retention_secs = options.output_retention_secs;
        config.link_ttl_secs = options.link_ttl_secs;
        config.allow_local_webhooks = options.allow_local_webhooks;
        config.emit_metrics = options.emit_metrics;
        let backend = Backend { direct, endpoint: endpoint_url.to_owned(), fault_proxy };
        Self::serve_on(clients, backend, resources, config, options).await
    }

    /// Starts injecting the fault plan's faults (when the stack has a fault proxy).
    pub fn start_faults(&self) {
        if let Some(proxy) = &self.fault_proxy {
            proxy.start_faults();
        }
    }

    /// The fault proxy, when the stack runs behind one.
    pub fn faults(&self) -> Option<&FaultProxy> {
        self.fault_proxy.as_ref()
    }

    /// Serves the API with `config` on resources that already exist, reached by `clients`
    /// with no fault proxy between.
    pub async fn serve(
        clients: AwsClients,
        resources: Resources,
        config: FunctionConfig,
        options: StackOptions,
    ) -> anyhow::Result<Self> {
        let endpoint = resources.endpoint_url.clone().unwrap_or_default();
        let backend = Backend { direct: clients.clone(), endpoint, fault_proxy: None };
        Self::serve_on(clients, backend, resources, config, options).await
    }

    async fn serve_on(
        clients: AwsClients,
        backend: Backend,
        resources: Resources,
        config: FunctionConfig,
        options: StackOptions,
    ) -> anyhow::Result<Self> {
        let api_addr = options.api_addr;
        let aws = AwsPorts::new(clients.clone(), resources.clone());
        let api = Arc::new(Api::new(&aws.all(), &config));
        let listener = TcpListener::bind(api_addr).await.with_context(|| format!("binding {api_addr}"))?;
        let api_url = format!("http://{}", listener.local_addr()?);
        let (shutdown, stopped) = oneshot::channel();
        let server = tokio::spawn(crate::server::serve(listener, api.clone(), async {
            let _ = stopped.await;
        }));
        Ok(Self {
            resources,
            clients,
            direct: backend.direct,
            direct_endpoint: backend.endpoint,
            fault_proxy: backend.fault_proxy,
            aws,
            api,
            api_url,
            config,
            shutdown: Some(shutdown),
            server: Some(server),
            relays: Vec::new(),
            options,
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

    /// Offers a model package's version to the catalog, as a runner's start does (a new model
    /// takes every request; a new version of a known one is a candidate, with no traffic).
    pub async fn publish_model(&self, model: &ModelSpec) -> anyhow::Result<kiln_domain::Offered> {
        Ok(kiln_app::catalog::Catalog::new(self.aws.catalog()).offer(model).await?)
    }

    /// Creates a tenant (if new) with a fresh API key, and returns the key.
    pub async fn create_tenant(&self, id: &str, name: &str) -> anyhow::Result<ApiKey> {
        let key = ApiKey::generate();
        self.add_tenant_key(id, name, &key).await?;
        Ok(key)
    }

    /// Creates a tenant (if new) with its own `limits`, and a fresh API key; returns the key.
    pub async fn create_tenant_with_limits(&self, id: &str, limits: kiln_app::TenantLimits) -> anyhow::Result<ApiKey> {
        let key = ApiKey::generate();
        self.add_key_to(
            Tenant {
                id: TenantId::parse(id)?,
                name: id.into(),
                disabled: false,
                limits: Some(limits),
                share_weight: None,
                max_priority: None,
            },
            &key,
        )
        .await?;
        Ok(key)
    }

    /// Creates a tenant (if new) and gives it `key`.
    pub async fn add_tenant_key(&self, id: &str, name: &str, key: &ApiKey) -> anyhow::Result<()> {
        self.add_key_to(
            Tenant {
                id: TenantId::parse(id)?,
                name: name.into(),
                disabled: false,
                limits: None,
                share_weight: None,
                max_priority: None,
            },
            key,
        )
        .await
    }

    async fn add_key_to(&self, tenant: Tenant, key: &ApiKey) -> anyhow::Result<()> {
        let tenants = self.aws.tenants();
        tenants.create_tenant(&tenant).await?;
        anyhow::ensure!(tenants.add_key(&tenant.id, &key.stored(chrono::Utc::now())).await?, "no tenant {}", tenant.id);
        Ok(())
    }

    /// The URL of stack.json's queue `name` (`<prefix>-<name>`, beside the job queue).
    pub fn queue_url(&self, name: &str) -> String {
        let jobs = &self.resources.job_queue_url;
        format!("{}{name}", jobs.strip_suffix("jobs").unwrap_or(jobs))
    }

    /// The job queue's dead-letter queue (named `<job queue>-dlq`, as provisioning creates it).
    pub fn dead_letter_queue_url(&self) -> String {
        format!("{}-dlq", self.resources.job_queue_url)
    }

    /// Starts what AWS would run between the functions (see [`crate::relays`]): the dead-letter
    /// function on the job DLQ, `job-events` on the jobs table's stream, `deliver-webhooks` on
    /// the webhook queue, and `inbox-trigger` on the bucket's `inbox/` notifications (sent to an
    /// SQS queue here). Runs until the stack stops.
    pub async fn start_relays(&mut self) -> anyhow::Result<()> {
        // Event sources are AWS's machinery: polled straight from the backend, never faulted.
        let sqs = self.direct.sqs().clone();
        self.relays.push(crate::relays::relay_function(
            sqs.clone(),
            self.dead_letter_queue_url(),
            Arc::new(job_dead_letters::wire(&self.aws)),
            Duration::from_secs(30),
            job_dead_letters::handle,
        ));
        let endpoint = self.direct_endpoint.clone();
        let changes = Arc::new(job_events::wire(&self.aws));
        self.relays.push(crate::relays::relay_job_stream(&endpoint, self.resources.jobs_table.clone(), changes));
        let deliveries = kiln_events::deliver_webhooks::wire(&self.aws, &self.delivery_config())?;
        self.relays.push(crate::relays::relay_function(
            sqs.clone(),
            self.resources.webhook_queue_url.clone(),
            Arc::new(deliveries),
            Duration::from_secs(60),
            kiln_events::deliver_webhooks::handle,
        ));
        let inbox_queue = self.inbox_notifications().await?;
        let inbox = Arc::new(inbox_trigger::wire(&self.aws, &self.config));
        self.relays.push(crate::relays::relay_inbox(sqs, inbox_queue, inbox));
        Ok(())
    }

    /// The delivery settings of the local `deliver-webhooks`: short retries (the cap is 4× the
    /// base) so tests see retries and the DLQ in seconds, and loopback receivers when allowed.
    pub fn delivery_config(&self) -> DeliveryConfig {
        DeliveryConfig {
            function: self.config.clone(),
            retry_base_secs: self.options.webhook_retry_base_secs,
            retry_cap_secs: self.options.webhook_retry_base_secs.max(1) * 4,
            max_attempts: webhook_max_attempts(),
            connect_timeout_secs: 2,
            timeout_secs: 5,
            concurrency: 10,
            circuit_failures: 5,
            circuit_open_secs: 30,
            allow_loopback: self.options.allow_local_webhooks,
        }
    }

    /// The webhook DLQ (named `<webhook queue>-dlq`).
    pub fn webhook_dead_letter_queue_url(&self) -> String {
        format!("{}-dlq", self.resources.webhook_queue_url)
    }

    /// A queue that receives the bucket's object-created notifications under `inbox/` (in AWS the
    /// notification invokes the function directly; moto delivers to SQS reliably).
    async fn inbox_notifications(&self) -> anyhow::Result<String> {
        use aws_sdk_s3::types::{
            Event, FilterRule, FilterRuleName, NotificationConfiguration, NotificationConfigurationFilter,
            QueueConfiguration, S3KeyFilter,
        };
        let name = format!("{}-inbox-events", self.options.prefix);
        let url = self.direct.sqs().create_queue().queue_name(&name).send().await?.queue_url.unwrap_or_default();
        let attributes = self
            .direct
            .sqs()
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await?;
        let arn = attributes
            .attributes
            .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn).cloned())
            .unwrap_or_default();
        let filter = NotificationConfigurationFilter::builder()
            .key(
                S3KeyFilter::builder()
                    .filter_rules(FilterRule::builder().name(FilterRuleName::Prefix).value("inbox/").build())
                    .build(),
            )
            .build();
        let queue = QueueConfiguration::builder()
            .queue_arn(arn)
            .events(Event::from("s3:ObjectCreated:*"))
            .filter(filter)
            .build()?;
        self.direct
            .s3()
            .put_bucket_notification_configuration()
            .bucket(&self.resources.artifacts_bucket)
            .notification_configuration(NotificationConfiguration::builder().queue_configurations(queue).build())
            .send()
            .await?;
        Ok(url)
    }

    /// Stops the API server.
    pub async fn stop(mut self) {
        for relay in self.relays.drain(..) {
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
        for relay in self.relays.drain(..) {
            relay.abort();
        }
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// The webhook queue's `maxReceiveCount` from `terraform/stack.json`: the delivery schedule's
/// attempts must match it, so the last attempt is the last receive before the DLQ.
pub fn webhook_max_attempts() -> u32 {
    kiln_aws::provision::Stack::load()
        .ok()
        .and_then(|s| s.queues.get("webhooks").map(|q| q.dead_letter.max_receive_count))
        .unwrap_or(12)
}

/// A `cargo` command at the workspace root that builds what a build from the shell builds.
///
/// Cargo hands what it runs (`cargo run`, test binaries) variables describing the running
/// package (`CARGO_PKG_*`, `CARGO_MANIFEST_DIR`, …). A cargo started with them sees a different
/// environment than one started from the shell and rebuilds dependencies whose build scripts
/// watch their environment, so the tests' builds and the test command's would undo each other.
pub fn cargo_command() -> std::process::Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command.current_dir(workspace_root());
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let describes_the_caller = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_"]
            .iter()
            .any(|prefix| key.starts_with(prefix))
            || matches!(key, "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "CARGO_RUSTC_CURRENT_DIR");
        if describes_the_caller {
            command.env_remove(key);
        }
    }
    command
}

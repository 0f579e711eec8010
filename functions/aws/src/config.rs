//! Building the AWS SDK configuration and clients, once per process.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::Credentials;

use std::sync::{Arc, OnceLock};

use crate::counting::AwsCallCounters;

/// The names of the platform's AWS resources, as terraform passes them to every function.
#[derive(Debug, Clone, clap::Args)]
pub struct Resources {
    /// DynamoDB table of jobs.
    #[arg(long, env = "KILN_JOBS_TABLE")]
    pub jobs_table: String,
    /// DynamoDB table of cache pointers and idempotency records.
    #[arg(long, env = "KILN_REQUESTS_TABLE")]
    pub requests_table: String,
    /// DynamoDB table of tenants and API key hashes.
    #[arg(long, env = "KILN_TENANTS_TABLE")]
    pub tenants_table: String,
    /// DynamoDB table of served model descriptions.
    #[arg(long, env = "KILN_MODELS_TABLE")]
    pub models_table: String,
    /// URL of the SQS job queue.
    #[arg(long, env = "KILN_JOB_QUEUE_URL")]
    pub job_queue_url: String,
    /// URL of the SQS webhook queue (job events waiting for delivery).
    #[arg(long, env = "KILN_WEBHOOK_QUEUE_URL")]
    pub webhook_queue_url: String,
    /// S3 bucket of artifacts.
    #[arg(long, env = "KILN_ARTIFACTS_BUCKET")]
    pub artifacts_bucket: String,
    /// Send every AWS call here instead of AWS (the local moto server). Unset in AWS.
    #[arg(long, env = "KILN_AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
}

impl Resources {
    /// Names only (`<name>` for each table, queue and bucket, no endpoint): for entry points
    /// built on in-memory ports, which never call AWS.
    pub fn placeholder() -> Self {
        Self {
            jobs_table: "jobs".into(),
            requests_table: "requests".into(),
            tenants_table: "tenants".into(),
            models_table: "models".into(),
            job_queue_url: "jobs".into(),
            webhook_queue_url: "webhooks".into(),
            artifacts_bucket: "artifacts".into(),
            endpoint_url: None,
        }
    }

    /// The environment variables that describe these resources, for starting child processes.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("KILN_JOBS_TABLE", self.jobs_table.clone()),
            ("KILN_REQUESTS_TABLE", self.requests_table.clone()),
            ("KILN_TENANTS_TABLE", self.tenants_table.clone()),
            ("KILN_MODELS_TABLE", self.models_table.clone()),
            ("KILN_JOB_QUEUE_URL", self.job_queue_url.clone()),
            ("KILN_WEBHOOK_QUEUE_URL", self.webhook_queue_url.clone()),
            ("KILN_ARTIFACTS_BUCKET", self.artifacts_bucket.clone()),
        ];
        if let Some(url) = &self.endpoint_url {
            env.push(("KILN_AWS_ENDPOINT_URL", url.clone()));
        }
        env
    }
}

/// The region and credentials every client of the local moto server uses: fixed, so nothing on
/// the machine can point a local run at a real account.
const LOCAL_REGION: &str = "us-east-1";

fn local_credentials() -> Credentials {
    Credentials::new("testing", "testing", None, None, "kiln-local")
}

/// The SDK configuration. With an endpoint (the local moto server) it uses the local region and
/// credentials; without, `aws_config`'s default chains.
pub async fn load_sdk_config(endpoint_url: Option<&str>) -> SdkConfig {
    let loader = aws_config::defaults(BehaviorVersion::latest());
    let loader = match endpoint_url {
        Some(url) => {
            loader.endpoint_url(url).region(Region::new(LOCAL_REGION)).credentials_provider(local_credentials())
        }
        None => loader,
    };
    loader.load().await
}

/// The SDK configuration of a Lambda function, built without `aws_config`'s loader. Lambda
/// hands a function its role's credentials and its region in the environment, so nothing
/// else is looked for: no profile files, SSO, web identity, container or instance metadata.
/// That keeps a function's start-up at reading a few variables, and those providers (with the
/// STS and SSO clients they carry) out of its binary. With an endpoint (the local moto
/// server): fixed test credentials and us-east-1, as [`load_sdk_config`].
pub fn lambda_sdk_config(endpoint_url: Option<&str>) -> SdkConfig {
    use aws_config::environment::EnvironmentVariableCredentialsProvider;
    use aws_sdk_dynamodb::config::SharedCredentialsProvider;
    let builder = SdkConfig::builder().behavior_version(BehaviorVersion::latest());
    match endpoint_url {
        Some(url) => builder
            .endpoint_url(url)
            .region(Region::new(LOCAL_REGION))
            .credentials_provider(SharedCredentialsProvider::new(local_credentials()))
            .build(),
        None => {
            let region = std::env::var("AWS_REGION").or_else(|_| std::env::var("AWS_DEFAULT_REGION")).ok();
            builder
                .region(region.map(Region::new))
                .credentials_provider(SharedCredentialsProvider::new(EnvironmentVariableCredentialsProvider::new()))
                .build()
        }
    }
}

/// The AWS clients of a process, each built from one SDK configuration on first use: a function
/// that never calls S3 never builds (nor links) the S3 client.
#[derive(Clone, Debug)]
pub struct AwsClients {
    inner: Arc<Clients>,
}

#[derive(Debug)]
struct Clients {
    sdk: SdkConfig,
    /// moto serves every bucket under one host, so buckets are addressed by path there.
    path_style: bool,
    counters: Option<AwsCallCounters>,
    dynamodb: OnceLock<aws_sdk_dynamodb::Client>,
    sqs: OnceLock<aws_sdk_sqs::Client>,
    s3: OnceLock<aws_sdk_s3::Client>,
}

impl AwsClients {
    pub async fn connect(endpoint_url: Option<&str>) -> Self {
        Self::build(endpoint_url, None).await
    }

    /// Clients that count every request they send.
    pub async fn connect_counting(endpoint_url: Option<&str>, counters: &AwsCallCounters) -> Self {
        Self::build(endpoint_url, Some(counters.clone())).await
    }

    /// Clients of a Lambda function (see [`lambda_sdk_config`]); builds nothing until used.
    pub fn for_lambda(endpoint_url: Option<&str>) -> Self {
        Self::with_config(lambda_sdk_config(endpoint_url), endpoint_url.is_some(), None)
    }

    async fn build(endpoint_url: Option<&str>, counters: Option<AwsCallCounters>) -> Self {
        let sdk = load_sdk_config(endpoint_url).await;
        Self::with_config(sdk, endpoint_url.is_some(), counters)
    }

    fn with_config(sdk: SdkConfig, path_style: bool, counters: Option<AwsCallCounters>) -> Self {
        let clients =
            Clients { sdk, path_style, counters, dynamodb: OnceLock::new(), sqs: OnceLock::new(), s3: OnceLock::new() };
        Self { inner: Arc::new(clients) }
    }

    pub fn dynamodb(&self) -> &aws_sdk_dynamodb::Client {
        let c = &self.inner;
        c.dynamodb.get_or_init(|| {
            let mut config = aws_sdk_dynamodb::config::Builder::from(&c.sdk);
            if let Some(counters) = &c.counters {
                config = config.interceptor(counters.dynamodb.clone());
            }
            aws_sdk_dynamodb::Client::from_conf(config.build())
        })
    }

    pub fn sqs(&self) -> &aws_sdk_sqs::Client {
        let c = &self.inner;
        c.sqs.get_or_init(|| {
            let mut config = aws_sdk_sqs::config::Builder::from(&c.sdk);
            if let Some(counters) = &c.counters {
                config = config.interceptor(counters.sqs.clone());
            }
            aws_sdk_sqs::Client::from_conf(config.build())
        })
    }

    pub fn s3(&self) -> &aws_sdk_s3::Client {
        let c = &self.inner;
        c.s3.get_or_init(|| {
            let mut config = aws_sdk_s3::config::Builder::from(&c.sdk).force_path_style(c.path_style);
            if let Some(counters) = &c.counters {
                config = config.interceptor(counters.s3.clone());
            }
            aws_sdk_s3::Client::from_conf(config.build())
        })
    }
}

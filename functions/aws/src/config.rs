//! Building the AWS SDK configuration and clients, once per process.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::Credentials;

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

/// The SDK configuration. With an endpoint (the local moto server) it uses fixed test
/// credentials and us-east-1, so nothing on the machine can point it at a real account.
pub async fn load_sdk_config(endpoint_url: Option<&str>) -> SdkConfig {
    let loader = aws_config::defaults(BehaviorVersion::latest());
    let loader =
        match endpoint_url {
            Some(url) => loader
                .endpoint_url(url)
                .region(Region::new("us-east-1"))
                .credentials_provider(Credentials::new("testing", "testing", None, None, "kiln-local")),
            None => loader,
        };
    loader.load().await
}

/// The three clients, built once from one configuration.
#[derive(Clone, Debug)]
pub struct AwsClients {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub s3: aws_sdk_s3::Client,
}

impl AwsClients {
    pub async fn connect(endpoint_url: Option<&str>) -> Self {
        Self::build(endpoint_url, None).await
    }

    /// Clients that count every request they send.
    pub async fn connect_counting(endpoint_url: Option<&str>, counters: &AwsCallCounters) -> Self {
        Self::build(endpoint_url, Some(counters)).await
    }

    async fn build(endpoint_url: Option<&str>, counters: Option<&AwsCallCounters>) -> Self {
        let sdk = load_sdk_config(endpoint_url).await;
        let mut dynamodb = aws_sdk_dynamodb::config::Builder::from(&sdk);
        let mut sqs = aws_sdk_sqs::config::Builder::from(&sdk);
        // moto serves every bucket under one host, so address buckets by path there.
        let mut s3 = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(endpoint_url.is_some());
        if let Some(counters) = counters {
            dynamodb = dynamodb.interceptor(counters.dynamodb.clone());
            sqs = sqs.interceptor(counters.sqs.clone());
            s3 = s3.interceptor(counters.s3.clone());
        }
        Self {
            dynamodb: aws_sdk_dynamodb::Client::from_conf(dynamodb.build()),
            sqs: aws_sdk_sqs::Client::from_conf(sqs.build()),
            s3: aws_sdk_s3::Client::from_conf(s3.build()),
        }
    }
}

//! The harness of the end-to-end tests: one moto server per test process (or the one the test
//! command started), a fresh set of resources per test, the API on a free port, HTTP helpers.

pub mod browser;
pub mod burst;
pub mod chaos;
pub mod check;
pub mod http;
pub mod media;
pub mod receiver;

use kiln_local::{
    LocalStack, MotoServer, RunnerOptions, RunnerProcess, StackOptions, Tools, ensure_tools, runner_binary,
    workspace_root,
};
use reqwest::StatusCode;
use serde_json::Value;
use std::sync::{
    OnceLock,
    atomic::{AtomicUsize, Ordering},
};

/// Set by `kiln-local test` so every test process shares one moto server.
pub const MOTO_URL_ENV: &str = "KILN_TEST_MOTO_URL";

/// The moto server's URL, starting one for this process if the test command did not.
pub fn moto_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var(MOTO_URL_ENV) {
            return url;
        }
        let (sender, receiver) = std::sync::mpsc::channel();
        // moto lives as long as this thread, which parks until the process exits.
        std::thread::spawn(move || {
            let started = ensure_tools(&workspace_root()).and_then(|tools| MotoServer::start(&tools, 0));
            match started {
                Ok(server) => {
                    let _ = sender.send(Ok(server.url.clone()));
                    loop {
                        std::thread::park();
                    }
                }
                Err(err) => {
                    let _ = sender.send(Err(format!("{err:#}")));
                }
            }
        });
        match receiver.recv() {
            Ok(Ok(url)) => url,
            Ok(Err(err)) => panic!("could not start moto: {err}"),
            Err(_) => panic!("the moto thread died"),
        }
    })
    .clone()
}

/// A resource prefix no other test in any process uses.
pub fn unique_prefix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("t{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst))
}

/// A local deployment with the repository's model packages published.
pub async fn stack_with(options: StackOptions) -> LocalStack {
    let stack = LocalStack::start(&moto_url(), options).await.expect("local stack");
    stack.publish_models(&workspace_root().join("gpu-runner/models")).await.expect("publishing models");
    stack
}

pub async fn stack() -> LocalStack {
    stack_with(StackOptions { prefix: unique_prefix(), ..StackOptions::default() }).await
}

/// An HTTP client acting as one tenant.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub key: Option<String>,
    http: reqwest::Client,
}

/// A response: status, headers and JSON body (Null when the body is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The id of the job a successful submit answered with (panics, showing the answer, if it
    /// was not one).
    pub fn job_id(&self) -> String {
        assert!(self.status.is_success(), "submit: {} {}", self.status, self.body);
        self.body["id"].as_str().expect("id").to_owned()
    }

    /// The `error.field` of an error response.
    pub fn error_field(&self) -> Option<&str> {
        self.body["error"]["field"].as_str()
    }

    pub fn error_code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }
}

impl Client {
    pub fn new(base: &str, key: Option<&str>) -> Self {
        Self { base: base.to_owned(), key: key.map(str::to_owned), http: reqwest::Client::new() }
    }

    pub async fn tenant(stack: &LocalStack, id: &str) -> Self {
        let key = stack.create_tenant(id, id).await.expect("tenant");
        Self::new(&stack.api_url, Some(key.expose()))
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    pub async fn send(builder: reqwest::RequestBuilder) -> Answer {
        let response = builder.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer { status, headers, body }
    }

    pub async fn get(&self, path: &str) -> Answer {
        Self::send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Answer {
        Self::send(self.request(reqwest::Method::POST, path).json(body)).await
    }

    pub async fn post(&self, path: &str) -> Answer {
        Self::send(self.request(reqwest::Method::POST, path)).await
    }

    /// `POST /v1/jobs` with a raw body and headers.
    pub async fn submit_raw(&self, body: impl Into<reqwest::Body>, headers: &[(&str, &str)]) -> Answer {
        let mut builder = self.request(reqwest::Method::POST, "/v1/jobs").body(body);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        Self::send(builder).await
    }
}

/// The tools in the project's venv (moto, ONNX Runtime), installed on first use.
pub fn tools() -> Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| ensure_tools(&workspace_root()).expect("installing the tools")).clone()
}

/// Runner options for tests: the repository's models, short leases and polls, the runner's log
/// in `target/test-logs/<name>.log`.
pub fn runner_options(name: &str) -> RunnerOptions {
    let logs = workspace_root().join("target/test-logs");
    std::fs::create_dir_all(&logs).expect("log folder");
    let mut options = RunnerOptions::new(workspace_root().join("gpu-runner/models"));
    options.log_file = Some(logs.join(format!("{name}-{}.log", unique_prefix())));
    options
}

/// Starts a runner process on the stack's resources.
pub fn start_runner(stack: &LocalStack, options: &RunnerOptions) -> RunnerProcess {
    static BINARY: OnceLock<std::path::PathBuf> = OnceLock::new();
    let binary = BINARY.get_or_init(|| runner_binary(&workspace_root()).expect("building the runner"));
    RunnerProcess::start(binary, &tools(), &stack.resources, options).expect("starting the runner")
}

/// Starts `count` runners on the stack's resources, the `n`th with `options(n)`, from this
/// thread (a runner dies with the thread that started it), without stalling the runtime's other
/// tasks (a runner becomes healthy only once it has talked to the stack, maybe through its fault
/// proxy, served by this runtime). Needs a multi-threaded runtime.
pub fn start_runners(
    stack: &LocalStack,
    count: usize,
    options: impl Fn(usize) -> RunnerOptions,
) -> anyhow::Result<Vec<RunnerProcess>> {
    tokio::task::block_in_place(|| {
        let binary = runner_binary(&workspace_root())?;
        (0..count).map(|n| RunnerProcess::start(&binary, &tools(), &stack.resources, &options(n))).collect()
    })
}

impl Client {
    /// Polls `GET /v1/jobs/{id}` until `done` holds for the job, or panics after `limit`.
    pub async fn wait_for(&self, id: &str, limit: std::time::Duration, done: impl Fn(&Value) -> bool) -> Value {
        let started = std::time::Instant::now();
        loop {
            let answer = self.get(&format!("/v1/jobs/{id}")).await;
            assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
            if done(&answer.body) {
                return answer.body;
            }
            assert!(started.elapsed() < limit, "job {id} did not get there within {limit:?}; last: {}", answer.body);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Waits until the job has ended (not queued or running).
    pub async fn wait_finished(&self, id: &str, limit: std::time::Duration) -> Value {
        self.wait_for(id, limit, |job| !matches!(job["status"].as_str(), Some("queued" | "running"))).await
    }
}

/// A job that renders for several seconds on a CPU: many steps on a large canvas.
pub fn slow_job(prompt: &str) -> Value {
    serde_json::json!({"model": "kiln-demo", "prompt": prompt, "width": 768, "height": 768, "steps": 50, "seed": 1})
}

/// Downloads a URL (a presigned artifact link).
pub async fn download(url: &str) -> Vec<u8> {
    let response = reqwest::get(url).await.expect("download");
    assert!(response.status().is_success(), "GET {url}: {}", response.status());
    response.bytes().await.expect("body").to_vec()
}

/// Messages on a queue, visible or received and not yet deleted (asked straight of the backend,
/// past any fault proxy).
pub async fn messages_on(stack: &LocalStack, queue_url: &str) -> usize {
    use aws_sdk_sqs::types::QueueAttributeName;
    let attributes = stack
        .direct
        .sqs()
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .expect("queue attributes")
        .attributes
        .unwrap_or_default();
    [QueueAttributeName::ApproximateNumberOfMessages, QueueAttributeName::ApproximateNumberOfMessagesNotVisible]
        .iter()
        .map(|name| attributes.get(name).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0))
        .sum()
}

/// Waits for an object to appear in the artifacts bucket, for up to `limit`; its bytes.
pub async fn wait_for_object(stack: &LocalStack, key: &str, limit: std::time::Duration) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let got = stack.clients.s3().get_object().bucket(&stack.resources.artifacts_bucket).key(key).send().await;
        if let Ok(output) = got {
            return output.body.collect().await.unwrap().into_bytes().to_vec();
        }
        assert!(tokio::time::Instant::now() < deadline, "{key} never appeared");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Writes an object into the artifacts bucket as a writer with access to it would (a batch
/// pipeline dropping files into the inbox, a fixture's image).
pub async fn put_object(stack: &LocalStack, key: &str, bytes: Vec<u8>, content_type: &str) {
    let put = stack.clients.s3().put_object().bucket(&stack.resources.artifacts_bucket).key(key);
    put.content_type(content_type).body(bytes.into()).send().await.unwrap();
}

/// The keys in the artifacts bucket under `prefix`.
pub async fn stored_keys(stack: &LocalStack, prefix: &str) -> Vec<String> {
    let listed = stack
        .clients
        .s3()
        .list_objects_v2()
        .bucket(&stack.resources.artifacts_bucket)
        .prefix(prefix)
        .send()
        .await
        .expect("listing objects");
    listed.contents.unwrap_or_default().into_iter().filter_map(|object| object.key).collect()
}

/// The jobs table's stream, read straight from the backend from its start.
pub struct StreamStart {
    pub streams: aws_sdk_dynamodbstreams::Client,
    pub arn: String,
    pub shard: String,
    /// An iterator at the shard's first record.
    pub iterator: String,
}

pub async fn jobs_stream_from_start(stack: &LocalStack) -> StreamStart {
    let sdk = kiln_aws::load_sdk_config(Some(&moto_url())).await;
    let streams = aws_sdk_dynamodbstreams::Client::new(&sdk);
    let listed = streams.list_streams().table_name(&stack.resources.jobs_table).send().await.expect("streams");
    let arn = listed.streams.unwrap_or_default()[0].stream_arn.clone().expect("stream arn");
    let described = streams.describe_stream().stream_arn(&arn).send().await.expect("stream");
    let shards = described.stream_description.and_then(|d| d.shards).unwrap_or_default();
    let shard = shards[0].shard_id.clone().expect("shard id");
    let iterator = streams
        .get_shard_iterator()
        .stream_arn(&arn)
        .shard_id(&shard)
        .shard_iterator_type(aws_sdk_dynamodbstreams::types::ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect("shard iterator")
        .shard_iterator
        .expect("shard iterator");
    StreamStart { streams, arn, shard, iterator }
}

/// Runs `kiln-admin` with `args` against the stack's tables; what it printed.
pub async fn admin(stack: &LocalStack, args: &[&str]) -> anyhow::Result<String> {
    use clap::Parser;
    let endpoint = stack.resources.endpoint_url.clone().expect("a local endpoint");
    let r = &stack.resources;
    let mut argv = vec!["kiln-admin", "--endpoint-url", &endpoint, "--tenants-table", &r.tenants_table];
    argv.extend(["--models-table", &r.models_table, "--jobs-table", &r.jobs_table]);
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    kiln_api::admin::run(kiln_api::admin::Cli::try_parse_from(argv)?, &mut out).await?;
    Ok(String::from_utf8(out)?)
}

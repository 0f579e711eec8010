//! A fault-injecting proxy between the AWS SDK and moto, for running the platform under the
//! failures AWS hands out: 500s and 503s, throttling, dropped connections, latency, requests that
//! hang, and — the nasty one — requests that are carried out but whose answer is lost (the
//! write happened, the caller thinks it failed and retries).
//!
//! Every client of the stack (the API, the event functions, the runners, presigned links) talks
//! to the proxy; what stands in for AWS's own machinery (the relays' event-source polling,
//! provisioning, the invariant checker) talks to moto directly. At `rate`, a request gets one of
//! the plan's faults, chosen uniformly; the proxy counts what it did per service and fault.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use rand::Rng;
use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, warn};

/// One kind of failure the proxy can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum FaultKind {
    /// Answer 500 with the service's internal error.
    ServerError,
    /// Answer 503 (service unavailable).
    Unavailable,
    /// Answer the service's throttling error (`ProvisionedThroughputExceededException`,
    /// `ThrottlingException`, `RequestLimitExceeded`, `RequestThrottled`, `SlowDown`).
    Throttle,
    /// Close the connection without forwarding the request.
    Reset,
    /// Forward the request after a delay (`FaultPlan::latency`).
    Latency,
    /// Hold the request for `FaultPlan::hang`, then close the connection without forwarding it.
    Hang,
    /// Forward the request, then close the connection instead of answering: the call took
    /// effect but the caller sees a failure.
    LostResponse,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        Self::ServerError,
        Self::Unavailable,
        Self::Throttle,
        Self::Reset,
        Self::Latency,
        Self::Hang,
        Self::LostResponse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServerError => "server-error",
            Self::Unavailable => "unavailable",
            Self::Throttle => "throttle",
            Self::Reset => "reset",
            Self::Latency => "latency",
            Self::Hang => "hang",
            Self::LostResponse => "lost-response",
        }
    }
}

/// What the proxy injects, and how often.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Fraction of requests (0–1) that get a fault.
    pub rate: f64,
    /// The faults, chosen uniformly for a request that gets one.
    pub kinds: Vec<FaultKind>,
    /// Added delay of a `Latency` fault: uniform in this range.
    pub latency: (Duration, Duration),
    /// How long a `Hang` holds the request before dropping the connection.
    pub hang: Duration,
}

impl FaultPlan {
    /// Every kind of fault at `rate`: latency of 0.1–1.5 s, hangs of 5 s.
    pub fn every_kind(rate: f64) -> Self {
        Self {
            rate,
            kinds: FaultKind::ALL.to_vec(),
            latency: (Duration::from_millis(100), Duration::from_millis(1500)),
            hang: Duration::from_secs(5),
        }
    }
}

/// The AWS service a request is for, read off the request as AWS would route it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    DynamoDb,
    DynamoDbStreams,
    Sqs,
    S3,
}

impl Service {
    fn of(parts: &http::request::Parts) -> Self {
        let target = parts.headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("");
        if target.starts_with("DynamoDBStreams_") {
            Self::DynamoDbStreams
        } else if target.starts_with("DynamoDB_") {
            Self::DynamoDb
        } else if target.starts_with("AmazonSQS.") {
            Self::Sqs
        } else {
            Self::S3
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::DynamoDb => "dynamodb",
            Self::DynamoDbStreams => "dynamodb-streams",
            Self::Sqs => "sqs",
            Self::S3 => "s3",
        }
    }

    /// The error answer of this service for an injected fault that answers.
    fn error(self, kind: FaultKind) -> hyper::Response<Full<Bytes>> {
        let (status, code) = match kind {
            FaultKind::ServerError => {
                (500, if self == Self::DynamoDb { "InternalServerError" } else { "InternalError" })
            }
            FaultKind::Unavailable => (503, "ServiceUnavailable"),
            _ => {
                let codes: &[&str] = match self {
                    Self::DynamoDb | Self::DynamoDbStreams => {
                        &["ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"]
                    }
                    Self::Sqs => &["ThrottlingException", "RequestThrottled"],
                    Self::S3 => &["SlowDown"],
                };
                let code = codes[rand::rng().random_range(0..codes.len())];
                (if self == Self::S3 { 503 } else { 400 }, code)
            }
        };
        let message = format!("injected by kiln's fault proxy ({})", kind.as_str());
        let (content_type, body) = match self {
            Self::S3 => (
                "application/xml",
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
                ),
            ),
            _ => ("application/x-amz-json-1.0", serde_json::json!({"__type": code, "message": message}).to_string()),
        };
        let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        if self == Self::Sqs {
            // The query-compatible error code SQS's JSON protocol carries beside the body.
            let fault = if status >= 500 { "Receiver" } else { "Sender" };
            if let Ok(value) = http::HeaderValue::from_str(&format!("{code};{fault}")) {
                response.headers_mut().insert("x-amzn-query-error", value);
            }
        }
        response
    }
}

/// The action a request asks for: `X-Amz-Target`'s action for the JSON protocols, the method for S3.
fn operation(parts: &http::request::Parts) -> String {
    match parts.headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        Some(target) => target.rsplit('.').next().unwrap_or(target).to_owned(),
        None => parts.method.as_str().to_owned(),
    }
}

/// What the proxy did: requests per service, faults per service and kind.
#[derive(Debug, Clone, Default)]
pub struct FaultCounts {
    pub requests: BTreeMap<Service, u64>,
    pub faults: BTreeMap<(Service, FaultKind), u64>,
}

impl FaultCounts {
    pub fn total_faults(&self) -> u64 {
        self.faults.values().sum()
    }

    pub fn faults_of(&self, kind: FaultKind) -> u64 {
        self.faults.iter().filter(|((_, k), _)| *k == kind).map(|(_, n)| n).sum()
    }
}

impl fmt::Display for FaultCounts {
    /// A markdown table: one row per service, one column per fault kind.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "| service | requests |")?;
        for kind in FaultKind::ALL {
            write!(f, " {} |", kind.as_str())?;
        }
        writeln!(f, " faults |")?;
        writeln!(f, "|---|---:|{}---:|", "---:|".repeat(FaultKind::ALL.len()))?;
        for (service, requests) in &self.requests {
            write!(f, "| {} | {requests} |", service.as_str())?;
            let mut sum = 0;
            for kind in FaultKind::ALL {
                let n = self.faults.get(&(*service, kind)).copied().unwrap_or(0);
                sum += n;
                write!(f, " {n} |")?;
            }
            writeln!(f, " {sum} |")?;
        }
        Ok(())
    }
}

/// The proxy: listening on 127.0.0.1, forwarding to `target`, injecting faults at its rate.
pub struct FaultProxy {
    /// The proxy's URL: the endpoint the stack's clients use.
    pub url: String,
    state: Arc<ProxyState>,
    task: JoinHandle<()>,
}

struct ProxyState {
    target: String,
    http: reqwest::Client,
    plan: FaultPlan,
    /// The rate now, in parts per million (0 until [`FaultProxy::set_rate`]).
    rate_ppm: AtomicU32,
    counts: Mutex<FaultCounts>,
    /// One-shot faults for the next matching request, whatever the rate (for tests of one path).
    scripted: Mutex<Vec<(Service, String, FaultKind)>>,
}

/// The proxy dropped the connection on purpose (the service's error closes it unanswered).
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by the fault proxy")]
struct Dropped;

impl FaultProxy {
    /// Starts the proxy in front of `target` (moto's URL), injecting nothing until
    /// [`FaultProxy::set_rate`] (so the stack can be set up first).
    pub async fn start(target: &str, plan: FaultPlan) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
        let state = Arc::new(ProxyState {
            target: target.trim_end_matches('/').to_owned(),
            http,
            plan,
            rate_ppm: AtomicU32::new(0),
            counts: Mutex::default(),
            scripted: Mutex::default(),
        });
        let serving = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| state.clone().handle(request));
                    // A dropped connection is the point of some faults; nothing to report.
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Ok(Self { url, state, task })
    }

    /// The plan's rate from now on.
    pub fn start_faults(&self) {
        self.set_rate(self.state.plan.rate);
    }

    /// Injects faults in `rate` (0–1) of the requests from now on.
    pub fn set_rate(&self, rate: f64) {
        self.state.rate_ppm.store((rate.clamp(0.0, 1.0) * 1e6) as u32, Ordering::Relaxed);
    }

    /// Gives the next request for `operation` of `service` (the `X-Amz-Target` action, e.g.
    /// `TransactWriteItems`; the HTTP method for S3) the fault `kind`, once, whatever the rate.
    pub fn inject_next(&self, service: Service, operation: &str, kind: FaultKind) {
        self.state.scripted.lock().unwrap_or_else(|p| p.into_inner()).push((service, operation.to_owned(), kind));
    }

    pub fn plan(&self) -> &FaultPlan {
        &self.state.plan
    }

    /// What the proxy has done so far.
    pub fn counts(&self) -> FaultCounts {
        self.state.counts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ProxyState {
    fn draw(&self, service: Service, operation: &str) -> Option<FaultKind> {
        let mut scripted = self.scripted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(index) = scripted.iter().position(|(s, o, _)| *s == service && o == operation) {
            return Some(scripted.remove(index).2);
        }
        drop(scripted);
        let rate = self.rate_ppm.load(Ordering::Relaxed);
        let mut rng = rand::rng();
        if self.plan.kinds.is_empty() || rng.random_range(0..1_000_000) >= rate {
            return None;
        }
        Some(self.plan.kinds[rng.random_range(0..self.plan.kinds.len())])
    }

    fn count(&self, service: Service, fault: Option<FaultKind>) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.requests.entry(service).or_default() += 1;
        if let Some(kind) = fault {
            *counts.faults.entry((service, kind)).or_default() += 1;
        }
    }

    async fn handle(
        self: Arc<Self>,
        request: hyper::Request<Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, Dropped> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
        let service = Service::of(&parts);
        let fault = self.draw(service, &operation(&parts));
        self.count(service, fault);
        if let Some(kind) = fault {
            debug!(service = service.as_str(), path = %parts.uri.path(), fault = kind.as_str(), "fault injected");
        }
        match fault {
            None => Ok(self.forward(parts, body).await),
            Some(kind @ (FaultKind::ServerError | FaultKind::Unavailable | FaultKind::Throttle)) => {
                Ok(service.error(kind))
            }
            Some(FaultKind::Reset) => Err(Dropped),
            Some(FaultKind::Latency) => {
                let (low, high) = self.plan.latency;
                let delay = rand::rng().random_range(low.as_millis()..=high.as_millis().max(low.as_millis()));
                tokio::time::sleep(Duration::from_millis(delay as u64)).await;
                Ok(self.forward(parts, body).await)
            }
            Some(FaultKind::Hang) => {
                tokio::time::sleep(self.plan.hang).await;
                Err(Dropped)
            }
            Some(FaultKind::LostResponse) => {
                let _ = self.forward(parts, body).await;
                Err(Dropped)
            }
        }
    }

    /// The request as it came (method, path, query, headers — `Host` included, so moto builds
    /// URLs that point back at the proxy), sent to the target; its answer as moto gave it.
    async fn forward(&self, parts: http::request::Parts, body: Bytes) -> hyper::Response<Full<Bytes>> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let url = format!("{}{path}", self.target);
        let sent = self.http.request(parts.method.clone(), url).headers(parts.headers).body(body).send().await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(err) => {
                warn!(error = %err, "the fault proxy could not reach its target");
                let mut response = hyper::Response::new(Full::new(Bytes::from_static(b"bad gateway")));
                *response.status_mut() = http::StatusCode::BAD_GATEWAY;
                return response;
            }
        };
        let status = answer.status();
        let headers = answer.headers().clone();
        let bytes = answer.bytes().await.unwrap_or_default();
        let mut response = hyper::Response::new(Full::new(bytes));
        *response.status_mut() = status;
        for (name, value) in &headers {
            // The body is whole here; hyper sets the length and framing itself.
            if name != http::header::TRANSFER_ENCODING && name != http::header::CONNECTION {
                response.headers_mut().append(name, value.clone());
            }
        }
        response
    }
}

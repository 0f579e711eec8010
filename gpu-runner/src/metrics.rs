//! Prometheus metrics and the `/healthz` + `/metrics` endpoint.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How a delivered job ended, as far as this runner is concerned.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    succeeded,
    failed,
    canceled,
    /// Transient failure: the message went back to the queue with a delay.
    retried,
    /// Shutdown: the message went back at once.
    handed_back,
    /// Another runner took the job over.
    lost,
    /// The job had already ended, or the message was stale or unreadable.
    skipped,
    /// The job's model version is not served here: the message went back for the runners that
    /// serve it.
    routed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: Outcome,
}

/// Jobs of one model version, by outcome: how a canary or a shadow fares against the rest.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionOutcomeLabels {
    pub model: String,
    pub version: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub model: String,
    pub version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchStopLabels {
    pub stop: crate::batching::BatchStop,
}

/// How denoising steps ran on a session that captures CUDA graphs.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum GraphStep {
    /// Replayed a captured graph.
    replayed,
    /// A graph's first two runs (a plain one, then the capture).
    capturing,
    /// Captured or replayed in a graph of more lanes than the chunk had (also counted above).
    padded,
    /// Ran without a graph: the fallback.
    uncaptured,
}

/// Why a chunk ran without a CUDA graph.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum GraphFallback {
    /// Every graph was taken by other shapes, and none of its size was larger.
    no_graph,
    /// A capture failed; the session stopped using graphs.
    capture_failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GraphStepLabels {
    pub device: String,
    pub run: GraphStep,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GraphFallbackLabels {
    pub device: String,
    pub reason: GraphFallback,
}

pub struct Metrics {
    registry: Registry,
    pub jobs: Family<OutcomeLabels, Counter>,
    /// Jobs by model version and outcome.
    pub version_jobs: Family<VersionOutcomeLabels, Counter>,
    /// Render time per job, by model version.
    pub version_render: Family<VersionLabels, Histogram>,
    pub queue_wait: Histogram,
    pub render: Histogram,
    pub encode: Histogram,
    pub upload: Histogram,
    pub batch_size: Histogram,
    /// Batches, by why they went when they did (full, waited, incompatible, deadline).
    pub batch_stops: Family<BatchStopLabels, Counter>,
    /// Per job: from being handed to its session to its batch's render call.
    pub batch_wait: Histogram,
    /// Time the session threads spent inside render calls, once per batch: its rate is how
    /// busy the runner keeps its device (1.0 = a render always running).
    pub render_busy: Counter<f64, AtomicU64>,
    /// `render_busy` per device (`cpu`, `cuda:0`, …).
    pub device_render_busy: Family<DeviceLabels, Counter<f64, AtomicU64>>,
    /// Jobs handed to each device's sessions and not answered yet.
    pub device_queued: Family<DeviceLabels, Gauge>,
    /// Render calls (batches); with `batch_size`'s sum, the mean batch.
    pub batches: Counter,
    /// Denoising steps on sessions that capture CUDA graphs, by how they ran.
    pub graph_steps: Family<GraphStepLabels, Counter>,
    /// Chunks (or captures) that fell back to running without a CUDA graph, by why.
    pub graph_fallbacks: Family<GraphFallbackLabels, Counter>,
    pub in_flight: Gauge,
    /// Messages received and held by the fair intake, not yet started.
    pub held: Gauge,
    /// Messages the fair intake sent back to the end of the queue (their tenant had its share).
    pub deferred: Counter,
    ready: AtomicBool,
    stuck: AtomicBool,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0].into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kiln_runner");
        let jobs = Family::<OutcomeLabels, Counter>::default();
        let histogram = || Histogram::new(seconds_buckets());
        let (queue_wait, render, encode, upload) = (histogram(), histogram(), histogram(), histogram());
        let batch_wait = Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        let batch_stops = Family::<BatchStopLabels, Counter>::default();
        let device_render_busy = Family::<DeviceLabels, Counter<f64, AtomicU64>>::default();
        let device_queued = Family::<DeviceLabels, Gauge>::default();
        let batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0]);
        let in_flight = Gauge::default();
        let render_busy = Counter::<f64, AtomicU64>::default();
        let batches = Counter::default();
        let graph_steps = Family::<GraphStepLabels, Counter>::default();
        let graph_fallbacks = Family::<GraphFallbackLabels, Counter>::default();
        registry.register(
            "cuda_graph_steps",
            "Denoising steps on sessions that capture CUDA graphs, by how they ran",
            graph_steps.clone(),
        );
        registry.register(
            "cuda_graph_fallbacks",
            "Chunks that ran without a CUDA graph, and failed captures",
            graph_fallbacks.clone(),
        );
        registry.register("jobs", "Jobs handled, by outcome", jobs.clone());
        let version_jobs = Family::<VersionOutcomeLabels, Counter>::default();
        let version_render =
            Family::<VersionLabels, Histogram>::new_with_constructor(|| Histogram::new(seconds_buckets()) as Histogram);
        registry.register("version_jobs", "Jobs handled, by model version and outcome", version_jobs.clone());
        registry.register(
            "version_render_seconds",
            "Time in the render call, per job, by model version",
            version_render.clone(),
        );
        registry.register("queue_wait_seconds", "Time from submission to start", queue_wait.clone());
        registry.register("render_seconds", "Time in the render call, per job", render.clone());
        registry.register("encode_seconds", "Time encoding a job's frames", encode.clone());
        registry.register("upload_seconds", "Time writing a job's artifact", upload.clone());
        registry.register("batch_size", "Jobs per render call", batch_size.clone());
        registry.register("batch_stops", "Render calls, by why the batch went when it did", batch_stops.clone());
        registry.register(
            "batch_wait_seconds",
            "Per job: from its session taking it to its batch's render call",
            batch_wait.clone(),
        );
        registry.register(
            "render_busy_seconds",
            "Time in render calls, per batch (the device's busy time)",
            render_busy.clone(),
        );
        registry.register("batches", "Render calls", batches.clone());
        registry.register(
            "device_render_busy_seconds",
            "Time in render calls, per batch, by device",
            device_render_busy.clone(),
        );
        registry.register(
            "device_queued",
            "Jobs handed to a device's sessions, not answered yet",
            device_queued.clone(),
        );
        registry.register("in_flight", "Jobs held by this runner", in_flight.clone());
        let (held, deferred) = (Gauge::default(), Counter::default());
        registry.register("held", "Messages received, waiting for a slot and their tenant's turn", held.clone());
        registry.register(
            "deferred",
            "Messages sent back to the end of the queue: their tenant had its share",
            deferred.clone(),
        );
        Self {
            registry,
            jobs,
            version_jobs,
            version_render,
            queue_wait,
            render,
            encode,
            upload,
            batch_size,
            batch_stops,
            batch_wait,
            render_busy,
            device_render_busy,
            device_queued,
            batches,
            graph_steps,
            graph_fallbacks,
            in_flight,
            held,
            deferred,
            ready: AtomicBool::new(false),
            stuck: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn count(&self, outcome: Outcome) {
        self.jobs.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts a job of `model` at `version` by outcome.
    pub fn count_version(&self, model: &str, version: &str, outcome: Outcome) {
        let labels = VersionOutcomeLabels { model: model.to_owned(), version: version.to_owned(), outcome };
        self.version_jobs.get_or_create(&labels).inc();
    }

    /// Adds a pipeline's CUDA graph runs on `device`.
    pub fn count_graph_runs(&self, device: &str, runs: crate::render::GraphRuns) {
        let steps = [
            (GraphStep::replayed, runs.replayed),
            (GraphStep::capturing, runs.capturing),
            (GraphStep::padded, runs.padded),
            (GraphStep::uncaptured, runs.uncaptured),
        ];
        for (run, count) in steps.into_iter().filter(|(_, count)| *count > 0) {
            self.graph_steps.get_or_create(&GraphStepLabels { device: device.to_owned(), run }).inc_by(count);
        }
        let fallbacks = [(GraphFallback::no_graph, runs.no_graph_chunks), (GraphFallback::capture_failed, runs.failed)];
        for (reason, count) in fallbacks.into_iter().filter(|(_, count)| *count > 0) {
            self.graph_fallbacks
                .get_or_create(&GraphFallbackLabels { device: device.to_owned(), reason })
                .inc_by(count);
        }
    }

    /// Healthy once the models are loaded; unhealthy again while shutting down.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// A render session did not stop when its watchdog asked: unhealthy for good.
    pub fn set_stuck(&self) {
        self.stuck.store(true, Ordering::SeqCst);
    }

    pub fn is_stuck(&self) -> bool {
        self.stuck.load(Ordering::SeqCst)
    }

    pub fn render_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }
}

/// Serves `/healthz` and `/metrics` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => { warn!(error = %err, "metrics accept failed"); continue; }
            },
            () = stop.cancelled() => return,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(metrics.clone(), request));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn answer(metrics: Arc<Metrics>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.render_text())
        }
        "/healthz" if metrics.is_stuck() => {
            (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "a render session is stuck\n".into())
        }
        "/healthz" if metrics.ready.load(Ordering::SeqCst) => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/healthz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".into()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    Ok(response)
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod dashboard_tests {
    use super::*;

    /// Every series the Grafana dashboard (`terraform/grafana/runner-dashboard.json`) queries is
    /// one the runner registers, so a renamed metric cannot leave a panel empty. (Labelled
    /// families print nothing until first used, so the names come from the registrations.)
    #[test]
    fn the_grafana_dashboard_queries_only_metrics_the_runner_exports() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../terraform/grafana/runner-dashboard.json");
        let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let source = include_str!("metrics.rs");
        let registered: Vec<String> = source
            .split("registry.register(")
            .skip(1)
            .filter_map(|rest| rest.split('"').nth(1))
            .map(|name| format!("kiln_runner_{name}"))
            .collect();
        // The unlabelled ones are in the text output under the same names.
        let exported = Metrics::default().render_text();
        assert!(exported.contains("# TYPE kiln_runner_render_seconds histogram"), "{exported}");
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for (at, _) in expr.match_indices("kiln_runner_") {
                    let name: String =
                        expr[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    let family = ["_bucket", "_sum", "_count", "_total"]
                        .iter()
                        .find_map(|suffix| name.strip_suffix(suffix))
                        .unwrap_or(&name);
                    assert!(registered.iter().any(|r| r == family), "{}: `{name}` is not registered", panel["title"]);
                    queried += 1;
                }
            }
        }
        assert!(queried >= 15, "the dashboard queries {queried} series");
    }
}

//! One OS thread per loaded model: it takes render jobs from a bounded channel, groups them with
//! the batching policy, renders, and hands each job its frames back. ONNX Runtime calls block,
//! so they never run on the async runtime's threads.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, oneshot};
use tracing::{Span, debug, error, info, info_span};

use crate::{
    batching::{BatchKey, next_batch},
    metrics::Metrics,
    render::{Frames, Pipeline, RenderError, RenderRequest, RuntimeFailure},
};

/// A job handed to a session.
pub struct RenderJob {
    /// What the render is for (a job id, or `warm-up`), listed on the batch's span.
    pub id: String,
    pub key: BatchKey,
    pub request: RenderRequest,
    pub reply: oneshot::Sender<Rendered>,
    /// The caller's span (the job's): the batch that renders the job follows from it, and the
    /// session enters it while it hands the job its result.
    pub span: Span,
}

impl RenderJob {
    /// A job for the session, carrying the current span.
    pub fn new(id: impl Into<String>, key: BatchKey, request: RenderRequest, reply: oneshot::Sender<Rendered>) -> Self {
        Self { id: id.into(), key, request, reply, span: Span::current() }
    }
}

/// What a session hands back.
#[derive(Debug)]
pub struct Rendered {
    pub result: Result<Arc<Frames>, RenderError>,
    /// Time in the render call (the whole batch's).
    pub render_time: Duration,
    pub batch_size: usize,
}

/// Where to send jobs for one model.
#[derive(Clone)]
pub struct SessionHandle {
    pub model: String,
    pub version: String,
    /// How long a job's render may take (its model's manifest).
    pub budget: kiln_domain::RenderBudget,
    sender: mpsc::Sender<RenderJob>,
}

impl SessionHandle {
    /// Queues a job; waits while the session's channel is full.
    pub async fn submit(&self, job: RenderJob) -> Result<(), RuntimeFailure> {
        self.sender.send(job).await.map_err(|_| RuntimeFailure::SessionStopped)
    }
}

/// Starts the session thread for one model. It ends when every handle is dropped.
pub fn spawn(
    model: String,
    version: String,
    mut pipeline: Box<dyn Pipeline>,
    max_batch: usize,
    metrics: Arc<Metrics>,
) -> (SessionHandle, std::thread::JoinHandle<()>) {
    let (sender, mut receiver) = mpsc::channel::<RenderJob>(max_batch.max(1) * 2);
    let name = format!("session-{model}");
    let thread_model = model.clone();
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let model = thread_model;
            let mut waiting: VecDeque<RenderJob> = VecDeque::new();
            loop {
                if waiting.is_empty() {
                    match receiver.blocking_recv() {
                        Some(job) => waiting.push_back(job),
                        None => break,
                    }
                }
                while let Ok(job) = receiver.try_recv() {
                    waiting.push_back(job);
                }
                let keys: Vec<BatchKey> = waiting.iter().map(|job| job.key.clone()).collect();
                let chosen = next_batch(&keys, max_batch);
                let batch: Vec<RenderJob> = chosen
                    .iter()
                    .rev()
                    .filter_map(|&index| waiting.remove(index))
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                let requests: Vec<RenderRequest> = batch.iter().map(|job| job.request.clone()).collect();
                let ids: Vec<&str> = batch.iter().map(|job| job.id.as_str()).collect();
                let span = info_span!("render_batch", model = %model, jobs = ?ids);
                for job in &batch {
                    span.follows_from(&job.span);
                }
                let started = Instant::now();
                let results = span.in_scope(|| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pipeline.render_batch(&requests)))
                        .unwrap_or_else(|panic| {
                            let message = panic_message(panic.as_ref());
                            error!(thread = %name, %message, "the pipeline panicked");
                            vec![Err(RuntimeFailure::Panicked(message).into()); requests.len()]
                        })
                });
                let render_time = started.elapsed();
                metrics.batch_size.observe(batch.len() as f64);
                metrics.render_busy.inc_by(render_time.as_secs_f64());
                metrics.batches.inc();
                for (job, result) in batch.into_iter().zip(results) {
                    let _job = job.span.enter();
                    debug!(
                        batch = requests.len(),
                        render_ms = render_time.as_millis() as u64,
                        ok = result.is_ok(),
                        "rendered"
                    );
                    let rendered = Rendered { result: result.map(Arc::new), render_time, batch_size: requests.len() };
                    let _ = job.reply.send(rendered);
                }
            }
            info!(thread = %name, "render session stopped");
        })
        .expect("spawning a session thread");
    (SessionHandle { model, version, budget: kiln_domain::RenderBudget::default(), sender }, thread)
}

/// What a caught panic said, when it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_owned(),
        (_, Some(message)) => message.clone(),
        _ => "no message".to_owned(),
    }
}

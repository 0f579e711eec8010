//! One OS thread per loaded model: it takes render jobs from a bounded channel, groups them with
//! the batching policy (waiting up to the policy's `max_queue_delay` for a batch to fill),
//! renders, and hands each job its frames back. ONNX Runtime calls block, so they never run on
//! the async runtime's threads.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{Span, debug, error, info, info_span};

use crate::{
    batching::{BatchKey, BatchStop, Decision, FillPolicy, Waiting, decide},
    metrics::Metrics,
    placement::Load,
    render::{Frames, Pipeline, RenderError, RenderRequest, RuntimeFailure, runtime::Device},
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
    /// When it was handed to the session.
    pub submitted: Instant,
}

impl RenderJob {
    /// A job for the session, carrying the current span.
    pub fn new(id: impl Into<String>, key: BatchKey, request: RenderRequest, reply: oneshot::Sender<Rendered>) -> Self {
        Self { id: id.into(), key, request, reply, span: Span::current(), submitted: Instant::now() }
    }
}

/// What a session hands back.
#[derive(Debug)]
pub struct Rendered {
    pub result: Result<Arc<Frames>, RenderError>,
    /// Time in the render call (the whole batch's).
    pub render_time: Duration,
    pub batch_size: usize,
    /// Time from being handed to the session to its batch's render call: waiting for the
    /// session to be free, and for the batch to fill.
    pub batch_wait: Duration,
    /// Why its batch went when it did.
    pub stop: BatchStop,
}

/// Where to send jobs for one model on one device.
#[derive(Clone)]
pub struct SessionHandle {
    pub model: String,
    pub version: String,
    pub device: Device,
    /// How long a job's render may take (its model's manifest).
    pub budget: kiln_domain::RenderBudget,
    /// What a job costs in GPU-work units (its model's manifest).
    pub cost: kiln_domain::CostModel,
    sender: mpsc::Sender<RenderJob>,
    drain: Arc<Drain>,
    /// Jobs handed to the session and not answered yet (and their device's gauge of them).
    queued: Arc<AtomicUsize>,
    queued_gauge: prometheus_client::metrics::gauge::Gauge,
}

/// Set when the runner starts shutting down; wakes a session waiting for its batch to fill.
#[derive(Default)]
struct Drain {
    draining: AtomicBool,
    wake: Notify,
}

impl SessionHandle {
    /// Queues a job; waits while the session's channel is full.
    pub async fn submit(&self, job: RenderJob) -> Result<(), RuntimeFailure> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.queued_gauge.inc();
        self.sender.send(job).await.map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.queued_gauge.dec();
            RuntimeFailure::SessionStopped
        })
    }

    /// How loaded its device is, for [`crate::placement`].
    pub fn load(&self) -> Load {
        Load {
            queued: self.queued.load(Ordering::SeqCst),
            free_memory: crate::render::device_memory::free(self.device),
        }
    }

    /// The runner is shutting down: from now on no batch waits to fill.
    pub fn drain(&self) {
        self.drain.draining.store(true, Ordering::SeqCst);
        self.drain.wake.notify_one();
    }
}

/// Starts the session thread for one model on one device. It ends when every handle is dropped.
pub fn spawn(
    model: String,
    version: String,
    device: Device,
    mut pipeline: Box<dyn Pipeline>,
    policy: FillPolicy,
    metrics: Arc<Metrics>,
) -> (SessionHandle, std::thread::JoinHandle<()>) {
    let (sender, mut receiver) = mpsc::channel::<RenderJob>(policy.max_batch.max(1) * 2);
    let name = format!("session-{model}-{device}");
    let queued = Arc::new(AtomicUsize::new(0));
    let thread_queued = queued.clone();
    let device_label = crate::metrics::DeviceLabels { device: device.to_string() };
    let queued_gauge = metrics.device_queued.get_or_create(&device_label).clone();
    let thread_gauge = queued_gauge.clone();
    let thread_model = model.clone();
    let drain = Arc::new(Drain::default());
    let thread_drain = drain.clone();
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let model = thread_model;
            // Times the wait for a batch to fill (this thread's own: it runs no tasks).
            let clock = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a timer for the session thread");
            let mut waiting: VecDeque<RenderJob> = VecDeque::new();
            let mut closed = false;
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
                let now = Instant::now();
                let view: Vec<Waiting> = waiting
                    .iter()
                    .map(|job| Waiting { key: job.key.clone(), waited: now.saturating_duration_since(job.submitted) })
                    .collect();
                let draining = closed || thread_drain.draining.load(Ordering::SeqCst);
                let (chosen, stop) = match decide(&view, policy, draining) {
                    Decision::Render { jobs, stop } => (jobs, stop),
                    Decision::Wait(wait) => {
                        // A new job, the drain, or the end of the wait: then decide again.
                        let arrived = clock.block_on(async {
                            tokio::select! {
                                job = receiver.recv() => Some(job),
                                () = thread_drain.wake.notified() => None,
                                () = tokio::time::sleep(wait) => None,
                            }
                        });
                        match arrived {
                            Some(Some(job)) => waiting.push_back(job),
                            Some(None) => closed = true,
                            None => {}
                        }
                        continue;
                    }
                };
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
                metrics.batch_stops.get_or_create(&crate::metrics::BatchStopLabels { stop }).inc();
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
                metrics.device_render_busy.get_or_create(&device_label).inc_by(render_time.as_secs_f64());
                metrics.batches.inc();
                metrics.count_graph_runs(&device_label.device, pipeline.take_graph_runs());
                for (job, result) in batch.into_iter().zip(results) {
                    let _job = job.span.enter();
                    debug!(
                        batch = requests.len(),
                        render_ms = render_time.as_millis() as u64,
                        ok = result.is_ok(),
                        "rendered"
                    );
                    let batch_wait = started.saturating_duration_since(job.submitted);
                    metrics.batch_wait.observe(batch_wait.as_secs_f64());
                    let rendered = Rendered {
                        result: result.map(Arc::new),
                        render_time,
                        batch_size: requests.len(),
                        batch_wait,
                        stop,
                    };
                    let _ = job.reply.send(rendered);
                    thread_queued.fetch_sub(1, Ordering::SeqCst);
                    thread_gauge.dec();
                }
            }
            info!(thread = %name, "render session stopped");
        })
        .expect("spawning a session thread");
    let handle = SessionHandle {
        model,
        version,
        device,
        budget: Default::default(),
        cost: Default::default(),
        sender,
        drain,
        queued,
        queued_gauge,
    };
    (handle, thread)
}

/// What a caught panic said, when it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_owned(),
        (_, Some(message)) => message.clone(),
        _ => "no message".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    //! The session's batch filling, with a pipeline that only records the batches it is given.

    use super::*;
    use crate::render::RenderControl;
    use kiln_domain::{ModelSpec, Submission, WebhookPolicy};
    use std::{path::Path, sync::Mutex};

    /// Renders grey frames at once and records each batch's size.
    struct Recording(Arc<Mutex<Vec<usize>>>);

    impl Pipeline for Recording {
        fn render(&mut self, request: &RenderRequest) -> Result<Frames, RenderError> {
            let p = &request.params;
            Ok(Frames { width: p.width, height: p.height, frames: vec![vec![0; 3]], notes: Vec::new() })
        }

        fn render_batch(&mut self, batch: &[RenderRequest]) -> Vec<Result<Frames, RenderError>> {
            self.0.lock().unwrap().push(batch.len());
            batch.iter().map(|request| self.render(request)).collect()
        }
    }

    fn job(width: u32) -> (RenderJob, oneshot::Receiver<Rendered>) {
        let model = ModelSpec::read_manifest(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kiln-demo")).unwrap();
        let body = serde_json::json!({ "model": model.name, "prompt": "a lake", "width": width, "height": 64 });
        let params = Submission::parse(body.to_string().as_bytes())
            .unwrap()
            .resolve(&model, WebhookPolicy::default(), || 0)
            .unwrap()
            .params;
        let key = BatchKey::new(&model.name, &model.version, &params);
        let (reply, rendered) = oneshot::channel();
        let request = RenderRequest { params, control: Arc::new(RenderControl::default()), init_image: None };
        (RenderJob::new("job", key, request, reply), rendered)
    }

    fn session(max_queue_delay: Duration) -> (SessionHandle, Arc<Mutex<Vec<usize>>>, Arc<Metrics>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let metrics = Arc::new(Metrics::default());
        let policy = FillPolicy { max_batch: 3, max_queue_delay };
        let (handle, _thread) =
            spawn("m".into(), "1".into(), Device::Cpu, Box::new(Recording(batches.clone())), policy, metrics.clone());
        (handle, batches, metrics)
    }

    #[tokio::test]
    async fn a_batch_waits_for_company_and_goes_when_full() {
        let (session, batches, _) = session(Duration::from_secs(3600));
        let mut replies = Vec::new();
        for _ in 0..3 {
            let (job, reply) = job(64);
            session.submit(job).await.unwrap();
            replies.push(reply);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for reply in replies {
            let rendered = reply.await.unwrap();
            assert_eq!((rendered.batch_size, rendered.stop), (3, BatchStop::full));
        }
        assert_eq!(*batches.lock().unwrap(), vec![3], "the first job waited for the other two");
    }

    #[tokio::test]
    async fn a_lone_job_goes_after_the_delay_and_reports_its_wait() {
        let (session, _, metrics) = session(Duration::from_millis(150));
        let (job, reply) = job(64);
        session.submit(job).await.unwrap();
        let rendered = reply.await.unwrap();
        assert_eq!((rendered.batch_size, rendered.stop), (1, BatchStop::waited));
        assert!(rendered.batch_wait >= Duration::from_millis(150), "waited {:?}", rendered.batch_wait);
        let stops = metrics.batch_stops.get_or_create(&crate::metrics::BatchStopLabels { stop: BatchStop::waited });
        assert_eq!(stops.get(), 1);
    }

    #[tokio::test]
    async fn an_incompatible_job_behind_sends_the_batch_and_draining_sends_the_rest() {
        let (session, batches, _) = session(Duration::from_secs(3600));
        let (first, first_reply) = job(64);
        let (other, other_reply) = job(128);
        session.submit(first).await.unwrap();
        session.submit(other).await.unwrap();
        assert_eq!(first_reply.await.unwrap().stop, BatchStop::incompatible, "the 128 px job waits behind it");
        // The 128 px job is alone now and would wait an hour; the runner starts draining.
        tokio::time::sleep(Duration::from_millis(50)).await;
        session.drain();
        let rendered = other_reply.await.unwrap();
        assert_eq!((rendered.batch_size, rendered.stop), (1, BatchStop::deadline));
        assert_eq!(*batches.lock().unwrap(), vec![1, 1]);
    }
}

//! The runner service: long-polls the work queue while it has room, and takes each delivered job
//! through start → render (on its model's session thread) → encode (blocking pool) → upload →
//! succeeded, renewing the message's lease while it works and acknowledging it only at the end.
//!
//! | what happened                              | job record            | message                      |
//! |--------------------------------------------|-----------------------|------------------------------|
//! | unreadable message, missing or ended job   | untouched             | deleted                      |
//! | succeeded / canceled / permanent failure   | succeeded / canceled / failed | deleted              |
//! | transient failure (AWS, IO, runtime)       | stays running         | back after a growing delay   |
//! | transient failure on the last delivery     | failed                | deleted                      |
//! | shutdown deadline passed                   | stays running         | back at once (visibility 0)  |
//! | another runner took the job over           | theirs                | left alone                   |
//!
//! A job whose runner dies stays running until its lease ends; the next delivery restarts it
//! (running → running, attempt + 1) and overwrites the same artifact key. A message that is
//! never acknowledged goes to the dead-letter queue, whose handler fails the job.

use bytes::Bytes;
use chrono::Utc;
use kiln_app::{
    AppError, JobMessage, JobRuns, Start, Written,
    ports::{ArtifactStore, Delivery, JobStore, PortError, WorkQueue},
};
use kiln_domain::{Job, JobErrorCode, Output, Timings};
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, Span, error, field, info, info_span, warn};

use crate::{
    batching::BatchKey,
    config::Settings,
    encode::{self, EncodeError},
    metrics::{Metrics, Outcome},
    render::{RenderControl, RenderError, RenderRequest, RuntimeFailure, StopReason},
    session::{RenderJob, Rendered, SessionHandle},
};

/// What the service talks to.
#[derive(Clone)]
pub struct Ports {
    pub store: Arc<dyn JobStore>,
    pub queue: Arc<dyn WorkQueue>,
    pub artifacts: Arc<dyn ArtifactStore>,
}

pub struct Runner {
    ports: Ports,
    runs: JobRuns,
    sessions: HashMap<String, SessionHandle>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// Fires when the shutdown deadline has passed: renders stop and hand their jobs back.
    hand_back: CancellationToken,
}

/// A failure on the way, and whether trying again may help.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Permanent(#[from] PermanentError),
    #[error(transparent)]
    Transient(#[from] TransientError),
}

/// A failure no other attempt would mend: the job fails with [`PermanentError::code`].
#[derive(Debug, thiserror::Error)]
pub enum PermanentError {
    /// The job names a model or version this runner does not serve.
    #[error("model `{model}` version {version} is not served (this runner serves it {serving})")]
    NotServed { model: String, version: String, serving: String },
    /// The model cannot render the job as asked.
    #[error("{0}")]
    Invalid(String),
    /// The encoder refused the frames.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl PermanentError {
    /// The error code recorded on the job.
    pub fn code(&self) -> JobErrorCode {
        match self {
            Self::NotServed { .. } | Self::Invalid(_) => JobErrorCode::InvalidForModel,
            Self::Encode(_) => JobErrorCode::RenderFailed,
        }
    }
}

/// A failure that another delivery may not meet: the message goes back to the queue, and on
/// its last delivery the job fails with this as its message.
#[derive(Debug, thiserror::Error)]
pub enum TransientError {
    /// ONNX Runtime, or the model's session thread, failed.
    #[error(transparent)]
    Render(#[from] RuntimeFailure),
    /// The artifact store refused the upload.
    #[error("storing the artifact: {0}")]
    Artifact(#[source] PortError),
    /// The job store refused the success record.
    #[error("recording success: {0}")]
    RecordSuccess(#[source] AppError),
    /// The job store refused the cancel record.
    #[error("recording the cancel: {0}")]
    RecordCancel(#[source] AppError),
}

impl Runner {
    pub fn new(ports: Ports, sessions: Vec<SessionHandle>, settings: Settings, metrics: Arc<Metrics>) -> Self {
        Self {
            runs: JobRuns::new(ports.store.clone()),
            ports,
            sessions: sessions.into_iter().map(|s| (s.model.clone(), s)).collect(),
            settings,
            metrics,
            hand_back: CancellationToken::new(),
        }
    }

    /// Runs until `shutdown`, then lets in-flight jobs finish within the deadline, hands back
    /// those still rendering, and returns once every job task has ended.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let room = Arc::new(Semaphore::new(self.settings.max_in_flight));
        self.metrics.set_ready(true);
        info!(max_in_flight = self.settings.max_in_flight, "runner polling");
        while !shutdown.is_cancelled() {
            let first = tokio::select! {
                permit = room.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                () = shutdown.cancelled() => break,
            };
            let mut permits = vec![first];
            while permits.len() < 10 {
                match room.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let receive = self.ports.queue.receive(permits.len() as u32, self.settings.poll_wait, self.settings.lease);
            let deliveries = tokio::select! {
                received = receive => received,
                () = shutdown.cancelled() => break,
            };
            let deliveries = match deliveries {
                Ok(deliveries) => deliveries,
                Err(err) => {
                    warn!(error = %err, "receiving from the job queue failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            for (delivery, permit) in deliveries.into_iter().zip(permits.drain(..)) {
                let runner = self.clone();
                tracker.spawn(async move {
                    runner.metrics.in_flight.inc();
                    let outcome = runner.handle(delivery).await;
                    runner.metrics.count(outcome);
                    runner.metrics.in_flight.dec();
                    drop(permit);
                });
            }
        }
        self.metrics.set_ready(false);
        tracker.close();
        info!(in_flight = tracker.len(), deadline = ?self.settings.shutdown_deadline, "runner stopping");
        if tokio::time::timeout(self.settings.shutdown_deadline, tracker.wait()).await.is_err() {
            warn!(in_flight = tracker.len(), "shutdown deadline passed; handing the remaining jobs back");
            self.hand_back.cancel();
            tracker.wait().await;
        }
        info!("runner stopped");
    }

    /// One delivery, start to end, in the job's span (`job_id`, `attempt` and `model` recorded
    /// once known); its heartbeat and render run in it too.
    async fn handle(&self, delivery: Delivery) -> Outcome {
        let span = info_span!(
            "job",
            job_id = field::Empty,
            attempt = field::Empty,
            model = field::Empty,
            delivery = delivery.receive_count
        );
        self.handle_in_span(delivery).instrument(span).await
    }

    async fn handle_in_span(&self, delivery: Delivery) -> Outcome {
        let message: JobMessage = match serde_json::from_str(&delivery.body) {
            Ok(message) => message,
            Err(err) => {
                error!(error = %err, body = %delivery.body.chars().take(200).collect::<String>(), "unreadable job message; deleting it");
                self.acknowledge(&delivery).await;
                return Outcome::skipped;
            }
        };
        let span = Span::current();
        span.record("job_id", field::display(&message.job_id));
        let mut job = match self.runs.start(&message.job_id, Utc::now()).await {
            Ok(Start::Render(job)) => job,
            Ok(Start::Skip(reason)) => {
                info!(?reason, "nothing to render");
                self.acknowledge(&delivery).await;
                return Outcome::skipped;
            }
            Err(err) => {
                warn!(error = &err as &dyn std::error::Error, "could not start the job; it will be delivered again");
                self.release(&delivery, self.settings.retry_delay(delivery.receive_count)).await;
                return Outcome::retried;
            }
        };
        span.record("attempt", job.attempts);
        span.record("model", field::display(format_args!("{}@{}", job.model, job.model_version)));
        if let Some(queue_ms) = job.timings.queue_ms {
            self.metrics.queue_wait.observe(queue_ms as f64 / 1000.0);
        }
        let heartbeat = self.heartbeat(&delivery);
        let outcome = self.work(&mut job, &delivery).await;
        heartbeat.cancel();
        outcome
    }

    /// Renders, encodes, uploads and records the result of a started job.
    async fn work(&self, job: &mut Job, delivery: &Delivery) -> Outcome {
        let session = match self.sessions.get(&job.model) {
            Some(session) if session.version == job.model_version => session,
            served => {
                let serving = served.map_or_else(|| "not at all".to_owned(), |s| format!("at version {}", s.version));
                let failure =
                    PermanentError::NotServed { model: job.model.clone(), version: job.model_version.clone(), serving };
                return self.give_up(job, delivery, failure.into()).await;
            }
        };
        let control = Arc::new(RenderControl::default());
        let rendered = match self.render(job, session, &control).await {
            Ok(rendered) => rendered,
            Err(failure) => return self.give_up(job, delivery, TransientError::Render(failure).into()).await,
        };
        let frames = match rendered.result {
            Ok(frames) => frames,
            Err(RenderError::Stopped(reason)) => return self.stopped(job, delivery, reason).await,
            Err(RenderError::Invalid(reason)) => {
                return self.give_up(job, delivery, PermanentError::Invalid(reason).into()).await;
            }
            Err(RenderError::Runtime(failure)) => {
                return self.give_up(job, delivery, TransientError::Render(failure).into()).await;
            }
        };
        self.metrics.render.observe(rendered.render_time.as_secs_f64());

        let params = &job.params;
        let warnings = frames.notes.clone();
        let started = Instant::now();
        let encoded = encode::encode(params.format, frames, params.fps.unwrap_or(1)).await;
        let encode_time = started.elapsed();
        let bytes = match encoded {
            Ok(bytes) => Bytes::from(bytes),
            Err(err) => return self.give_up(job, delivery, PermanentError::Encode(err).into()).await,
        };
        self.metrics.encode.observe(encode_time.as_secs_f64());

        let output = Output {
            key: job.output_key(params.format.as_str()),
            content_type: params.format.content_type().to_owned(),
            bytes: bytes.len() as u64,
        };
        let started = Instant::now();
        if let Err(err) = self.ports.artifacts.put(&output.key, &output.content_type, bytes).await {
            return self.give_up(job, delivery, TransientError::Artifact(err).into()).await;
        }
        let upload_time = started.elapsed();
        self.metrics.upload.observe(upload_time.as_secs_f64());

        let millis = |d: Duration| Some(d.as_millis() as u64);
        let timings = Timings {
            queue_ms: None,
            render_ms: millis(rendered.render_time),
            encode_ms: millis(encode_time),
            upload_ms: millis(upload_time),
        };
        match self.runs.succeed(job, vec![output], timings, warnings, Utc::now()).await {
            Ok(Written::Done) => {
                info!(batch = rendered.batch_size, render_ms = ?job.timings.render_ms, encode_ms = ?job.timings.encode_ms, "job succeeded");
                self.acknowledge(delivery).await;
                Outcome::succeeded
            }
            Ok(Written::CancelRequested) => self.stopped(job, delivery, StopReason::Canceled).await,
            Ok(Written::Lost) => Outcome::lost,
            Err(err) => self.give_up(job, delivery, TransientError::RecordSuccess(err).into()).await,
        }
    }

    /// Hands the job to its session and, until the frames come back, writes progress, watches
    /// for a cancel request or a lost job, and stops the render when the shutdown deadline passes.
    async fn render(
        &self,
        job: &mut Job,
        session: &SessionHandle,
        control: &Arc<RenderControl>,
    ) -> Result<Rendered, RuntimeFailure> {
        let (reply, mut frames) = oneshot::channel();
        let request = RenderRequest { params: job.params.clone(), control: control.clone() };
        // Carries the job's span to the session thread.
        let render_job = RenderJob::new(job.id.to_string(), BatchKey::of(job), request, reply);
        session.submit(render_job).await?;
        let mut reported = job.progress;
        let mut ticker = tokio::time::interval(self.settings.progress_interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                rendered = &mut frames => {
                    return rendered.map_err(|_| RuntimeFailure::Dropped);
                }
                () = self.hand_back.cancelled(), if control.stop_requested().is_none() => {
                    control.stop(StopReason::HandedBack);
                }
                _ = ticker.tick() => {
                    let progress = control.progress();
                    if progress <= reported {
                        continue;
                    }
                    match self.runs.checkpoint(job, progress).await {
                        Ok(Written::Done) => reported = progress,
                        Ok(Written::CancelRequested) => control.stop(StopReason::Canceled),
                        Ok(Written::Lost) => control.stop(StopReason::Lost),
                        Err(err) => warn!(error = &err as &dyn std::error::Error, "progress write failed"),
                    }
                }
            }
        }
    }

    /// The render stopped before its end.
    async fn stopped(&self, job: &mut Job, delivery: &Delivery, reason: StopReason) -> Outcome {
        match reason {
            StopReason::Canceled => match self.runs.cancel(job, Utc::now()).await {
                Ok(_) => {
                    info!("job canceled while running");
                    self.acknowledge(delivery).await;
                    Outcome::canceled
                }
                Err(err) => self.give_up(job, delivery, TransientError::RecordCancel(err).into()).await,
            },
            StopReason::HandedBack => {
                info!("handing the job back");
                self.release(delivery, Duration::ZERO).await;
                Outcome::handed_back
            }
            StopReason::Lost => {
                info!("another runner took the job over");
                Outcome::lost
            }
        }
    }

    /// Ends a job that cannot go on: failed for a permanent reason or on the last delivery;
    /// otherwise handed back with a delay for another try.
    async fn give_up(&self, job: &mut Job, delivery: &Delivery, failure: Failure) -> Outcome {
        let (code, reason) = match &failure {
            Failure::Transient(_) if delivery.receive_count < self.settings.max_receives => {
                let delay = self.settings.retry_delay(delivery.receive_count);
                warn!(error = &failure as &dyn std::error::Error, ?delay, "transient failure; will retry");
                self.release(delivery, delay).await;
                return Outcome::retried;
            }
            Failure::Transient(err) => {
                (JobErrorCode::RenderFailed, format!("{err} (gave up after {} deliveries)", delivery.receive_count))
            }
            Failure::Permanent(err) => (err.code(), err.to_string()),
        };
        warn!(error = &failure as &dyn std::error::Error, ?code, "job failed");
        match self.runs.fail(job, code, &reason, Utc::now()).await {
            Ok(Written::Lost) => Outcome::lost,
            Ok(_) => {
                self.acknowledge(delivery).await;
                Outcome::failed
            }
            Err(err) => {
                warn!(
                    error = &err as &dyn std::error::Error,
                    "could not record the failure; the message will come back"
                );
                self.release(delivery, self.settings.retry_delay(delivery.receive_count)).await;
                Outcome::retried
            }
        }
    }

    /// Renews the message's lease every heartbeat until the returned token is canceled, in the
    /// job's span.
    fn heartbeat(&self, delivery: &Delivery) -> CancellationToken {
        let stop = CancellationToken::new();
        let (queue, receipt, lease, every) =
            (self.ports.queue.clone(), delivery.receipt.clone(), self.settings.lease, self.settings.heartbeat);
        let token = stop.clone();
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(every) => {
                            if let Err(err) = queue.extend(&receipt, lease).await {
                                warn!(error = &err as &dyn std::error::Error, "heartbeat failed");
                            }
                        }
                        () = token.cancelled() => return,
                    }
                }
            }
            .instrument(Span::current()),
        );
        stop
    }

    async fn acknowledge(&self, delivery: &Delivery) {
        if let Err(err) = self.ports.queue.delete(&delivery.receipt).await {
            // The message comes back after its lease; the job's status makes that harmless.
            warn!(error = &err as &dyn std::error::Error, "deleting the message failed");
        }
    }

    async fn release(&self, delivery: &Delivery, delay: Duration) {
        if let Err(err) = self.ports.queue.release(&delivery.receipt, delay).await {
            warn!(
                error = &err as &dyn std::error::Error,
                "handing the message back failed; it returns when its lease ends"
            );
        }
    }
}

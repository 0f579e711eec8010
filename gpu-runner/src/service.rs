//! The runner service: long-polls the work queue while it has room, and takes each delivered job
//! through start → render (on its model's session thread) → encode (blocking pool) → upload →
//! succeeded, renewing the message's lease while it works and acknowledging it only at the end.
//!
//! | what happened                              | job record            | message                      |
//! |--------------------------------------------|-----------------------|------------------------------|
//! | unreadable message, missing or ended job   | untouched             | deleted                      |
//! | succeeded / canceled / permanent failure   | succeeded / canceled / failed | deleted              |
//! | canceled: its artifact cannot be removed   | stays running         | back after a growing delay   |
//! | transient failure (AWS, IO, runtime)       | stays running         | back after a growing delay   |
//! | transient failure on the last delivery     | failed                | deleted                      |
//! | shutdown deadline passed                   | stays running         | back at once (visibility 0)  |
//! | another runner took the job over           | theirs                | left alone                   |
//!
//! A job whose runner dies stays running until its lease ends; the next delivery restarts it
//! (running → running, attempt + 1) and overwrites the same artifact key; if the client
//! canceled it meanwhile, the next delivery removes whatever artifact the dead run uploaded and
//! then cancels it. A canceled job never keeps an artifact: a run whose upload loses the race
//! with a cancel removes it before recording the cancel. A message that is never acknowledged
//! goes to the dead-letter queue, whose handler fails the job.

use bytes::Bytes;
use chrono::Utc;
use kiln_app::{
    AppError, JobMessage, JobRuns, Start, Written,
    ports::{ArtifactStore, Delivery, JobStore, ObjectError, ObjectStore, PortError, WorkQueue},
    runs::Unserved,
};
use kiln_domain::{Job, JobErrorCode, JobStatus, Output, Timings};
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
    fairness::{Arrival, Intake, Offer, ScanBudget},
    fleet::Speeds,
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
    /// Where jobs' init images are read from.
    pub objects: Arc<dyn ObjectStore>,
}

pub struct Runner {
    ports: Ports,
    runs: JobRuns,
    /// Each model's sessions, one per device.
    sessions: HashMap<String, Vec<SessionHandle>>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// Fires when the shutdown deadline has passed: renders stop and hand their jobs back.
    hand_back: CancellationToken,
    /// Render speed per model, reported to the fleet board.
    speeds: Arc<Speeds>,
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
    /// The render ran past its model's budget for a job of this size (and, `stuck`, did not
    /// stop when asked).
    #[error("the render ran past its budget of {} s for a job of this size{}", budget.as_secs(),
        if *stuck { " and did not stop; the runner is being replaced" } else { "" })]
    TimedOut { budget: Duration, stuck: bool },
}

impl PermanentError {
    /// The error code recorded on the job.
    pub fn code(&self) -> JobErrorCode {
        match self {
            Self::NotServed { .. } | Self::Invalid(_) => JobErrorCode::InvalidForModel,
            Self::Encode(_) => JobErrorCode::RenderFailed,
            Self::TimedOut { .. } => JobErrorCode::RenderTimeout,
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
    /// The artifact store refused to remove a canceled job's artifact.
    #[error("removing the canceled job's artifact: {0}")]
    RemoveArtifact(#[source] PortError),
    /// The job store refused the cancel record.
    #[error("recording the cancel: {0}")]
    RecordCancel(#[source] AppError),
    /// The object store did not answer for the job's init image.
    #[error("reading the init image: {0}")]
    ReadImage(#[source] PortError),
}

/// Tells the run loop that a job of `tenant` ended, when dropped: also when its task panics, so
/// the intake never counts a dead job as running (which would hold its tenant over its share).
struct Ended {
    tenant: String,
    to: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        let _ = self.to.send(std::mem::take(&mut self.tenant));
    }
}

/// How long past its long-poll wait a receive may take before it is given up.
const RECEIVE_MARGIN: Duration = Duration::from_secs(10);

/// How long a message routed to other runners stays invisible.
const ROUTE_DELAY: Duration = Duration::from_secs(2);
/// How long a runner whose last receive brought only other versions' jobs stays off the queue:
/// past the routed messages' delay, so another runner gets them, by a random margin of up to 2 s,
/// so two runners sending each other's jobs back do not keep doing so in step.
fn route_backoff() -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    ROUTE_DELAY + Duration::from_millis(500 + u64::from(nanos % 2000))
}

/// Routes a message of another version that was delivered before, by what its job is now: a
/// queued job's goes back as a new message; the message a running job's run holds is released
/// (only it can restart the job); any other (an ended job's, a duplicate) is deleted.
async fn route_delivered_before(
    store: Arc<dyn JobStore>,
    queue: Arc<dyn WorkQueue>,
    delivery: Delivery,
    tenant: String,
) {
    let job = serde_json::from_str::<JobMessage>(&delivery.body).ok().map(|message| message.job_id);
    let stored = match job {
        Some(id) => store.get(&id).await,
        None => Ok(None),
    };
    let result = match stored {
        Ok(Some(job)) if job.status == JobStatus::Queued => queue.requeue(&[(delivery, tenant)], ROUTE_DELAY).await,
        Ok(Some(job))
            if job.status == JobStatus::Running && job.run_message.as_deref() == Some(delivery.message_id.as_str()) =>
        {
            queue.release(&delivery.receipt, ROUTE_DELAY).await
        }
        Ok(_) => queue.delete(&delivery.receipt).await,
        // Unknown: its lease brings it back.
        Err(err) => Err(err),
    };
    if let Err(err) = result {
        warn!(error = %err, "routing another version's job failed; its lease brings it back");
    }
}

/// What [`Runner::take_in`] sent back: deferred by fair share, and routed to other versions'
/// runners.
struct TakenIn {
    deferred: usize,
    routed: usize,
}

/// The window of the intake's deferral budget (`Settings::scan_budget` messages per window).
const SCAN_WINDOW: Duration = Duration::from_secs(10);

impl Runner {
    pub fn new(ports: Ports, sessions: Vec<SessionHandle>, settings: Settings, metrics: Arc<Metrics>) -> Self {
        Self {
            runs: JobRuns::new(ports.store.clone()),
            ports,
            sessions: sessions.into_iter().fold(HashMap::new(), |mut by_model, session| {
                by_model.entry(session.model.clone()).or_insert_with(Vec::new).push(session);
                by_model
            }),
            settings,
            metrics,
            hand_back: CancellationToken::new(),
            speeds: Arc::default(),
        }
    }

    /// Its render speed per model, fed by every job it renders (for [`crate::fleet::report`]).
    pub fn speeds(&self) -> Arc<Speeds> {
        self.speeds.clone()
    }

    /// The model versions it serves, as the fleet board keys them (`name@version`).
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> =
            self.sessions.values().flatten().map(|s| crate::fleet::board_key(&s.model, &s.version)).collect();
        models.sort();
        models.dedup();
        models
    }

    /// Runs until `shutdown`, then lets in-flight jobs finish within the deadline, hands back
    /// those still rendering, and returns once every job task has ended.
    ///
    /// What it receives goes through the fair intake ([`crate::fairness`]): held until a slot
    /// frees and its tenant's turn comes, or sent back to the end of the queue while its tenant
    /// has its share of the slots. A receive is always in flight while the runner may hold more,
    /// so a tenant's jobs behind another's backlog are found while the slots are busy.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(self.settings.max_in_flight));
        let mut intake: Intake<(Delivery, CancellationToken, String)> = Intake::new(self.settings.intake);
        let mut scan = ScanBudget::new(self.settings.scan_budget, SCAN_WINDOW);
        let (ended, mut endings) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut receiving: Option<tokio::task::JoinHandle<Result<Vec<Delivery>, PortError>>> = None;
        let mut foreign_until: Option<Instant> = None;
        self.metrics.set_ready(true);
        info!(max_in_flight = self.settings.max_in_flight, "runner polling");
        while !shutdown.is_cancelled() {
            if self.metrics.is_stuck() {
                // Jobs for the stuck model would hang too; the instance is being replaced.
                warn!("a render session is stuck; no more jobs are taken until shutdown");
                shutdown.cancelled().await;
                break;
            }
            // Start held jobs while slots are free.
            while let Ok(permit) = slots.clone().try_acquire_owned() {
                let Some((tenant, (delivery, hold, _))) = intake.start_next(Instant::now()) else { break };
                hold.cancel();
                let (runner, ended) = (self.clone(), Ended { tenant, to: ended.clone() });
                tracker.spawn(async move {
                    runner.metrics.in_flight.inc();
                    let outcome = runner.handle(delivery).await;
                    runner.metrics.count(outcome);
                    runner.metrics.in_flight.dec();
                    drop(permit);
                    drop(ended);
                });
            }
            self.metrics.held.set(intake.held() as i64);
            // A receive for a free slot no held message will take is never put off; one that
            // only looks ahead waits while the deferral budget is spent.
            let for_a_slot = slots.available_permits() > intake.held();
            let pause = if for_a_slot { Duration::ZERO } else { scan.wait(Instant::now()) };
            // After a receive that brought only other versions' jobs, this runner leaves the
            // queue to the runners that serve them for a moment (they would lose the race for
            // what it just sent back to a runner polling as fast as this one).
            let pause = pause
                .max(foreign_until.map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now())));
            let look_ahead = self.settings.intake.fair;
            if receiving.is_none() && intake.room() > 0 && pause.is_zero() && (for_a_slot || look_ahead) {
                let (queue, wait, lease) = (self.ports.queue.clone(), self.settings.poll_wait, self.settings.lease);
                // Looking ahead takes a full batch: what it may not hold goes back.
                let max = if for_a_slot { intake.room().min(10) } else { 10 } as u32;
                receiving = Some(tokio::spawn(async move {
                    // A receive that never answers (a connection the network dropped) would stop
                    // the runner for good: past its wait and a margin it is given up (whatever it
                    // would have brought comes back when its lease ends).
                    tokio::time::timeout(wait + RECEIVE_MARGIN, queue.receive(max, wait, lease))
                        .await
                        .unwrap_or_else(|_| Err(PortError::unavailable("sqs", "the receive did not answer in time")))
                }));
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(tenant) = endings.recv() => intake.finished(&tenant),
                received = async { receiving.as_mut().expect("guarded").await }, if receiving.is_some() => {
                    receiving = None;
                    match received {
                        Ok(Ok(deliveries)) => {
                            tracing::debug!(received = deliveries.len(), held = intake.held(), free = slots.available_permits(), "received");
                            let received = deliveries.len();
                            let TakenIn { deferred, routed } = self.take_in(&mut intake, deliveries);
                            scan.spend(deferred + routed, Instant::now());
                            foreign_until = (received > 0 && routed == received).then(|| Instant::now() + route_backoff());
                        }
                        Ok(Err(err)) => {
                            warn!(error = %err, "receiving from the job queue failed; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(err) => warn!(error = %err, "the receive task ended abnormally"),
                    }
                }
                () = tokio::time::sleep(pause), if receiving.is_none() && !pause.is_zero() => {}
            }
        }
        self.metrics.set_ready(false);
        if let Some(receiving) = receiving {
            // Messages it would have brought come back when their lease ends.
            receiving.abort();
        }
        for (delivery, hold, _) in intake.drain() {
            hold.cancel();
            self.release(&delivery, Duration::ZERO).await;
        }
        self.metrics.held.set(0);
        for session in self.sessions.values().flatten() {
            session.drain();
        }
        tracker.close();
        info!(in_flight = tracker.len(), deadline = ?self.settings.shutdown_deadline, "runner stopping");
        if tokio::time::timeout(self.settings.shutdown_deadline, tracker.wait()).await.is_err() {
            warn!(in_flight = tracker.len(), "shutdown deadline passed; handing the remaining jobs back");
            self.hand_back.cancel();
            tracker.wait().await;
        }
        info!("runner stopped");
    }

    /// Offers received messages to the intake: each is held (its lease kept by a heartbeat
    /// until it starts) or sent back to the end of the queue; a job of a model version this
    /// runner does not serve goes back for the runners that do (see [`Runner::route_elsewhere`]).
    fn take_in(
        &self,
        intake: &mut Intake<(Delivery, CancellationToken, String)>,
        deliveries: Vec<Delivery>,
    ) -> TakenIn {
        let (mut deferred, mut routed) = (Vec::new(), Vec::new());
        let (now, wall) = (Instant::now(), Utc::now());
        for delivery in deliveries {
            // An unreadable message is held under no tenant: its task deletes it.
            let message = serde_json::from_str::<JobMessage>(&delivery.body).ok();
            let tenant = message.as_ref().map(|m| m.tenant_id.to_string()).unwrap_or_default();
            let age = message
                .as_ref()
                .and_then(|m| m.created_at)
                .and_then(|created| (wall - created).to_std().ok())
                .unwrap_or_default();
            if let Some(message) = &message
                && !self.serves(&message.model, &message.model_version)
                && age < self.settings.unserved_wait
            {
                // Past the wait it is held like any other, and its task fails it.
                self.metrics.count(Outcome::routed);
                self.metrics.count_version(&message.model, &message.model_version, Outcome::routed);
                info!(job_id = %message.job_id, version = %message.model_version, "version not served here: back to the queue for its runners");
                routed.push((delivery, tenant));
                continue;
            }
            let arrival = Arrival {
                tenant: &tenant,
                weight: message.as_ref().and_then(|m| m.weight).unwrap_or(1),
                priority: message.as_ref().map(|m| m.priority).unwrap_or_default(),
                born: now.checked_sub(age).unwrap_or(now),
                pinned: delivery.receive_count > 1,
            };
            let hold = self.heartbeat(&delivery);
            match intake.offer(arrival, (delivery, hold, tenant.clone()), now) {
                Offer::Held => {}
                Offer::Defer((delivery, hold, tenant)) => {
                    hold.cancel();
                    deferred.push((delivery, tenant));
                }
            }
        }
        let taken = TakenIn { deferred: deferred.len(), routed: routed.len() };
        self.metrics.deferred.inc_by(deferred.len() as u64);
        self.send_back(deferred, self.settings.defer_delay);
        // A message delivered before may be the one a running job's run holds: that one is
        // released, never sent again as a new message (which could not restart the job); any
        // other goes back as a new message, since releasing it again and again would take it
        // to the dead-letter queue.
        let (again, first): (Vec<_>, Vec<_>) = routed.into_iter().partition(|(delivery, _)| delivery.receive_count > 1);
        self.send_back(first, ROUTE_DELAY);
        for (delivery, tenant) in again {
            let (store, queue) = (self.ports.store.clone(), self.ports.queue.clone());
            tokio::spawn(route_delivered_before(store, queue, delivery, tenant));
        }
        taken
    }

    /// Sends messages back to the end of the queue, invisible for `delay`, while the runner
    /// reads on.
    fn send_back(&self, messages: Vec<(Delivery, String)>, delay: Duration) {
        if messages.is_empty() {
            return;
        }
        let queue = self.ports.queue.clone();
        tokio::spawn(async move {
            if let Err(err) = queue.requeue(&messages, delay).await {
                // Their leases run out and they come back by themselves.
                warn!(error = %err, "sending messages back to the queue failed");
            }
        });
    }

    /// One delivery, start to end, in the job's span (`job_id`, `attempt` and `model` recorded
    /// once known); its heartbeat and render run in it too.
    async fn handle(&self, delivery: Delivery) -> Outcome {
        let span = info_span!(
            "job",
            job_id = field::Empty,
            attempt = field::Empty,
            model = field::Empty,
            device = field::Empty,
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
        let outcome = self.handle_message(&message, delivery).await;
        self.metrics.count_version(&message.model, &message.model_version, outcome);
        outcome
    }

    /// Whether this runner has sessions for `model` at `version`.
    fn serves(&self, model: &str, version: &str) -> bool {
        self.sessions.get(model).is_some_and(|sessions| sessions.iter().any(|s| s.version == version))
    }

    async fn handle_message(&self, message: &JobMessage, delivery: Delivery) -> Outcome {
        let span = Span::current();
        if !self.serves(&message.model, &message.model_version) {
            return self.route_elsewhere(message, &delivery).await;
        }
        if self.metrics.is_stuck() {
            // Received while a session got stuck: another runner should have it.
            self.release(&delivery, Duration::ZERO).await;
            return Outcome::handed_back;
        }
        let mut job = match self.runs.start(&message.job_id, &delivery.message_id, Utc::now()).await {
            Ok(Start::Render(job)) => job,
            Ok(Start::Cancel(mut job)) => {
                info!("the job's cancel was requested while no runner held it");
                return self.cancel(&mut job, &delivery).await;
            }
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
        // Stopped when dropped: also when this task panics, so the message's lease runs out and
        // another delivery takes the job (a heartbeat left running would hold it for ever).
        let _heartbeat = self.heartbeat(&delivery).drop_guard();
        self.work(&mut job, &delivery).await
    }

    /// Renders, encodes, uploads and records the result of a started job.
    /// A job for a model version this runner does not serve (a rollout, a canary), past the
    /// intake (which routes the young ones itself, see [`Runner::take_in`]): its message
    /// goes back to the queue for the runners that serve it, as a new message (a returned one
    /// would count toward the dead-letter queue), or released when it was delivered before (it
    /// may be the message a running job's run holds, the only one that can restart it). Once
    /// the job has waited [`Settings::unserved_wait`] since it was accepted, it fails
    /// `model_version_unavailable` instead.
    async fn route_elsewhere(&self, message: &JobMessage, delivery: &Delivery) -> Outcome {
        let waited = message.created_at.and_then(|created| (Utc::now() - created).to_std().ok()).unwrap_or_default();
        if waited < self.settings.unserved_wait {
            info!(version = %message.model_version, receive_count = delivery.receive_count, "version not served here: back to the queue for its runners");
            let tenant = message.tenant_id.to_string();
            if delivery.receive_count > 1 {
                route_delivered_before(self.ports.store.clone(), self.ports.queue.clone(), delivery.clone(), tenant)
                    .await;
            } else if let Err(err) = self.ports.queue.requeue(&[(delivery.clone(), tenant)], ROUTE_DELAY).await {
                warn!(error = %err, "sending the message back failed; releasing it");
                self.release(delivery, ROUTE_DELAY).await;
            }
            return Outcome::routed;
        }
        let serving: Vec<String> = match self.sessions.get(&message.model) {
            Some(sessions) => sessions.iter().map(|s| s.version.clone()).collect(),
            None => Vec::new(),
        };
        let reason = format!(
            "no runner served model `{}` version {} within {} s of the job's submission (runners seen serve {})",
            message.model,
            message.model_version,
            self.settings.unserved_wait.as_secs(),
            if serving.is_empty() { "other models".to_owned() } else { format!("version {}", serving.join(", ")) }
        );
        match self.runs.version_unavailable(&message.job_id, &reason, Utc::now()).await {
            Ok(Unserved::Failed) => {
                info!(version = %message.model_version, "no runner served the job's version in time: failed");
                self.acknowledge(delivery).await;
                Outcome::failed
            }
            // Its run's message (that run's runner died): a runner of its version may still
            // take it over.
            Ok(Unserved::Running) => {
                self.release(delivery, ROUTE_DELAY).await;
                Outcome::routed
            }
            Ok(Unserved::Ended) => {
                self.acknowledge(delivery).await;
                Outcome::skipped
            }
            Err(err) => {
                warn!(
                    error = &err as &dyn std::error::Error,
                    "could not fail the unserved job; it will be delivered again"
                );
                self.release(delivery, self.settings.retry_delay(delivery.receive_count)).await;
                Outcome::retried
            }
        }
    }

    async fn work(&self, job: &mut Job, delivery: &Delivery) -> Outcome {
        let served = self.sessions.get(&job.model).filter(|sessions| !sessions.is_empty());
        let session = match served {
            Some(sessions) if sessions[0].version == job.model_version => {
                // The least loaded device's session (see `placement`).
                let loads: Vec<_> = sessions.iter().map(SessionHandle::load).collect();
                let session = &sessions[crate::placement::least_loaded(&loads).unwrap_or(0)];
                Span::current().record("device", field::display(session.device));
                session
            }
            served => {
                let serving =
                    served.map_or_else(|| "not at all".to_owned(), |s| format!("at version {}", s[0].version));
                let failure =
                    PermanentError::NotServed { model: job.model.clone(), version: job.model_version.clone(), serving };
                return self.give_up(job, delivery, failure.into()).await;
            }
        };
        let init_image = match self.init_image(job).await {
            Ok(image) => image,
            Err(failure) => return self.give_up(job, delivery, failure).await,
        };
        let control = Arc::new(RenderControl::default());
        let budget = session.budget.for_job(&job.params);
        let rendered = match self.render(job, session, &control, budget, init_image).await {
            Ok(Some(rendered)) => rendered,
            Ok(None) => {
                return self.give_up(job, delivery, PermanentError::TimedOut { budget, stuck: true }.into()).await;
            }
            Err(failure) => return self.give_up(job, delivery, TransientError::Render(failure).into()).await,
        };
        let frames = match rendered.result {
            Ok(frames) => frames,
            Err(RenderError::Stopped(StopReason::TimedOut)) => {
                return self.give_up(job, delivery, PermanentError::TimedOut { budget, stuck: false }.into()).await;
            }
            Err(RenderError::Stopped(reason)) => return self.stopped(job, delivery, reason).await,
            Err(RenderError::Invalid(reason)) => {
                return self.give_up(job, delivery, PermanentError::Invalid(reason).into()).await;
            }
            Err(RenderError::Runtime(failure)) => {
                return self.give_up(job, delivery, TransientError::Render(failure).into()).await;
            }
        };
        self.metrics.render.observe(rendered.render_time.as_secs_f64());
        let version = crate::metrics::VersionLabels { model: job.model.clone(), version: job.model_version.clone() };
        self.metrics.version_render.get_or_create(&version).observe(rendered.render_time.as_secs_f64());
        let key = crate::fleet::board_key(&job.model, &job.model_version);
        self.speeds.rendered(&key, session.cost.units(&job.params), rendered.render_time);

        let params = &job.params;
        let warnings = frames.notes.clone();
        // A video's poster: its first frame as a PNG, beside it.
        let poster = job.poster_key().zip(frames.frames.first()).map(|(key, first)| {
            let still = crate::render::Frames {
                width: frames.width,
                height: frames.height,
                frames: vec![first.clone()],
                notes: Vec::new(),
            };
            (key, Arc::new(still))
        });
        let started = Instant::now();
        let mut encoded = vec![(
            job.artifact_key(),
            params.format,
            encode::encode(params.format, frames, params.fps.unwrap_or(1)).await,
        )];
        if let Some((key, still)) = poster {
            encoded.push((
                key,
                kiln_domain::OutputFormat::Png,
                encode::encode(kiln_domain::OutputFormat::Png, still, 1).await,
            ));
        }
        let encode_time = started.elapsed();
        let mut files = Vec::new();
        for (key, format, result) in encoded {
            match result {
                Ok(bytes) => files.push((
                    Output { key, content_type: format.content_type().to_owned(), bytes: bytes.len() as u64 },
                    Bytes::from(bytes),
                )),
                Err(err) => return self.give_up(job, delivery, PermanentError::Encode(err).into()).await,
            }
        }
        self.metrics.encode.observe(encode_time.as_secs_f64());

        let started = Instant::now();
        let mut outputs = Vec::new();
        for (output, bytes) in files {
            if let Err(err) = self.ports.artifacts.put(&output.key, &output.content_type, bytes).await {
                return self.give_up(job, delivery, TransientError::Artifact(err).into()).await;
            }
            outputs.push(output);
        }
        let upload_time = started.elapsed();
        self.metrics.upload.observe(upload_time.as_secs_f64());

        let millis = |d: Duration| Some(d.as_millis() as u64);
        let timings = Timings {
            queue_ms: None,
            batch_wait_ms: millis(rendered.batch_wait),
            render_ms: millis(rendered.render_time),
            encode_ms: millis(encode_time),
            upload_ms: millis(upload_time),
        };
        match self.runs.succeed(job, outputs, timings, warnings, Utc::now()).await {
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

    /// The job's init image, read and fitted to its frame. It was checked when the job was
    /// accepted, so one that is gone (past the bucket's retention) or no longer decodes fails
    /// the job; an object store that does not answer is worth another delivery.
    async fn init_image(&self, job: &Job) -> Result<Option<Arc<crate::render::input::InputImage>>, Failure> {
        let Some(image) = &job.params.init_image else { return Ok(None) };
        let limit = kiln_domain::image::MAX_IMAGE_BYTES as usize;
        let bytes = match self.ports.objects.get(&image.key, None, limit).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                return Err(PermanentError::Invalid(format!(
                    "init_image: the image is gone from {} (uploaded images are kept for a limited time)",
                    image.key
                ))
                .into());
            }
            Err(ObjectError::TooLarge { limit }) => {
                return Err(PermanentError::Invalid(format!("init_image: larger than {limit} bytes")).into());
            }
            Err(ObjectError::Port(err)) => return Err(TransientError::ReadImage(err).into()),
        };
        crate::render::input::fit(&bytes, job.params.width, job.params.height)
            .map(Some)
            .map_err(|err| PermanentError::Invalid(format!("init_image: the image does not decode: {err}")).into())
    }

    /// Hands the job to its session and, until the frames come back, writes progress, watches
    /// for a cancel request or a lost job, and stops the render when the shutdown deadline passes
    /// or its `budget` runs out (the watchdog). None when the session did not stop within the
    /// stuck grace after that: the session thread is stuck, and the runner is marked so.
    async fn render(
        &self,
        job: &mut Job,
        session: &SessionHandle,
        control: &Arc<RenderControl>,
        budget: Duration,
        init_image: Option<Arc<crate::render::input::InputImage>>,
    ) -> Result<Option<Rendered>, RuntimeFailure> {
        let (reply, mut frames) = oneshot::channel();
        let request = RenderRequest { params: job.params.clone(), control: control.clone(), init_image };
        // Carries the job's span to the session thread.
        let render_job = RenderJob::new(job.id.to_string(), BatchKey::of(job), request, reply);
        session.submit(render_job).await?;
        let mut reported = job.progress;
        let mut ticker = tokio::time::interval(self.settings.progress_interval);
        ticker.tick().await;
        // Fires when the budget runs out (the render is asked to stop), then again after the
        // stuck grace (the session did not stop).
        let watchdog = tokio::time::sleep(budget);
        tokio::pin!(watchdog);
        let mut asked_to_stop = false;
        loop {
            tokio::select! {
                rendered = &mut frames => {
                    return rendered.map(Some).map_err(|_| RuntimeFailure::Dropped);
                }
                () = &mut watchdog => {
                    if asked_to_stop {
                        error!(model = %session.model, grace_s = self.settings.stuck_grace.as_secs(),
                            "the render session did not stop: it is stuck; taking no more jobs");
                        self.metrics.set_stuck();
                        return Ok(None);
                    }
                    warn!(budget_s = budget.as_secs(), "the render ran past its budget; stopping it");
                    control.stop(StopReason::TimedOut);
                    asked_to_stop = true;
                    watchdog.as_mut().reset(tokio::time::Instant::now() + self.settings.stuck_grace);
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
            StopReason::Canceled => self.cancel(job, delivery).await,
            StopReason::HandedBack => {
                info!("handing the job back");
                self.release(delivery, Duration::ZERO).await;
                Outcome::handed_back
            }
            StopReason::Lost => {
                info!("another runner took the job over");
                Outcome::lost
            }
            StopReason::TimedOut => unreachable!("a timed-out render is failed by `work`"),
        }
    }

    /// Ends a job whose cancel was requested: first removes its artifact (this run's upload
    /// that lost the race with the cancel, or an earlier run's that died before recording it),
    /// then records the cancel, so a cancel answered to the client never leaves a file behind
    /// even if this runner dies between the two.
    async fn cancel(&self, job: &mut Job, delivery: &Delivery) -> Outcome {
        for key in job.artifact_keys() {
            if let Err(err) = self.ports.artifacts.delete(&key).await {
                return self.give_up(job, delivery, TransientError::RemoveArtifact(err).into()).await;
            }
        }
        match self.runs.cancel(job, Utc::now()).await {
            Ok(_) => {
                info!("job canceled while running");
                self.acknowledge(delivery).await;
                Outcome::canceled
            }
            Err(err) => self.give_up(job, delivery, TransientError::RecordCancel(err).into()).await,
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

#[cfg(test)]
mod tests {
    //! `Runner::handle` over the in-memory ports, one row per line of the module's table.
    //! Failures come from small fakes: an artifact store that is down, a pipeline that refuses,
    //! fails, panics or renders until it is stopped.

    use super::*;
    use async_trait::async_trait;
    use kiln_app::{
        memory::{MemoryArtifacts, MemoryJobStore, MemoryWorkQueue},
        ports::CacheClaim,
    };
    use kiln_domain::{JobId, JobStatus, ModelSpec, Submission, TenantId, WebhookPolicy};
    use std::{path::Path, sync::Mutex};
    use tokio::sync::Notify;

    use crate::{
        render::{Frames, Pipeline},
        session,
    };

    /// What the runner did with the message.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fate {
        Untouched,
        Deleted,
        Released(Duration),
        Requeued,
    }

    /// The in-memory work queue, recording what became of each receipt.
    #[derive(Default)]
    struct RecordingQueue {
        inner: MemoryWorkQueue,
        fates: Mutex<HashMap<String, Vec<Fate>>>,
        /// The receipts of lease extensions (heartbeats), in order.
        extended: Mutex<Vec<String>>,
    }

    impl RecordingQueue {
        fn record(&self, receipt: &str, fate: Fate) {
            self.fates.lock().unwrap().entry(receipt.to_owned()).or_default().push(fate);
        }

        fn fate(&self, receipt: &str) -> Fate {
            let fates = self.fates.lock().unwrap().get(receipt).cloned().unwrap_or_default();
            assert!(fates.len() <= 1, "a message is deleted or released once: {fates:?}");
            fates.first().copied().unwrap_or(Fate::Untouched)
        }
    }

    #[async_trait]
    impl WorkQueue for RecordingQueue {
        async fn receive(&self, max: u32, wait: Duration, lease: Duration) -> Result<Vec<Delivery>, PortError> {
            self.inner.receive(max, wait, lease).await
        }

        async fn extend(&self, receipt: &str, lease: Duration) -> Result<(), PortError> {
            self.extended.lock().unwrap().push(receipt.to_owned());
            self.inner.extend(receipt, lease).await
        }

        async fn release(&self, receipt: &str, delay: Duration) -> Result<(), PortError> {
            self.record(receipt, Fate::Released(delay));
            self.inner.release(receipt, delay).await
        }

        async fn delete(&self, receipt: &str) -> Result<(), PortError> {
            self.record(receipt, Fate::Deleted);
            self.inner.delete(receipt).await
        }

        async fn requeue(&self, deliveries: &[(Delivery, String)], delay: Duration) -> Result<(), PortError> {
            for (delivery, _) in deliveries {
                self.record(&delivery.receipt, Fate::Requeued);
            }
            self.inner.requeue(deliveries, delay).await
        }
    }

    /// An artifact store that is down.
    struct DownArtifacts;

    /// The in-memory artifact store, except that its first upload panics (a bug anywhere in a
    /// job's handling).
    #[derive(Default)]
    struct PanicsOnce {
        inner: MemoryArtifacts,
        panicked: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl ArtifactStore for PanicsOnce {
        async fn put(&self, key: &str, content_type: &str, body: Bytes) -> Result<(), PortError> {
            if !self.panicked.swap(true, std::sync::atomic::Ordering::SeqCst) {
                panic!("a bug in the upload");
            }
            self.inner.put(key, content_type, body).await
        }

        async fn delete(&self, key: &str) -> Result<(), PortError> {
            self.inner.delete(key).await
        }
    }

    /// The in-memory artifact store, where the client's cancel lands while the upload is in
    /// flight (after the render, before the success is recorded).
    struct CancelDuringUpload {
        inner: Arc<MemoryArtifacts>,
        store: Arc<MemoryJobStore>,
        job: JobId,
    }

    #[async_trait]
    impl ArtifactStore for CancelDuringUpload {
        async fn put(&self, key: &str, content_type: &str, body: Bytes) -> Result<(), PortError> {
            self.inner.put(key, content_type, body).await?;
            revise(&self.store, &self.job, |job| assert!(job.request_cancel(), "a running job")).await;
            Ok(())
        }

        async fn delete(&self, key: &str) -> Result<(), PortError> {
            self.inner.delete(key).await
        }
    }

    #[async_trait]
    impl ArtifactStore for DownArtifacts {
        async fn put(&self, _key: &str, _content_type: &str, _body: Bytes) -> Result<(), PortError> {
            Err(PortError::unavailable("s3", std::io::Error::other("connection reset")))
        }

        async fn delete(&self, _key: &str) -> Result<(), PortError> {
            Err(PortError::unavailable("s3", std::io::Error::other("connection reset")))
        }
    }

    /// What the fake pipeline does with a job.
    #[derive(Debug, Clone, Copy)]
    enum Render {
        /// Grey frames at once.
        Frames,
        /// Refuses the job as invalid for the model.
        Invalid,
        /// Panics.
        Panics,
        /// Reports progress step after step until it is asked to stop.
        UntilStopped,
        /// Grey frames after 300 ms.
        Slowly,
        /// Grey frames after 20 ms.
        Briefly,
    }

    struct FakePipeline {
        render: Render,
        /// Told when a render starts.
        started: Arc<Notify>,
    }

    impl Pipeline for FakePipeline {
        fn render(&mut self, request: &RenderRequest) -> Result<Frames, RenderError> {
            self.started.notify_one();
            let params = &request.params;
            match self.render {
                Render::Frames | Render::Slowly | Render::Briefly => {
                    match self.render {
                        Render::Slowly => std::thread::sleep(Duration::from_millis(300)),
                        Render::Briefly => std::thread::sleep(Duration::from_millis(20)),
                        _ => {}
                    }
                    Ok(Frames {
                        width: params.width,
                        height: params.height,
                        frames: vec![vec![128; (params.width * params.height * 3) as usize]],
                        notes: Vec::new(),
                    })
                }
                Render::Invalid => Err(RenderError::Invalid("the prompt is not a picture".into())),
                Render::Panics => panic!("a bug in the pipeline"),
                Render::UntilStopped => {
                    for step in 1.. {
                        request.control.check()?;
                        request.control.report(step, 1_000_000);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    unreachable!("the loop ends by a stop")
                }
            }
        }
    }

    /// What the delivered message refers to.
    #[derive(Debug, Clone, Copy)]
    enum Message {
        /// Not a job message at all.
        Unreadable,
        /// A job not in the store.
        Missing,
        /// A queued job, of a model version the runner serves or not.
        Queued { served: bool },
        /// A queued job of a version the runner does not serve, accepted longer ago than the
        /// wait for a runner that does.
        UnservedTooLong,
        /// A running job of a version the runner does not serve: its run's runner died and
        /// this is that run's message, back (accepted longer ago than the wait, or not).
        RunningUnserved { waited: bool },
        /// A job canceled before it was delivered.
        Ended,
        /// A job whose runner died after uploading its artifact (this message, back after its
        /// lease), canceled by the client meanwhile.
        CanceledWhileRunnerDead,
    }

    /// The artifact store the runner writes to.
    #[derive(Debug, Clone, Copy)]
    enum Artifacts {
        Up,
        Down,
        /// The client's cancel arrives while the upload is in flight.
        CancelDuringUpload,
    }

    /// What happens while the job renders.
    #[derive(Debug, Clone, Copy)]
    enum During {
        Nothing,
        /// The client asks to cancel.
        CancelRequest,
        /// Another runner starts the job (this runner's lease ran out).
        TakeOver,
        /// The shutdown deadline passes.
        ShutdownDeadline,
    }

    struct Case {
        name: &'static str,
        message: Message,
        render: Render,
        during: During,
        artifacts: Artifacts,
        /// The delivery's receive count (the last is 5).
        delivery: u32,
        outcome: Outcome,
        /// The job's status afterwards (`None`: no job).
        status: Option<JobStatus>,
        /// The failure recorded on the job: its code and a part of its message.
        error: Option<(JobErrorCode, &'static str)>,
        fate: Fate,
    }

    const fn case(name: &'static str, message: Message, render: Render) -> Case {
        Case {
            name,
            message,
            render,
            during: During::Nothing,
            artifacts: Artifacts::Up,
            delivery: 1,
            outcome: Outcome::succeeded,
            status: Some(JobStatus::Succeeded),
            error: None,
            fate: Fate::Deleted,
        }
    }

    const QUEUED: Message = Message::Queued { served: true };

    const CASES: &[Case] = &[
        Case {
            outcome: Outcome::skipped,
            status: None,
            ..case("unreadable message: deleted", Message::Unreadable, Render::Frames)
        },
        Case {
            outcome: Outcome::skipped,
            status: None,
            ..case("missing job: deleted", Message::Missing, Render::Frames)
        },
        Case {
            outcome: Outcome::skipped,
            status: Some(JobStatus::Canceled),
            ..case("ended job: untouched, deleted", Message::Ended, Render::Frames)
        },
        case("succeeded: deleted", QUEUED, Render::Frames),
        Case {
            during: During::CancelRequest,
            outcome: Outcome::canceled,
            status: Some(JobStatus::Canceled),
            ..case("canceled while rendering: deleted", QUEUED, Render::UntilStopped)
        },
        Case {
            artifacts: Artifacts::CancelDuringUpload,
            outcome: Outcome::canceled,
            status: Some(JobStatus::Canceled),
            ..case("canceled while uploading: the artifact removed, canceled, deleted", QUEUED, Render::Frames)
        },
        Case {
            delivery: 2,
            outcome: Outcome::canceled,
            status: Some(JobStatus::Canceled),
            ..case(
                "canceled while its runner was dead: the earlier run's artifact removed, canceled, deleted",
                Message::CanceledWhileRunnerDead,
                Render::Frames,
            )
        },
        Case {
            delivery: 2,
            artifacts: Artifacts::Down,
            outcome: Outcome::retried,
            status: Some(JobStatus::Running),
            fate: Fate::Released(Duration::from_secs(10)),
            ..case(
                "canceled, but its artifact cannot be removed: stays running, back after 10 s",
                Message::CanceledWhileRunnerDead,
                Render::Frames,
            )
        },
        Case {
            outcome: Outcome::failed,
            status: Some(JobStatus::Failed),
            error: Some((JobErrorCode::InvalidForModel, "the prompt is not a picture")),
            ..case("permanent failure (invalid for the model): failed, deleted", QUEUED, Render::Invalid)
        },
        Case {
            outcome: Outcome::routed,
            status: Some(JobStatus::Queued),
            fate: Fate::Requeued,
            ..case(
                "a version not served here: sent back for the runners that serve it, as a new message",
                Message::Queued { served: false },
                Render::Frames,
            )
        },
        Case {
            delivery: 2,
            outcome: Outcome::routed,
            status: Some(JobStatus::Queued),
            fate: Fate::Requeued,
            ..case(
                "a version not served here, delivered before, its job still queued: sent back as a new message (releasing it again and again would take it to the dead-letter queue)",
                Message::Queued { served: false },
                Render::Frames,
            )
        },
        Case {
            delivery: 2,
            outcome: Outcome::routed,
            status: Some(JobStatus::Running),
            fate: Fate::Released(Duration::from_secs(2)),
            ..case(
                "a running job's message of a version not served here (its runner died): released for a runner of its version, never resent",
                Message::RunningUnserved { waited: false },
                Render::Frames,
            )
        },
        Case {
            delivery: 2,
            outcome: Outcome::routed,
            status: Some(JobStatus::Running),
            fate: Fate::Released(Duration::from_secs(2)),
            ..case(
                "the same past the wait: still released, never failed (a runner of its version may take it over)",
                Message::RunningUnserved { waited: true },
                Render::Frames,
            )
        },
        Case {
            outcome: Outcome::failed,
            status: Some(JobStatus::Failed),
            error: Some((JobErrorCode::ModelVersionUnavailable, "(runners seen serve version 0.0.1)")),
            ..case(
                "a version no runner served within the wait: failed, deleted",
                Message::UnservedTooLong,
                Render::Frames,
            )
        },
        Case {
            artifacts: Artifacts::Down,
            outcome: Outcome::retried,
            status: Some(JobStatus::Running),
            fate: Fate::Released(Duration::from_secs(5)),
            ..case("transient failure (artifact store) on delivery 1: back after 5 s", QUEUED, Render::Frames)
        },
        Case {
            artifacts: Artifacts::Down,
            delivery: 3,
            outcome: Outcome::retried,
            status: Some(JobStatus::Running),
            fate: Fate::Released(Duration::from_secs(20)),
            ..case("transient failure on delivery 3: back after a longer delay", QUEUED, Render::Frames)
        },
        Case {
            delivery: 2,
            outcome: Outcome::retried,
            status: Some(JobStatus::Running),
            fate: Fate::Released(Duration::from_secs(10)),
            ..case("transient failure (the pipeline panicked) on delivery 2: back after 10 s", QUEUED, Render::Panics)
        },
        Case {
            artifacts: Artifacts::Down,
            delivery: 5,
            outcome: Outcome::failed,
            status: Some(JobStatus::Failed),
            error: Some((
                JobErrorCode::RenderFailed,
                "storing the artifact: s3 call failed (gave up after 5 deliveries)",
            )),
            ..case("transient failure on the last delivery: failed, deleted", QUEUED, Render::Frames)
        },
        Case {
            delivery: 5,
            outcome: Outcome::failed,
            status: Some(JobStatus::Failed),
            error: Some((
                JobErrorCode::RenderFailed,
                "the pipeline panicked: a bug in the pipeline (gave up after 5 deliveries)",
            )),
            ..case("render failure on the last delivery: failed, deleted", QUEUED, Render::Panics)
        },
        Case {
            during: During::ShutdownDeadline,
            outcome: Outcome::handed_back,
            status: Some(JobStatus::Running),
            fate: Fate::Released(Duration::ZERO),
            ..case("shutdown deadline passed: stays running, back at once", QUEUED, Render::UntilStopped)
        },
        Case {
            during: During::TakeOver,
            outcome: Outcome::lost,
            status: Some(JobStatus::Running),
            fate: Fate::Untouched,
            ..case("another runner took the job over: left alone", QUEUED, Render::UntilStopped)
        },
    ];

    fn settings() -> Settings {
        Settings {
            max_in_flight: 4,
            intake: crate::fairness::IntakeLimits { slots: 4, hold: 4, fair: true },
            scan_budget: 400,
            defer_delay: Duration::ZERO,
            poll_wait: Duration::ZERO,
            lease: Duration::from_secs(60),
            heartbeat: Duration::from_secs(3600),
            progress_interval: Duration::from_millis(10),
            shutdown_deadline: Duration::from_secs(1),
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
            max_receives: 5,
            stuck_grace: Duration::from_secs(1),
            unserved_wait: Duration::from_secs(3600),
        }
    }

    fn demo_model() -> ModelSpec {
        ModelSpec::read_manifest(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kiln-demo")).unwrap()
    }

    fn new_job(model: &ModelSpec) -> Job {
        job_with_seed(model, 1)
    }

    fn job_with_seed(model: &ModelSpec, seed: u32) -> Job {
        let body =
            serde_json::json!({ "model": model.name, "prompt": "a lake", "width": 64, "height": 64, "seed": seed });
        let params = Submission::parse(body.to_string().as_bytes())
            .unwrap()
            .resolve(model, WebhookPolicy::default(), || 0)
            .unwrap()
            .params;
        let now = Utc::now();
        let (tenant, model_name) = (TenantId::parse("tests").unwrap(), model.name.clone());
        Job::new(
            JobId::generate(now),
            tenant,
            model_name,
            model.version.clone(),
            params,
            None,
            now,
            chrono::Duration::hours(1),
        )
    }

    /// Changes the stored job as another writer would: conditionally on the revision it read
    /// (set here, whether or not the change bumps it), again on a lost race.
    async fn revise(store: &MemoryJobStore, id: &JobId, change: impl Fn(&mut Job)) {
        for _ in 0..100 {
            let mut job = store.get(id).await.unwrap().expect("the job");
            let read = job.revision;
            change(&mut job);
            job.revision = read + 1;
            if store.update(&job).await.unwrap() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the runner kept winning the race for job {id}");
    }

    async fn run_case(case: &Case) {
        let model = demo_model();
        let store = Arc::new(MemoryJobStore::default());
        let queue = Arc::new(RecordingQueue::default());
        let mut job = new_job(&model);
        if let Message::UnservedTooLong | Message::RunningUnserved { waited: true } = case.message {
            job.created_at -= chrono::Duration::hours(2);
        }
        let stored_artifacts = Arc::new(MemoryArtifacts::default());
        let artifacts: Arc<dyn ArtifactStore> = match case.artifacts {
            Artifacts::Up => stored_artifacts.clone(),
            Artifacts::Down => Arc::new(DownArtifacts),
            Artifacts::CancelDuringUpload => Arc::new(CancelDuringUpload {
                inner: stored_artifacts.clone(),
                store: store.clone(),
                job: job.id.clone(),
            }),
        };
        if let Message::Ended = case.message {
            job.transition(JobStatus::Canceled, Utc::now()).unwrap();
        }
        if let Message::Queued { .. }
        | Message::UnservedTooLong
        | Message::RunningUnserved { .. }
        | Message::Ended
        | Message::CanceledWhileRunnerDead = case.message
        {
            store.insert(&job, &CacheClaim { key: job.cache_key.clone(), replaces: None }, None).await.unwrap();
        }
        let inserted = store.get(&job.id).await.unwrap();
        queue.inner.push(match case.message {
            Message::Unreadable => "{\"type\":\"not a job\"".to_owned(),
            _ => serde_json::to_string(&JobMessage::for_job(&job)).unwrap(),
        });

        let served_version = match case.message {
            Message::Queued { served: false } | Message::UnservedTooLong | Message::RunningUnserved { .. } => {
                "0.0.1".to_owned()
            }
            _ => model.version.clone(),
        };
        let started = Arc::new(Notify::new());
        let pipeline = Box::new(FakePipeline { render: case.render, started: started.clone() });
        let metrics = Arc::new(Metrics::default());
        let policy = crate::batching::FillPolicy { max_batch: 1, max_queue_delay: Duration::ZERO };
        let device = crate::render::runtime::Device::Cpu;
        let (session, _thread) =
            session::spawn(model.name.clone(), served_version, device, pipeline, policy, metrics.clone());
        let ports = Ports {
            store: store.clone(),
            queue: queue.clone(),
            artifacts,
            objects: Arc::new(MemoryArtifacts::default()),
        };
        let runner = Runner::new(ports, vec![session], settings(), metrics);

        let delivery = queue.inner.receive(1, Duration::ZERO, Duration::from_secs(60)).await.unwrap().remove(0);
        let delivery = Delivery { receive_count: case.delivery, ..delivery };
        let (receipt, message_id) = (delivery.receipt.clone(), delivery.message_id.clone());
        if let Message::RunningUnserved { .. } = case.message {
            // The first delivery of this message started the job on a runner of its version,
            // which died.
            let started = JobRuns::new(store.clone()).start(&job.id, &message_id, Utc::now()).await.unwrap();
            assert!(matches!(started, Start::Render(_)));
        }
        if let Message::CanceledWhileRunnerDead = case.message {
            // The first delivery of this message started the job and uploaded its artifact;
            // then its runner died, and the client canceled.
            let started = JobRuns::new(store.clone()).start(&job.id, &message_id, Utc::now()).await.unwrap();
            assert!(matches!(started, Start::Render(_)));
            let key = job.artifact_key();
            stored_artifacts.put(&key, "image/png", Bytes::from_static(b"png")).await.unwrap();
            revise(&store, &job.id, |job| assert!(job.request_cancel(), "a running job")).await;
        }
        let intervene = async {
            if let During::Nothing = case.during {
                return;
            }
            started.notified().await;
            match case.during {
                During::Nothing => {}
                During::CancelRequest => {
                    revise(&store, &job.id, |job| assert!(job.request_cancel(), "a running job")).await;
                }
                During::TakeOver => {
                    // The same message, back after the lease ran out.
                    let taken = JobRuns::new(store.clone()).start(&job.id, &message_id, Utc::now()).await.unwrap();
                    assert!(matches!(taken, Start::Render(_)), "the other runner starts it");
                }
                During::ShutdownDeadline => runner.hand_back.cancel(),
            }
        };
        let both = async { tokio::join!(runner.handle(delivery), intervene).0 };
        let outcome = tokio::time::timeout(Duration::from_secs(10), both).await.expect("handled in time");

        assert_eq!(outcome, case.outcome, "{}: outcome", case.name);
        assert_eq!(queue.fate(&receipt), case.fate, "{}: the message", case.name);
        let stored = store.get(&job.id).await.unwrap();
        assert_eq!(stored.as_ref().map(|job| job.status), case.status, "{}: the job's status", case.name);
        let error = stored.as_ref().and_then(|job| job.error.clone());
        match case.error {
            Some((code, message)) => {
                let error = error.unwrap_or_else(|| panic!("{}: no error recorded", case.name));
                assert_eq!(error.code, code, "{}: error code", case.name);
                assert!(error.message.contains(message), "{}: error message {:?}", case.name, error.message);
            }
            None => assert_eq!(error, None, "{}: error", case.name),
        }
        match case.message {
            Message::Ended => assert_eq!(stored, inserted, "{}: an ended job is left untouched", case.name),
            _ if case.status == Some(JobStatus::Succeeded) => {
                let stored = stored.as_ref().expect("the job");
                assert_eq!(stored.outputs.len(), 1, "{}: outputs", case.name);
                assert!(stored.timings.render_ms.is_some(), "{}: timings", case.name);
            }
            _ => {}
        }
        let left = stored_artifacts.keys();
        match case.artifacts {
            Artifacts::Down => {}
            _ if case.status == Some(JobStatus::Succeeded) => {
                assert_eq!(left.len(), 1, "{}: the artifact of a succeeded job", case.name);
            }
            // A canceled job's artifact is removed; a job still running may keep one until
            // its cancel (or the next delivery's upload) comes.
            _ if case.status == Some(JobStatus::Running) => {}
            _ => assert_eq!(left, Vec::<String>::new(), "{}: artifacts of a job that did not succeed", case.name),
        }
        if let During::TakeOver = case.during {
            assert_eq!(stored.map(|job| job.attempts), Some(2), "{}: the other runner's attempt", case.name);
        }
    }

    /// Two devices' sessions of one model: four jobs at once are spread over both (the least
    /// loaded session takes the next job), and all succeed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_spread_over_the_devices_sessions() {
        let model = demo_model();
        let store = Arc::new(MemoryJobStore::default());
        let queue = Arc::new(RecordingQueue::default());
        let metrics = Arc::new(Metrics::default());
        let policy = crate::batching::FillPolicy { max_batch: 1, max_queue_delay: Duration::ZERO };
        let mut sessions = Vec::new();
        for device in [crate::render::runtime::Device::Cpu, crate::render::runtime::Device::Cuda(7)] {
            let pipeline = Box::new(FakePipeline { render: Render::Slowly, started: Arc::new(Notify::new()) });
            let (session, _thread) =
                session::spawn(model.name.clone(), model.version.clone(), device, pipeline, policy, metrics.clone());
            sessions.push(session);
        }
        let artifacts = Arc::new(MemoryArtifacts::default());
        let ports = Ports {
            store: store.clone(),
            queue: queue.clone(),
            artifacts,
            objects: Arc::new(MemoryArtifacts::default()),
        };
        let runner = Arc::new(Runner::new(ports, sessions, settings(), metrics.clone()));
        let mut jobs = Vec::new();
        for seed in 0..4 {
            let job = job_with_seed(&model, seed);
            store.insert(&job, &CacheClaim { key: job.cache_key.clone(), replaces: None }, None).await.unwrap();
            queue.inner.push(serde_json::to_string(&JobMessage::for_job(&job)).unwrap());
            jobs.push(job);
        }
        let deliveries = queue.inner.receive(4, Duration::ZERO, Duration::from_secs(60)).await.unwrap();
        let handled: Vec<_> = deliveries
            .into_iter()
            .map(|delivery| {
                let runner = runner.clone();
                tokio::spawn(async move { runner.handle(delivery).await })
            })
            .collect();
        for handle in handled {
            assert_eq!(handle.await.unwrap(), Outcome::succeeded);
        }
        let rendered = |device: &str| {
            let busy =
                metrics.device_render_busy.get_or_create(&crate::metrics::DeviceLabels { device: device.into() });
            // Each render takes 300 ms: the busy time says how many each device did.
            (busy.get() / 0.3).round() as u64
        };
        // Two each when the four are submitted within one render's time; on a loaded machine a
        // late one may find a device free again (still the least loaded): both must render.
        let (cpu, cuda) = (rendered("cpu"), rendered("cuda:7"));
        assert!(cpu >= 1 && cuda >= 1, "jobs on each device: cpu {cpu}, cuda {cuda}");
        for job in &jobs {
            assert_eq!(store.get(&job.id).await.unwrap().unwrap().status, JobStatus::Succeeded);
        }
    }

    /// The test settings with one job slot (and room to hold two messages).
    fn one_slot() -> Settings {
        Settings {
            max_in_flight: 1,
            intake: crate::fairness::IntakeLimits { slots: 1, hold: 2, fair: true },
            ..settings()
        }
    }

    /// Waits until `job` has succeeded; panics with `failure` (and the job) past `deadline`.
    async fn wait_for_success(store: &MemoryJobStore, job: &Job, deadline: Instant, failure: &str) {
        while store.get(&job.id).await.unwrap().unwrap().status != JobStatus::Succeeded {
            assert!(Instant::now() < deadline, "job {} {failure}: {:?}", job.id, store.get(&job.id).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A runner on `ports` with one CPU session of `model` whose renders take 20 ms.
    fn briefly_rendering_runner(
        model: &ModelSpec,
        ports: Ports,
        settings: Settings,
        metrics: &Arc<Metrics>,
    ) -> Arc<Runner> {
        let policy = crate::batching::FillPolicy { max_batch: 1, max_queue_delay: Duration::ZERO };
        let pipeline = Box::new(FakePipeline { render: Render::Briefly, started: Arc::new(Notify::new()) });
        let (session, _thread) = session::spawn(
            model.name.clone(),
            model.version.clone(),
            crate::render::runtime::Device::Cpu,
            pipeline,
            policy,
            metrics.clone(),
        );
        Arc::new(Runner::new(ports, vec![session], settings, metrics.clone()))
    }

    /// Tenant a's backlog of 40 is in the queue before tenant b's 5 jobs (the in-memory queue
    /// delivers in order, like moto): with fair share, b's jobs start within the first batch of
    /// starts after the runner's slots fill; without, after a's whole backlog. Starts are read
    /// from the jobs' `started_at`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_behind_anothers_backlog_starts_within_a_batch() {
        async fn b_positions(fair: bool) -> (Vec<usize>, u64) {
            let model = demo_model();
            let store = Arc::new(MemoryJobStore::default());
            let queue = Arc::new(RecordingQueue::default());
            let metrics = Arc::new(Metrics::default());
            let mut settings = settings();
            settings.intake.fair = fair;
            let ports = Ports {
                store: store.clone(),
                queue: queue.clone(),
                artifacts: Arc::new(MemoryArtifacts::default()),
                objects: Arc::new(MemoryArtifacts::default()),
            };
            let runner = briefly_rendering_runner(&model, ports, settings, &metrics);
            let mut jobs = Vec::new();
            for (tenant, count) in [("a", 40), ("b", 5)] {
                for seed in 0..count {
                    let mut job = job_with_seed(&model, seed);
                    job.tenant_id = TenantId::parse(tenant).unwrap();
                    store.insert(&job, &CacheClaim { key: job.cache_key.clone(), replaces: None }, None).await.unwrap();
                    queue.inner.push(serde_json::to_string(&JobMessage::for_job(&job)).unwrap());
                    jobs.push(job);
                }
            }
            let shutdown = CancellationToken::new();
            let running = tokio::spawn(runner.clone().run(shutdown.clone()));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let mut done = 0;
                for job in &jobs {
                    done += usize::from(store.get(&job.id).await.unwrap().unwrap().status == JobStatus::Succeeded);
                }
                if done == jobs.len() {
                    break;
                }
                assert!(Instant::now() < deadline, "{done} of {} jobs done in a minute", jobs.len());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            shutdown.cancel();
            running.await.unwrap();
            let mut starts = Vec::new();
            for job in &jobs {
                let stored = store.get(&job.id).await.unwrap().unwrap();
                starts.push((stored.started_at.expect("started"), stored.tenant_id.to_string()));
            }
            starts.sort();
            let positions = starts.iter().enumerate().filter(|(_, (_, t))| t == "b").map(|(i, _)| i).collect();
            (positions, metrics.deferred.get())
        }

        let (fair, deferred) = b_positions(true).await;
        eprintln!("fair share: b's jobs started {fair:?} of 45; {deferred} of a's messages deferred");
        // The first 4 starts are a's (the slots fill before b is read, and a holds its next in
        // line); b's first four come within the next few batches of starts, as its share of
        // the slots frees; its fifth, past its share, when it is read again. (Timing decides
        // the exact places: under a loaded machine they move, by up to 20 in one suite run,
        // which measured [4, 5, 7, 20, 30].) Without fair share they are the last five.
        assert!(fair[..3].iter().all(|&p| p < 18), "b's jobs started at {fair:?} of 45");
        assert!(fair[4] < 36, "b's jobs started at {fair:?} of 45");
        assert!(deferred > 0, "a's backlog was read past");
        let (unfair, deferred) = b_positions(false).await;
        assert_eq!(unfair, [40, 41, 42, 43, 44], "without fair share b waits for a's whole backlog");
        assert_eq!(deferred, 0);
    }

    /// A job whose runner died (its message delivered again, the job still running under it)
    /// while its tenant has its share: the message is held, not sent back as a new one — the
    /// new message's id would not be the run's, so nothing could restart the job (found by the
    /// 1,000-job chaos run: 5 jobs left running with no message anywhere).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_runners_job_is_taken_over_even_when_its_tenant_has_its_share() {
        let model = demo_model();
        let store = Arc::new(MemoryJobStore::default());
        let queue = Arc::new(RecordingQueue::default());
        let ports = Ports {
            store: store.clone(),
            queue: queue.clone(),
            artifacts: Arc::new(MemoryArtifacts::default()),
            objects: Arc::new(MemoryArtifacts::default()),
        };
        let runner = briefly_rendering_runner(&model, ports, one_slot(), &Arc::new(Metrics::default()));
        let (orphan, other) = (job_with_seed(&model, 1), job_with_seed(&model, 2));
        for job in [&orphan, &other] {
            store.insert(job, &CacheClaim { key: job.cache_key.clone(), replaces: None }, None).await.unwrap();
        }
        // A runner took the orphan's message and started it, then died: the message comes back.
        queue.inner.push(serde_json::to_string(&JobMessage::for_job(&orphan)).unwrap());
        let first = queue.inner.receive(1, Duration::ZERO, Duration::from_secs(60)).await.unwrap().remove(0);
        let started = JobRuns::new(store.clone()).start(&orphan.id, &first.message_id, Utc::now()).await.unwrap();
        assert!(matches!(started, Start::Render(_)));
        // The tenant's other job comes first in the queue; then the orphan's, delivered again.
        queue.inner.push(serde_json::to_string(&JobMessage::for_job(&other)).unwrap());
        queue.inner.release(&first.receipt, Duration::ZERO).await.unwrap();

        let shutdown = CancellationToken::new();
        let running = tokio::spawn(runner.clone().run(shutdown.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        for job in [&other, &orphan] {
            wait_for_success(&store, job, deadline, "never ended").await;
        }
        assert_eq!(store.get(&orphan.id).await.unwrap().unwrap().attempts, 2, "taken over");
        shutdown.cancel();
        running.await.unwrap();
    }

    /// A job whose handling panics (here its upload) neither holds its message for ever (its
    /// heartbeat stops, so the lease runs out and another delivery takes the job) nor its
    /// tenant's slot (the intake hears that it ended): the tenant's next job still starts on a
    /// runner of one slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_releases_its_lease_and_its_tenants_slot() {
        let model = demo_model();
        let store = Arc::new(MemoryJobStore::default());
        let queue = Arc::new(RecordingQueue::default());
        let mut settings = one_slot();
        settings.heartbeat = Duration::from_millis(20);
        let ports = Ports {
            store: store.clone(),
            queue: queue.clone(),
            artifacts: Arc::new(PanicsOnce::default()),
            objects: Arc::new(MemoryArtifacts::default()),
        };
        let runner = briefly_rendering_runner(&model, ports, settings, &Arc::new(Metrics::default()));
        let (first, second) = (job_with_seed(&model, 1), job_with_seed(&model, 2));
        for job in [&first, &second] {
            store.insert(job, &CacheClaim { key: job.cache_key.clone(), replaces: None }, None).await.unwrap();
            queue.inner.push(serde_json::to_string(&JobMessage::for_job(job)).unwrap());
        }
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(runner.clone().run(shutdown.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        wait_for_success(&store, &second, deadline, "never ran: its tenant's slot is held by the dead job").await;
        // The panicked job's heartbeat is over: no lease extension in ten heartbeats' time.
        let heartbeats = || queue.extended.lock().unwrap().len();
        let before = heartbeats();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let later = queue.extended.lock().unwrap()[before..].to_vec();
        assert!(later.is_empty(), "leases still extended after the jobs ended: {later:?}");
        assert_eq!(store.get(&first.id).await.unwrap().unwrap().status, JobStatus::Running, "left for redelivery");
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test]
    async fn each_delivery_ends_as_the_table_says() {
        // The runner's logs, shown for a failing row.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        for case in CASES {
            run_case(case).await;
        }
    }

    #[test]
    fn failures_keep_their_source_and_read_well_on_the_job() {
        use std::error::Error as _;
        let upload = Failure::from(TransientError::Artifact(PortError::unavailable(
            "s3",
            std::io::Error::other("connection reset"),
        )));
        assert_eq!(upload.to_string(), "storing the artifact: s3 call failed");
        let port = upload.source().expect("the port error");
        assert_eq!(port.source().map(ToString::to_string).as_deref(), Some("connection reset"));

        let session = TransientError::from(RuntimeFailure::SessionStopped);
        assert_eq!(session.to_string(), "the render session has stopped");

        let encode = PermanentError::from(EncodeError::Unsupported {
            format: kiln_domain::OutputFormat::Mp4,
            reason: "no frames".into(),
        });
        assert_eq!(encode.code(), JobErrorCode::RenderFailed);
    }
}

//! What follows a job's changes, over in-memory ports: webhook fan-out and delivery decisions,
//! inbox uploads and their outboxes. (The same use cases run over moto in `tests/`.)

use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use kiln_app::{
    Jobs, JobsConfig, Tenant,
    changes::JobChanges,
    delivery::{CircuitPolicy, Handled, WebhookDeliverer},
    inbox::{Inbox, InboxOutcome},
    memory::MemoryPorts,
    ports::{ArtifactStore, Delivery, JobStore, TenantDirectory, WebhookTransport},
};
use kiln_domain::{Job, JobEvent, JobStatus, ModelSpec, Output, TenantId, WebhookEvent, webhook_events};
use kiln_webhooks::{Attempt, DeliveryRequest, Failure, Jitter, Outcome, RetrySchedule};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

fn demo_model() -> ModelSpec {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../gpu-runner/models/kiln-demo");
    ModelSpec::read_manifest(&dir).unwrap()
}

fn tenant() -> Tenant {
    Tenant::new(TenantId::parse("acme").unwrap(), "Acme")
}

const WITH_WEBHOOK: &[u8] = br#"{"model":"kiln-demo","prompt":"a fox","seed":1,
    "webhook":{"url":"https://hooks.example.com/k","events":["started","completed"]}}"#;

/// A transport that answers each attempt with the next scripted outcome and keeps the requests.
#[derive(Default)]
struct ScriptedTransport {
    answers: Mutex<Vec<(Outcome, Option<u16>)>>,
    requests: Mutex<Vec<DeliveryRequest>>,
}

impl ScriptedTransport {
    fn answering(answers: Vec<(Outcome, Option<u16>)>) -> Arc<Self> {
        Arc::new(Self { answers: Mutex::new(answers), ..Self::default() })
    }
}

#[async_trait]
impl WebhookTransport for ScriptedTransport {
    async fn deliver(&self, request: &DeliveryRequest) -> Attempt {
        self.requests.lock().unwrap().push(request.clone());
        let (outcome, status) = self.answers.lock().unwrap().remove(0);
        let failed = outcome != Outcome::Delivered;
        Attempt {
            outcome,
            status,
            failure: failed.then_some(if status.is_some() { Failure::Status } else { Failure::Timeout }),
            error: failed.then(|| "scripted".to_owned()),
            duration: Duration::from_millis(5),
        }
    }
}

const ATTEMPTS: u32 = 5;

struct World {
    memory: MemoryPorts,
    jobs: Jobs,
}

fn world() -> World {
    let memory = MemoryPorts::with_models(vec![demo_model()]);
    let jobs = Jobs::new(&memory.ports(), JobsConfig::default());
    World { memory, jobs }
}

impl World {
    fn deliverer(&self, transport: Arc<ScriptedTransport>) -> WebhookDeliverer {
        let schedule =
            RetrySchedule::new(Duration::from_secs(30), Duration::from_secs(3600), ATTEMPTS, Jitter::Equal).unwrap();
        WebhookDeliverer::new(
            &self.memory.ports(),
            JobsConfig::default(),
            transport,
            schedule,
            CircuitPolicy::default(),
        )
    }

    /// A job with a webhook that has just succeeded, and the queue message of its `completed` event.
    async fn completed_event(&self) -> (Job, String) {
        let job = self.jobs.submit(&tenant(), WITH_WEBHOOK, None).await.unwrap().job;
        let before = self.finish(&job).await;
        let after = self.memory.store.get(&job.id).await.unwrap().unwrap();
        let events = webhook_events(Some(&before), &after, Utc::now());
        assert_eq!(events.len(), 1);
        (after, serde_json::to_string(&events[0]).unwrap())
    }

    /// Runs the job to success (as a runner would), returning it as it was while running.
    async fn finish(&self, job: &Job) -> Job {
        let store = &self.memory.store;
        let mut running = job.clone();
        running.transition(JobStatus::Running, Utc::now()).unwrap();
        running.revision += 1;
        assert!(store.update(&running).await.unwrap());
        let mut done = running.clone();
        done.outputs = vec![Output { key: done.output_key("png"), content_type: "image/png".into(), bytes: 3 }];
        self.memory.artifacts.put(&done.outputs[0].key, "image/png", Bytes::from_static(b"png")).await.unwrap();
        done.transition(JobStatus::Succeeded, Utc::now()).unwrap();
        done.revision += 1;
        assert!(store.update(&done).await.unwrap());
        running
    }

    async fn delivery_record(&self, job: &Job) -> kiln_domain::WebhookDelivery {
        self.memory.store.get(&job.id).await.unwrap().unwrap().webhook_delivery.unwrap_or_default()
    }
}

fn message(body: &str, receive_count: u32) -> Delivery {
    Delivery {
        message_id: format!("m-{receive_count}"),
        body: body.to_owned(),
        receipt: format!("receipt-{receive_count}"),
        receive_count,
        sent_at: None,
    }
}

#[tokio::test]
async fn a_delivered_event_is_signed_recorded_and_finished() {
    let world = world();
    let (job, body) = world.completed_event().await;
    let transport = ScriptedTransport::answering(vec![(Outcome::Delivered, Some(204))]);
    let handled = world.deliverer(transport.clone()).deliver(&message(&body, 1)).await.unwrap();
    assert_eq!(handled, Handled::Finished);
    let request = transport.requests.lock().unwrap()[0].clone();
    assert_eq!(request.url, "https://hooks.example.com/k");
    assert_eq!(request.message_id, format!("evt_{}_completed_{}", job.id, job.revision));
    assert_eq!(request.secrets.len(), 1, "signed with the tenant's secret, made on first use");
    let sent: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!((sent["type"].as_str(), sent["job"]["status"].as_str()), (Some("completed"), Some("succeeded")));
    assert!(sent["job"]["outputs"][0]["url"].as_str().is_some(), "the job carries fresh links: {sent}");
    let record = world.delivery_record(&job).await;
    assert_eq!((record.attempts, record.delivered, record.abandoned, record.last_status), (1, 1, 0, Some(204)));
    assert!(world.memory.webhook_queue.delays().is_empty(), "a finished message is deleted, not delayed");
}

#[tokio::test]
async fn a_failed_attempt_is_hidden_for_the_schedules_delay_and_the_last_one_goes_back_for_the_dlq() {
    let world = world();
    let (job, body) = world.completed_event().await;
    let retry = (Outcome::Retry { after: None }, Some(503));
    let transport = ScriptedTransport::answering(vec![retry, retry]);
    let deliverer = world.deliverer(transport);

    assert_eq!(deliverer.deliver(&message(&body, 1)).await.unwrap(), Handled::Later);
    let delays = world.memory.webhook_queue.delays();
    let (receipt, delay) = &delays[0];
    assert_eq!(receipt, "receipt-1");
    // Equal jitter before attempt 2: between half and all of the 30 s base.
    assert!((Duration::from_secs(15)..=Duration::from_secs(30)).contains(delay), "{delay:?}");

    assert_eq!(deliverer.deliver(&message(&body, ATTEMPTS)).await.unwrap(), Handled::Later);
    assert_eq!(world.memory.webhook_queue.delays()[1], ("receipt-5".to_owned(), Duration::ZERO));
    let record = world.delivery_record(&job).await;
    assert_eq!((record.attempts, record.delivered, record.abandoned), (2, 0, 1));
}

#[tokio::test]
async fn a_receivers_retry_after_is_a_lower_bound_and_a_refusal_is_final() {
    let world = world();
    let (job, body) = world.completed_event().await;
    let transport = ScriptedTransport::answering(vec![
        (Outcome::Retry { after: Some(Duration::from_secs(600)) }, Some(429)),
        (Outcome::GiveUp, Some(410)),
    ]);
    let deliverer = world.deliverer(transport);
    assert_eq!(deliverer.deliver(&message(&body, 1)).await.unwrap(), Handled::Later);
    assert_eq!(world.memory.webhook_queue.delays()[0].1, Duration::from_secs(600));
    assert_eq!(deliverer.deliver(&message(&body, 2)).await.unwrap(), Handled::Finished);
    let record = world.delivery_record(&job).await;
    assert_eq!((record.attempts, record.abandoned, record.last_status), (2, 1, Some(410)));
}

#[tokio::test]
async fn unreadable_messages_and_jobs_without_webhooks_are_finished_without_a_request() {
    let world = world();
    let transport = ScriptedTransport::answering(vec![]);
    let deliverer = world.deliverer(transport.clone());
    assert_eq!(deliverer.deliver(&message("{not json", 1)).await.unwrap(), Handled::Finished);
    let plain = world.jobs.submit(&tenant(), br#"{"model":"kiln-demo","prompt":"x"}"#, None).await.unwrap().job;
    let event = JobEvent {
        id: "evt_plain".into(),
        kind: WebhookEvent::Completed,
        timestamp: Utc::now(),
        job: plain,
        webhook: None,
    };
    let event = serde_json::to_string(&event).unwrap();
    assert_eq!(deliverer.deliver(&message(&event, 1)).await.unwrap(), Handled::Finished);
    assert!(transport.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_change_queues_the_subscribed_events_and_an_ended_inbox_job_writes_each_outbox() {
    let world = world();
    let changes = JobChanges::new(&world.memory.ports());
    let job = world.jobs.submit(&tenant(), WITH_WEBHOOK, None).await.unwrap().job;
    let mut job = job;
    job.outboxes = vec!["outbox/acme/a/".into(), "outbox/acme/b/".into()];
    let running = world.finish(&job).await;
    let mut done = world.memory.store.get(&job.id).await.unwrap().unwrap();
    done.outboxes = job.outboxes.clone();

    let effects = changes.on_change(Some(&job), Some(&running), Utc::now()).await.unwrap();
    assert_eq!((effects.events, effects.outboxes), (1, 0), "started, nothing ended");

    world.memory.artifacts.set_failing(true);
    assert!(changes.on_change(Some(&running), Some(&done), Utc::now()).await.is_err(), "S3 down: retried");
    world.memory.artifacts.set_failing(false);
    let effects = changes.on_change(Some(&running), Some(&done), Utc::now()).await.unwrap();
    assert_eq!(effects.outboxes, 2);
    let keys = world.memory.artifacts.keys();
    for outbox in ["outbox/acme/a/", "outbox/acme/b/"] {
        assert!(keys.contains(&format!("{outbox}output.png")), "{keys:?}");
        let (_, result) = world.memory.artifacts.get(&format!("{outbox}result.json")).unwrap();
        let result: serde_json::Value = serde_json::from_slice(&result).unwrap();
        assert_eq!((result["id"].as_str(), result["status"].as_str()), (Some(job.id.as_str()), Some("succeeded")));
    }
    let kinds: Vec<&str> = world.memory.webhook_queue.sent().iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["started", "completed", "completed"], "a retried change raises the same event again");
    let sent = world.memory.webhook_queue.sent();
    assert_eq!(sent[1].id, sent[2].id, "with the same id, so receivers drop the repeat");

    assert_eq!(changes.on_change(Some(&done), None, Utc::now()).await.unwrap(), Default::default(), "TTL delete");
}

struct InboxWorld {
    world: World,
    inbox: Inbox,
}

async fn inbox_world() -> InboxWorld {
    let world = world();
    world.memory.tenants.create_tenant(&tenant()).await.unwrap();
    let inbox = Inbox::new(&world.memory.ports(), JobsConfig::default(), 1024);
    InboxWorld { world, inbox }
}

impl InboxWorld {
    async fn upload(&self, key: &str, body: &str) {
        self.world.memory.artifacts.put(key, "application/json", Bytes::from(body.to_owned())).await.unwrap();
    }

    fn error_json(&self, outbox: &str) -> Option<serde_json::Value> {
        let (_, body) = self.world.memory.artifacts.get(&format!("{outbox}error.json"))?;
        serde_json::from_slice(&body).ok()
    }
}

#[tokio::test]
async fn an_upload_starts_one_job_however_often_it_is_announced() {
    let w = inbox_world().await;
    w.upload("inbox/acme/fox.json", r#"{"model":"kiln-demo","prompt":"a fox"}"#).await;
    let first = w.inbox.on_object("inbox/acme/fox.json", None, Some("\"etag-1\"")).await.unwrap();
    let InboxOutcome::Started(id) = &first else { panic!("{first:?}") };
    assert_eq!(w.inbox.on_object("inbox/acme/fox.json", None, Some("etag-1")).await.unwrap(), first);
    let job = w.world.memory.store.get(&kiln_domain::JobId::parse(id).unwrap()).await.unwrap().unwrap();
    assert_eq!(job.outboxes, ["outbox/acme/fox/"]);
    assert_eq!(w.world.memory.queue.sent().len(), 1, "queued once");
}

#[tokio::test]
async fn a_spec_the_api_would_refuse_gets_error_json_naming_the_field() {
    let w = inbox_world().await;
    w.upload("inbox/acme/big.json", r#"{"model":"kiln-demo","prompt":"x","width":99999}"#).await;
    let outcome = w.inbox.on_object("inbox/acme/big.json", None, Some("e")).await.unwrap();
    assert_eq!(outcome, InboxOutcome::Refused { code: "invalid_value" });
    let error = w.error_json("outbox/acme/big/").unwrap();
    assert_eq!(error["error"]["field"], "width", "{error}");

    w.upload("inbox/acme/huge.json", &format!(r#"{{"prompt":"{}"}}"#, "x".repeat(2000))).await;
    let outcome = w.inbox.on_object("inbox/acme/huge.json", None, Some("e")).await.unwrap();
    assert_eq!(outcome, InboxOutcome::Refused { code: "body_too_large" });
    assert!(w.world.memory.queue.sent().is_empty());
}

#[tokio::test]
async fn other_keys_and_unknown_tenants_are_ignored_and_an_outage_is_retried_not_refused() {
    let w = inbox_world().await;
    w.upload("inbox/nobody/x.json", r#"{"model":"kiln-demo","prompt":"x"}"#).await;
    for key in ["inbox/nobody/x.json", "inbox/acme/notes.txt", "inbox/acme/missing.json"] {
        let outcome = w.inbox.on_object(key, None, None).await.unwrap();
        assert!(matches!(outcome, InboxOutcome::Ignored(_)), "{key}: {outcome:?}");
    }
    w.upload("inbox/acme/later.json", r#"{"model":"kiln-demo","prompt":"later"}"#).await;
    w.world.memory.queue.set_failing(true);
    let err = w.inbox.on_object("inbox/acme/later.json", None, Some("e")).await.unwrap_err();
    assert!(err.is_ours(), "{err:?}");
    assert!(w.error_json("outbox/acme/later/").is_none(), "an outage is not the upload's fault");
    w.world.memory.queue.set_failing(false);
    let outcome = w.inbox.on_object("inbox/acme/later.json", None, Some("e")).await.unwrap();
    assert!(matches!(outcome, InboxOutcome::Started(_)), "{outcome:?}");
}

#[tokio::test]
async fn an_upload_answered_from_the_cache_writes_its_outbox_at_once() {
    let w = inbox_world().await;
    let spec = r#"{"model":"kiln-demo","prompt":"cached","seed":3}"#;
    let earlier = w.world.jobs.submit(&tenant(), spec.as_bytes(), None).await.unwrap().job;
    w.world.finish(&earlier).await;
    w.upload("inbox/acme/again.json", spec).await;
    let outcome = w.inbox.on_object("inbox/acme/again.json", None, Some("e")).await.unwrap();
    assert_eq!(outcome, InboxOutcome::Started(earlier.id.to_string()));
    let (_, result) = w.world.memory.artifacts.get("outbox/acme/again/result.json").expect("result.json");
    let result: serde_json::Value = serde_json::from_slice(&result).unwrap();
    assert_eq!(result["status"], "succeeded");
    assert!(w.world.memory.artifacts.get("outbox/acme/again/output.png").is_some());
}

/// The deliverer tells its observer (the function's metrics) of every recorded attempt, by
/// outcome.
#[tokio::test]
async fn every_recorded_attempt_reaches_the_observer_with_its_outcome() {
    let world = world();
    let (_, body) = world.completed_event().await;
    let transport = ScriptedTransport::answering(vec![
        (Outcome::Retry { after: None }, Some(503)),
        (Outcome::Delivered, Some(200)),
    ]);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = seen.clone();
    let deliverer =
        world.deliverer(transport).with_observer(std::sync::Arc::new(move |record: &kiln_app::AttemptRecord| {
            into.lock().unwrap().push((record.outcome, record.status))
        }));
    deliverer.deliver(&message(&body, 1)).await.unwrap();
    deliverer.deliver(&message(&body, 2)).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [(kiln_app::AttemptOutcome::Retrying, Some(503)), (kiln_app::AttemptOutcome::Delivered, Some(200))]
    );
}

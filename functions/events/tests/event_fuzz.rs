//! Property tests over the Lambda event payloads the event functions receive: the real shapes
//! (`events/` fixtures) with their fields replaced by random values — SQS dead letters with any
//! body, DynamoDB stream records with any images, S3 notifications of any key — handed to the
//! handlers as Lambda hands them, on the in-memory ports.
//!
//! Held for every case: no panic and no error (a record that cannot be read is logged and
//! skipped; retrying cannot fix it), no record reported as a batch failure (the in-memory ports
//! never fail), and a readable dead letter of a queued job among the garbage still fails that
//! job (`dead_lettered`). `PROPTEST_CASES=1000000` for the long run (RELIABILITY.md).

use aws_lambda_events::{dynamodb::Event as StreamEvent, s3::S3Event, sqs::SqsEvent};
use kiln_app::{
    JobMessage, JobRuns, Jobs, JobsConfig, Tenant,
    changes::JobChanges,
    inbox::Inbox,
    memory::MemoryPorts,
    ports::{ArtifactStore, JobStore, TenantDirectory},
};
use kiln_domain::{JobStatus, ModelSpec, TenantId};
use kiln_events::{inbox_trigger, job_dead_letters, job_events};
use kiln_lambda::LambdaEvent;
use proptest::{prelude::*, test_runner::TestRunner};
use serde_json::{Value, json};
use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../events").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Any JSON value of a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A DynamoDB attribute value of any type, sometimes of the wrong type for its field.
fn attribute() -> impl Strategy<Value = Value> {
    prop_oneof![
        ".{0,20}".prop_map(|s| json!({"S": s})),
        any::<i64>().prop_map(|n| json!({"N": n.to_string()})),
        ".{0,8}".prop_map(|s| json!({"N": s})),
        any::<bool>().prop_map(|b| json!({"BOOL": b})),
        Just(json!({"NULL": true})),
        Just(json!({"M": {}})),
        Just(json!({"L": [{"S": "x"}]})),
        any_json(),
    ]
}

/// A job image from the fixture with some fields replaced, removed, or all of it emptied.
fn image(base: Value) -> impl Strategy<Value = Value> {
    let fields: Vec<String> = base.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    let edits = prop::collection::vec((prop::sample::select(fields), prop::option::of(attribute())), 0..5);
    prop_oneof![
        6 => edits.prop_map(move |edits| {
            let mut image = base.clone();
            for (field, value) in edits {
                match value {
                    Some(value) => image[&field] = value,
                    None => {
                        image.as_object_mut().map(|o| o.remove(&field));
                    }
                }
            }
            image
        }),
        1 => Just(json!({})),
        1 => prop::collection::btree_map("[a-z_]{1,10}", attribute(), 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
    ]
}

/// A dead letter's body: the message of the case's queued job, of another id, or anything.
#[derive(Debug, Clone)]
enum Body {
    OfTheQueuedJob,
    Text(String),
}

fn message(id: &str) -> String {
    json!({"type": "render_job", "v": 1, "job_id": id, "tenant_id": "tenant-a", "model": "kiln-demo", "model_version": "1.0.0"})
        .to_string()
}

fn dead_letter_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        3 => Just(Body::OfTheQueuedJob),
        2 => "[0-9A-Z]{0,30}".prop_map(|id| Body::Text(message(&id))),
        2 => any_json().prop_map(|v| Body::Text(v.to_string())),
        1 => ".{0,60}".prop_map(Body::Text),
    ]
}

fn context() -> lambda_runtime::Context {
    kiln_lambda::local_context(Duration::from_secs(60))
}

/// One world of in-memory ports with a queued job of tenant-a.
struct World {
    runtime: tokio::runtime::Runtime,
    memory: MemoryPorts,
    jobs: Jobs,
}

impl World {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../gpu-runner/models");
        let models = ModelSpec::read_packages(&dir).unwrap().into_iter().map(|(_, model)| model).collect();
        let memory = MemoryPorts::with_models(models);
        let config = JobsConfig {
            default_limits: kiln_app::TenantLimits {
                max_active_jobs: 1_000_000,
                jobs_per_minute: 1_000_000,
                units_per_day: u64::MAX,
            },
            ..JobsConfig::default()
        };
        let jobs = Jobs::new(&memory.ports(), config);
        runtime.block_on(async {
            for id in ["tenant-a", "tenant-b"] {
                let tenant = Tenant::new(TenantId::parse(id).unwrap(), id);
                memory.tenants.create_tenant(&tenant).await.unwrap();
            }
        });
        Self { runtime, memory, jobs }
    }

    /// A new queued job of tenant-a; its id.
    fn queued_job(&self, n: u64) -> String {
        self.runtime.block_on(async {
            let tenant = self.memory.tenants.tenant(&TenantId::parse("tenant-a").unwrap()).await.unwrap().unwrap();
            let body = json!({"model": "kiln-demo", "prompt": format!("fuzzed {n}")}).to_string();
            self.jobs.submit(&tenant, body.as_bytes(), None).await.unwrap().job.id.to_string()
        })
    }
}

const CASES_PER_WORLD: u32 = 10_000;

fn cases() -> u32 {
    ProptestConfig::default().cases.max(1_000)
}

/// Runs `cases()` cases of `strategy` through `check`, with a fresh world every 10,000 cases.
fn run<S: Strategy>(strategy: S, check: impl Fn(&World, u64, S::Value) -> Result<(), TestCaseError>) {
    let mut done = 0;
    let n = std::cell::Cell::new(0u64);
    while done < cases() {
        let world = World::new();
        let batch = (cases() - done).min(CASES_PER_WORLD);
        let mut runner =
            TestRunner::new(ProptestConfig { cases: batch, failure_persistence: None, ..ProptestConfig::default() });
        runner
            .run(&strategy, |value| {
                n.set(n.get() + 1);
                check(&world, n.get(), value)
            })
            .unwrap();
        done += batch;
    }
}

#[test]
fn dead_letters_of_any_body_never_fail_the_function_and_a_readable_one_still_fails_its_job() {
    let template = fixture("sqs-job-dead-letters.json");
    let failed_jobs = AtomicUsize::new(0);
    run(prop::collection::vec(dead_letter_body(), 0..5), |world, n, bodies| {
        let queued = world.queued_job(n);
        let runs = Arc::new(JobRuns::new(world.memory.store.clone()));
        let bodies: Vec<String> = bodies
            .into_iter()
            .map(|body| match body {
                Body::OfTheQueuedJob => message(&queued),
                Body::Text(text) => text,
            })
            .collect();
        let mut event = template.clone();
        let record = event["Records"][0].clone();
        event["Records"] = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let mut record = record.clone();
                record["messageId"] = Value::from(format!("m-{n}-{i}"));
                record["body"] = Value::from(body.clone());
                record
            })
            .collect();
        let event: SqsEvent = serde_json::from_value(event).unwrap();
        let answer = world.runtime.block_on(job_dead_letters::handle(runs, LambdaEvent::new(event, context())));
        let answer = answer.map_err(|err| TestCaseError::fail(format!("the function failed: {err}")))?;
        prop_assert!(answer.batch_item_failures.is_empty(), "records came back: {:?}", answer.batch_item_failures);
        let readable =
            bodies.iter().any(|b| serde_json::from_str::<JobMessage>(b).is_ok_and(|m| m.job_id.as_str() == queued));
        let id = kiln_domain::JobId::parse(&queued).unwrap();
        let job = world.runtime.block_on(world.memory.store.get(&id)).unwrap().unwrap();
        prop_assert_eq!(job.status == JobStatus::Failed, readable, "job {} is {}", queued, job.status);
        failed_jobs.fetch_add(usize::from(readable), Ordering::Relaxed);
        Ok(())
    });
    assert!(failed_jobs.into_inner() > 0, "no case carried a readable dead letter");
}

#[test]
fn stream_records_of_any_image_never_fail_job_events() {
    let template = fixture("dynamodb-stream-job-events.json");
    let record = template["Records"][0].clone();
    let new_image = record["dynamodb"]["NewImage"].clone();
    let old_image = record["dynamodb"].get("OldImage").cloned().unwrap_or_else(|| new_image.clone());
    let names = prop::sample::select(vec!["INSERT", "MODIFY", "REMOVE"]);
    let strategy = prop::collection::vec((names, image(old_image), image(new_image)), 1..4);
    let (handled, decoded) = (AtomicUsize::new(0), AtomicUsize::new(0));
    run(strategy, |world, n, records| {
        let changes = Arc::new(JobChanges::new(&world.memory.ports()));
        let mut event = template.clone();
        event["Records"] = records
            .into_iter()
            .enumerate()
            .map(|(i, (name, old, new))| {
                let mut record = record.clone();
                record["eventName"] = Value::from(name);
                record["dynamodb"]["OldImage"] = old;
                record["dynamodb"]["NewImage"] = new;
                record["dynamodb"]["SequenceNumber"] = Value::from(format!("{n}{i:04}"));
                record
            })
            .collect();
        // What Lambda's runtime would refuse before our code runs is not a case.
        let Ok(event) = serde_json::from_value::<StreamEvent>(event) else { return Ok(()) };
        handled.fetch_add(1, Ordering::Relaxed);
        let readable =
            event.records.iter().filter(|r| job_events::job_of(&r.change.new_image).is_ok_and(|j| j.is_some()));
        decoded.fetch_add(readable.count(), Ordering::Relaxed);
        let answer = world.runtime.block_on(job_events::handle(changes, LambdaEvent::new(event, context())));
        let answer = answer.map_err(|err| TestCaseError::fail(format!("the function failed: {err}")))?;
        prop_assert!(answer.batch_item_failures.is_empty(), "records came back: {:?}", answer.batch_item_failures);
        Ok(())
    });
    let (handled, decoded) = (handled.into_inner(), decoded.into_inner());
    eprintln!("{} cases: {handled} events reached job-events, {decoded} records with a readable job", cases());
    assert!(handled * 2 > cases() as usize && decoded > 0, "the cases do not reach the handler: {handled}, {decoded}");
}

#[test]
fn s3_notifications_of_any_key_never_fail_inbox_trigger() {
    let template = fixture("s3-put-inbox.json");
    let key = prop_oneof![
        3 => (prop_oneof![Just("tenant-a".to_owned()), Just("tenant-b".to_owned()), "[a-z-]{0,12}"], "[a-z0-9._%+-]{0,16}")
            .prop_map(|(t, n)| format!("inbox/{t}/{n}/01JX3F8Z2M4N6P8R0T2V4W6Y8Z.json")),
        1 => ".{0,80}",
        1 => "(%[0-9A-Fa-f]{0,2}|\\+|[a-z/]){0,30}",
    ];
    let (handled, started) = (AtomicUsize::new(0), AtomicUsize::new(0));
    run(prop::collection::vec((key, any::<i64>()), 1..3), |world, _, objects| {
        let inbox = Arc::new(Inbox::new(&world.memory.ports(), JobsConfig::default(), 64 * 1024));
        for (key, _) in &objects {
            let spec = bytes::Bytes::from_static(br#"{"model": "kiln-demo", "prompt": "from the inbox"}"#);
            world.runtime.block_on(world.memory.artifacts.put(key, "application/json", spec)).unwrap();
        }
        let mut event = template.clone();
        let record = event["Records"][0].clone();
        event["Records"] = objects
            .into_iter()
            .map(|(key, size)| {
                let mut record = record.clone();
                record["s3"]["object"]["key"] = Value::from(key);
                record["s3"]["object"]["size"] = Value::from(size);
                record
            })
            .collect();
        let Ok(event) = serde_json::from_value::<S3Event>(event) else { return Ok(()) };
        handled.fetch_add(1, Ordering::Relaxed);
        let outcomes = world.runtime.block_on(inbox_trigger::on_event(&inbox, &event));
        let outcomes = outcomes.map_err(|err| TestCaseError::fail(format!("the function failed: {err}")))?;
        let refused = outcomes.iter().filter(|o| !matches!(o, kiln_app::inbox::InboxOutcome::Ignored(_))).count();
        started.fetch_add(refused, Ordering::Relaxed);
        Ok(())
    });
    let (handled, answered) = (handled.into_inner(), started.into_inner());
    eprintln!("{} cases: {handled} events reached inbox-trigger, {answered} objects answered (not ignored)", cases());
    assert!(
        handled * 2 > cases() as usize && answered > 0,
        "the cases do not reach the handler: {handled}, {answered}"
    );
}

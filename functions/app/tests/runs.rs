//! A render run's record writes over the in-memory store: start, progress, cancel, takeover,
//! success, dead letters.

use chrono::Utc;
use kiln_app::{
    JobRuns, Jobs, JobsConfig, SkipReason, Start, Tenant, Written,
    memory::{MemoryJobStore, MemoryPorts},
    ports::JobStore,
};
use kiln_domain::{Job, JobErrorCode, JobId, JobStatus, ModelSpec, Output, TenantId, Timings};
use std::sync::Arc;

fn demo_model() -> ModelSpec {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../gpu-runner/models/kiln-demo");
    ModelSpec::read_manifest(&dir).unwrap()
}

struct World {
    jobs: Jobs,
    runs: JobRuns,
    store: Arc<MemoryJobStore>,
    tenant: Tenant,
}

async fn world_with_job() -> (World, JobId) {
    let memory = MemoryPorts::with_models(vec![demo_model()]);
    let store = memory.store.clone();
    let jobs = Jobs::new(&memory.ports(), JobsConfig::default());
    let tenant = Tenant::new(TenantId::parse("acme").unwrap(), "Acme");
    let id = jobs.submit(&tenant, br#"{"model":"kiln-demo","prompt":"a fox"}"#, None).await.unwrap().job.id;
    (World { jobs, runs: JobRuns::new(store.clone()), store, tenant }, id)
}

/// The queue message the tests' runs hold.
const MESSAGE: &str = "message-1";

async fn started(world: &World, id: &JobId) -> Job {
    match world.runs.start(id, MESSAGE, Utc::now()).await.unwrap() {
        Start::Render(job) => job,
        other => panic!("not started: {other:?}"),
    }
}

fn output(job: &Job) -> Vec<Output> {
    vec![Output { key: job.output_key("png"), content_type: "image/png".into(), bytes: 3 }]
}

#[tokio::test]
async fn a_run_starts_reports_progress_and_succeeds() {
    let (world, id) = world_with_job().await;
    let mut job = started(&world, &id).await;
    assert_eq!((job.status, job.attempts), (JobStatus::Running, 1));
    assert_eq!(world.runs.checkpoint(&mut job, 0.5).await.unwrap(), Written::Done);
    assert_eq!(world.store.get(&id).await.unwrap().unwrap().progress, 0.5);
    let timings =
        Timings { render_ms: Some(7), encode_ms: Some(2), upload_ms: Some(1), batch_wait_ms: Some(3), queue_ms: None };
    let outputs = output(&job);
    assert_eq!(
        world.runs.succeed(&mut job, outputs, timings, vec!["prompt truncated".into()], Utc::now()).await.unwrap(),
        Written::Done
    );
    let stored = world.store.get(&id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.progress, stored.outputs.len()), (JobStatus::Succeeded, 1.0, 1));
    assert!(stored.timings.queue_ms.is_some(), "the queue wait recorded at start is kept");
    assert_eq!(stored.timings.render_ms, Some(7));
    assert_eq!(stored.warnings, ["prompt truncated"]);

    // A redelivered message for the finished job is skipped.
    assert_eq!(
        world.runs.start(&id, MESSAGE, Utc::now()).await.unwrap(),
        Start::Skip(SkipReason::Ended(JobStatus::Succeeded))
    );
    let missing = JobId::generate(Utc::now());
    assert_eq!(world.runs.start(&missing, MESSAGE, Utc::now()).await.unwrap(), Start::Skip(SkipReason::Missing));
}

#[tokio::test]
async fn a_cancel_request_reaches_the_run_at_its_next_write() {
    let (world, id) = world_with_job().await;
    let mut job = started(&world, &id).await;
    world.jobs.cancel(&world.tenant, id.as_str()).await.unwrap();
    assert_eq!(world.runs.checkpoint(&mut job, 0.3).await.unwrap(), Written::CancelRequested);
    let outputs = output(&job);
    assert_eq!(
        world.runs.succeed(&mut job, outputs, Timings::default(), Vec::new(), Utc::now()).await.unwrap(),
        Written::CancelRequested,
        "a cancel acknowledged to the client wins over a late success"
    );
    assert_eq!(world.runs.cancel(&mut job, Utc::now()).await.unwrap(), Written::Done);
    assert_eq!(world.store.get(&id).await.unwrap().unwrap().status, JobStatus::Canceled);
}

#[tokio::test]
async fn a_job_canceled_while_its_runner_was_dead_is_not_restarted() {
    let (world, id) = world_with_job().await;
    started(&world, &id).await;
    world.jobs.cancel(&world.tenant, id.as_str()).await.unwrap();
    let Start::Cancel(mut job) = world.runs.start(&id, MESSAGE, Utc::now()).await.unwrap() else {
        panic!("a job whose cancel was requested is not started again")
    };
    assert_eq!(
        world.store.get(&id).await.unwrap().unwrap().status,
        JobStatus::Running,
        "running until the runner has removed what an earlier run wrote"
    );
    assert_eq!(world.runs.cancel(&mut job, Utc::now()).await.unwrap(), Written::Done);
    assert_eq!(world.store.get(&id).await.unwrap().unwrap().status, JobStatus::Canceled);
    assert_eq!(
        world.runs.start(&id, MESSAGE, Utc::now()).await.unwrap(),
        Start::Skip(SkipReason::Ended(JobStatus::Canceled))
    );
}

#[tokio::test]
async fn a_run_whose_job_was_taken_over_stops_writing() {
    let (world, id) = world_with_job().await;
    let mut first = started(&world, &id).await;
    let mut second = started(&world, &id).await;
    assert_eq!(second.attempts, 2);
    assert_eq!(world.runs.checkpoint(&mut first, 0.9).await.unwrap(), Written::Lost);
    assert_eq!(world.runs.fail(&mut first, JobErrorCode::RenderFailed, "x", Utc::now()).await.unwrap(), Written::Lost);
    assert_eq!(world.runs.checkpoint(&mut second, 0.2).await.unwrap(), Written::Done);
    let stored = world.store.get(&id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.attempts, stored.progress), (JobStatus::Running, 2, 0.2));
}

#[tokio::test]
async fn a_dead_lettered_job_fails_unless_it_already_ended() {
    let (world, id) = world_with_job().await;
    started(&world, &id).await;
    assert!(world.runs.dead_lettered(&id, MESSAGE, Utc::now()).await.unwrap());
    let stored = world.store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.status, JobStatus::Failed);
    assert_eq!(stored.error.unwrap().code, JobErrorCode::DeadLettered);
    assert!(!world.runs.dead_lettered(&id, MESSAGE, Utc::now()).await.unwrap(), "an ended job stays as it is");
}

#[tokio::test]
async fn a_second_message_for_a_running_job_is_a_duplicate_not_a_takeover() {
    let (world, id) = world_with_job().await;
    let mut job = started(&world, &id).await;
    assert_eq!(
        world.runs.start(&id, "message-2", Utc::now()).await.unwrap(),
        Start::Skip(SkipReason::Duplicate),
        "a second send of the job took over a live run"
    );
    assert!(
        !world.runs.dead_lettered(&id, "message-2", Utc::now()).await.unwrap(),
        "a duplicate's dead letter failed the job another message holds"
    );
    assert_eq!(world.runs.checkpoint(&mut job, 0.4).await.unwrap(), Written::Done, "the holder kept the job");
    let stored = world.store.get(&id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.attempts, stored.run_message.as_deref()), (JobStatus::Running, 1, Some(MESSAGE)));
}

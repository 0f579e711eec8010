//! The job use cases over in-memory ports.

use chrono::Utc;
use kiln_app::{
    AppError, Disposition, Jobs, JobsConfig, Tenant, TenantLimits,
    memory::{MemoryJobStore, MemoryPorts, MemoryQueue},
    ports::JobStore,
};
use kiln_domain::{InputErrorKind, JobErrorCode, JobStatus, ModelSpec, Output, TenantId};
use std::sync::Arc;

fn demo_model() -> ModelSpec {
    serde_json::from_str(
        r#"{"name":"demo","version":"1.0.0","pipeline":"procedural",
            "limits":{"width":{"min":64,"max":1024},"height":{"min":64,"max":1024},"size_multiple":8,
                      "num_frames":{"min":1,"max":48},"fps":{"min":1,"max":30},"steps":{"min":1,"max":50},
                      "guidance":{"min":0.0,"max":20.0},"max_total_pixels":12582912,
                      "image_formats":["png"],"video_formats":["gif","mp4","webm"]},
            "defaults":{"width":512,"height":512,"num_frames":1,"fps":8,"steps":4,"guidance":0.0,
                        "image_format":"png","video_format":"gif"}}"#,
    )
    .unwrap()
}

struct World {
    jobs: Jobs,
    store: Arc<MemoryJobStore>,
    queue: Arc<MemoryQueue>,
}

fn world() -> World {
    let memory = MemoryPorts::with_models(vec![demo_model()]);
    let jobs = Jobs::new(&memory.ports(), JobsConfig::default());
    World { jobs, store: memory.store, queue: memory.queue }
}

fn tenant(id: &str) -> Tenant {
    Tenant::new(TenantId::parse(id).unwrap(), id)
}

const FOX: &[u8] = br#"{"model":"demo","prompt":"a fox"}"#;

/// Plays the runner's part: start the job and finish it.
async fn finish(world: &World, id: &kiln_domain::JobId, to: JobStatus) {
    let mut job = world.store.get(id).await.unwrap().unwrap();
    job.transition(JobStatus::Running, Utc::now()).unwrap();
    job.revision += 1;
    assert!(world.store.update(&job).await.unwrap());
    job.transition(to, Utc::now()).unwrap();
    job.revision += 1;
    if to == JobStatus::Succeeded {
        job.outputs.push(Output { key: job.output_key("png"), content_type: "image/png".into(), bytes: 10 });
    }
    assert!(world.store.update(&job).await.unwrap());
}

#[tokio::test]
async fn a_new_job_is_stored_and_queued() {
    let world = world();
    let submitted = world.jobs.submit(&tenant("a"), FOX, None).await.unwrap();
    assert_eq!(submitted.disposition, Disposition::Created);
    assert_eq!(submitted.job.status, JobStatus::Queued);
    assert_eq!(world.store.get(&submitted.job.id).await.unwrap().unwrap(), submitted.job);
    let sent = world.queue.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].job_id, submitted.job.id);
}

/// The tenant's weight in fair share rides on the message to the runners; weight 1 (and none)
/// leaves the message as it always was.
#[tokio::test]
async fn the_message_carries_the_tenants_share_weight() {
    let world = world();
    let heavy = Tenant { share_weight: Some(3), ..tenant("heavy") };
    let plain = Tenant { share_weight: Some(1), ..tenant("plain") };
    world.jobs.submit(&heavy, FOX, None).await.unwrap();
    world.jobs.submit(&plain, br#"{"model":"demo","prompt":"a hen"}"#, None).await.unwrap();
    world.jobs.submit(&tenant("unset"), br#"{"model":"demo","prompt":"an owl"}"#, None).await.unwrap();
    let weights: Vec<Option<u32>> = world.queue.sent().iter().map(|message| message.weight).collect();
    assert_eq!(weights, [Some(3), None, None]);
    let body = serde_json::to_value(&world.queue.sent()[1]).unwrap();
    assert!(body.get("weight").is_none(), "{body}");
}

/// `priority` is capped by the tenant's maximum (normal unless set), with a warning on the job
/// when it was; the job and its message carry it; an unknown value is refused naming the field.
#[tokio::test]
async fn priority_is_capped_by_the_tenants_maximum_and_rides_on_the_message() {
    use kiln_domain::Priority;
    let world = world();
    let high = br#"{"model":"demo","prompt":"urgent","priority":"high"}"#;
    let capped = world.jobs.submit(&tenant("plain"), high, None).await.unwrap().job;
    assert_eq!(capped.priority, Priority::Normal);
    assert_eq!(capped.warnings, ["priority high is above this account's maximum: queued as normal"]);
    let vip = Tenant { max_priority: Some(Priority::High), ..tenant("vip") };
    let urgent = world.jobs.submit(&vip, high, None).await.unwrap().job;
    assert_eq!((urgent.priority, urgent.warnings.len()), (Priority::High, 0));
    let low = world.jobs.submit(&vip, br#"{"model":"demo","prompt":"whenever","priority":"low"}"#, None).await.unwrap();
    assert_eq!(low.job.priority, Priority::Low, "below the maximum: as asked");
    let priorities: Vec<Priority> = world.queue.sent().iter().map(|message| message.priority).collect();
    assert_eq!(priorities, [Priority::Normal, Priority::High, Priority::Low]);
    assert!(world.queue.sent().iter().all(|message| message.created_at.is_some()));

    let refused = world.jobs.submit(&vip, br#"{"model":"demo","prompt":"x","priority":"asap"}"#, None).await;
    let error = refused.unwrap_err().to_string();
    assert!(error.contains("priority"), "{error}");
}

#[tokio::test]
async fn identical_requests_join_the_job_in_flight_then_hit_the_cache() {
    let world = world();
    let a = tenant("a");
    let first = world.jobs.submit(&a, FOX, None).await.unwrap();
    let second = world.jobs.submit(&a, br#"{"prompt":"a fox ","model":"demo","width":512}"#, None).await.unwrap();
    assert_eq!((second.disposition, &second.job.id), (Disposition::Deduplicated, &first.job.id));

    finish(&world, &first.job.id, JobStatus::Succeeded).await;
    let third = world.jobs.submit(&a, FOX, None).await.unwrap();
    assert_eq!((third.disposition, &third.job.id), (Disposition::Cached, &first.job.id));
    assert_eq!(third.job.status, JobStatus::Succeeded);
    assert_eq!(world.queue.sent().len(), 1, "no second render");
}

#[tokio::test]
async fn a_failed_job_is_not_served_from_the_cache() {
    let world = world();
    let a = tenant("a");
    let first = world.jobs.submit(&a, FOX, None).await.unwrap();
    finish(&world, &first.job.id, JobStatus::Failed).await;
    let again = world.jobs.submit(&a, FOX, None).await.unwrap();
    assert_eq!(again.disposition, Disposition::Created);
    assert_ne!(again.job.id, first.job.id);
    // And the pointer moved on: the next identical request joins the new job.
    let third = world.jobs.submit(&a, FOX, None).await.unwrap();
    assert_eq!((third.disposition, third.job.id), (Disposition::Deduplicated, again.job.id));
}

#[tokio::test]
async fn the_cache_is_never_shared_between_tenants() {
    let world = world();
    let first = world.jobs.submit(&tenant("a"), FOX, None).await.unwrap();
    finish(&world, &first.job.id, JobStatus::Succeeded).await;
    let other = world.jobs.submit(&tenant("b"), FOX, None).await.unwrap();
    assert_eq!(other.disposition, Disposition::Created);
    assert_ne!(other.job.id, first.job.id);
}

#[tokio::test]
async fn a_client_seed_makes_a_different_request() {
    let world = world();
    let a = tenant("a");
    let first = world.jobs.submit(&a, br#"{"model":"demo","prompt":"x","seed":1}"#, None).await.unwrap();
    let second = world.jobs.submit(&a, br#"{"model":"demo","prompt":"x","seed":2}"#, None).await.unwrap();
    assert_ne!(first.job.id, second.job.id);
    assert_eq!(second.disposition, Disposition::Created);
}

#[tokio::test]
async fn idempotency_keys_replay_the_first_job_and_refuse_other_bodies() {
    let world = world();
    let a = tenant("a");
    let first = world.jobs.submit(&a, FOX, Some("key-1")).await.unwrap();
    let retry = world.jobs.submit(&a, br#"{ "prompt":"a fox", "model":"demo" }"#, Some("key-1")).await.unwrap();
    assert_eq!((retry.disposition, &retry.job.id), (Disposition::Replayed, &first.job.id));
    let other = world.jobs.submit(&a, br#"{"model":"demo","prompt":"a cat"}"#, Some("key-1")).await;
    assert!(matches!(other, Err(AppError::IdempotencyMismatch)), "{other:?}");
    // Keys belong to a tenant: another tenant's same key is a different key.
    let b = world.jobs.submit(&tenant("b"), br#"{"model":"demo","prompt":"a cat"}"#, Some("key-1")).await.unwrap();
    assert_eq!(b.disposition, Disposition::Created);
    // A key sent with a request answered by dedup is recorded too.
    let joined = world.jobs.submit(&a, FOX, Some("key-2")).await.unwrap();
    assert_eq!(joined.disposition, Disposition::Deduplicated);
    let replay = world.jobs.submit(&a, FOX, Some("key-2")).await.unwrap();
    assert_eq!((replay.disposition, replay.job.id), (Disposition::Replayed, first.job.id));
    let bad = world.jobs.submit(&a, FOX, Some("has space")).await.unwrap_err();
    assert!(matches!(bad, AppError::Input(e) if e.field.as_deref() == Some("Idempotency-Key")));
}

/// DynamoDB answers `TransactionConflict` while another transaction holds an item: the submit
/// waits and tries again, and gives up with Contention (a 503) only after several.
#[tokio::test]
async fn a_transaction_conflict_is_tried_again() {
    let world = world();
    let a = tenant("a");
    world.store.conflict_next(2);
    let submitted = world.jobs.submit(&a, FOX, Some("twin")).await.unwrap();
    assert_eq!(submitted.disposition, Disposition::Created);
    assert_eq!(world.queue.sent().len(), 1, "queued once");
    world.store.conflict_next(100);
    let busy = world.jobs.submit(&a, br#"{"model":"demo","prompt":"a busy fox"}"#, None).await;
    assert!(matches!(busy, Err(AppError::Contention)), "{busy:?}");
    world.store.conflict_next(0);
    let replay = world.jobs.submit(&a, FOX, Some("twin")).await.unwrap();
    assert_eq!((replay.disposition, replay.job.id), (Disposition::Replayed, submitted.job.id));
}

#[tokio::test]
async fn a_job_that_cannot_be_queued_is_failed_and_can_be_submitted_again() {
    let world = world();
    let a = tenant("a");
    world.queue.set_failing(true);
    let err = world.jobs.submit(&a, FOX, Some("k")).await.unwrap_err();
    assert!(matches!(err, AppError::QueueUnavailable(_)), "{err:?}");
    let page = world.jobs.list(&a, None, 10, None).await.unwrap();
    assert_eq!(page.jobs.len(), 1);
    let failed = &page.jobs[0];
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.error.as_ref().unwrap().code, JobErrorCode::EnqueueFailed);

    world.queue.set_failing(false);
    let retry = world.jobs.submit(&a, FOX, Some("k")).await.unwrap();
    assert_eq!(retry.disposition, Disposition::Created, "the key and cache pointer were released");
    assert_ne!(retry.job.id, failed.id);
    assert_eq!(world.queue.sent().len(), 1);
}

#[tokio::test]
async fn other_tenants_jobs_do_not_exist() {
    let world = world();
    let job = world.jobs.submit(&tenant("a"), FOX, None).await.unwrap().job;
    let b = tenant("b");
    assert!(matches!(world.jobs.get(&b, job.id.as_str()).await, Err(AppError::NotFound(_))));
    assert!(matches!(world.jobs.cancel(&b, job.id.as_str()).await, Err(AppError::NotFound(_))));
    assert!(world.jobs.list(&b, None, 10, None).await.unwrap().jobs.is_empty());
    assert!(matches!(world.jobs.get(&b, "nonsense").await, Err(AppError::NotFound(_))));
}

#[tokio::test]
async fn cancel_queued_running_and_finished_jobs() {
    let world = world();
    let a = tenant("a");
    let queued = world.jobs.submit(&a, FOX, None).await.unwrap().job;
    let canceled = world.jobs.cancel(&a, queued.id.as_str()).await.unwrap();
    assert_eq!(canceled.status, JobStatus::Canceled);
    assert_eq!(world.jobs.cancel(&a, queued.id.as_str()).await.unwrap().status, JobStatus::Canceled);

    let running = world.jobs.submit(&a, br#"{"model":"demo","prompt":"b"}"#, None).await.unwrap().job;
    let mut job = world.store.get(&running.id).await.unwrap().unwrap();
    job.transition(JobStatus::Running, Utc::now()).unwrap();
    job.revision += 1;
    world.store.update(&job).await.unwrap();
    let flagged = world.jobs.cancel(&a, running.id.as_str()).await.unwrap();
    assert_eq!((flagged.status, flagged.cancel_requested), (JobStatus::Running, true));

    let done = world.jobs.submit(&a, br#"{"model":"demo","prompt":"c"}"#, None).await.unwrap().job;
    finish(&world, &done.id, JobStatus::Succeeded).await;
    let err = world.jobs.cancel(&a, done.id.as_str()).await.unwrap_err();
    assert!(matches!(err, AppError::AlreadyFinished { status: JobStatus::Succeeded, .. }), "{err:?}");
}

#[tokio::test]
async fn succeeded_jobs_carry_download_links() {
    let world = world();
    let a = tenant("a");
    let job = world.jobs.submit(&a, FOX, None).await.unwrap().job;
    assert!(world.jobs.get(&a, job.id.as_str()).await.unwrap().links.is_empty());
    finish(&world, &job.id, JobStatus::Succeeded).await;
    let read = world.jobs.get(&a, job.id.as_str()).await.unwrap();
    assert_eq!(read.links.len(), 1);
    assert!(read.links[0].url.contains(&read.job.outputs[0].key));
}

#[tokio::test]
async fn overdue_queued_jobs_expire() {
    let world = world();
    let a = tenant("a");
    let job = world.jobs.submit(&a, FOX, None).await.unwrap().job;
    assert_eq!(world.jobs.expire_overdue(Utc::now(), 10).await.unwrap(), 0);
    let later = job.expires_at + chrono::Duration::seconds(1);
    assert_eq!(world.jobs.expire_overdue(later, 10).await.unwrap(), 1);
    assert_eq!(world.store.get(&job.id).await.unwrap().unwrap().status, JobStatus::Expired);
    assert_eq!(world.jobs.expire_overdue(later, 10).await.unwrap(), 0);
}

#[tokio::test]
async fn listing_pages_newest_first_and_filters_by_status() {
    let world = world();
    let a = tenant("a");
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = format!(r#"{{"model":"demo","prompt":"p{i}"}}"#);
        ids.push(world.jobs.submit(&a, body.as_bytes(), None).await.unwrap().job.id);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    world.jobs.cancel(&a, ids[1].as_str()).await.unwrap();
    let first = world.jobs.list(&a, None, 2, None).await.unwrap();
    assert_eq!(first.jobs.iter().map(|j| &j.id).collect::<Vec<_>>(), vec![&ids[4], &ids[3]]);
    let second = world.jobs.list(&a, None, 2, first.next.as_ref()).await.unwrap();
    assert_eq!(second.jobs.iter().map(|j| &j.id).collect::<Vec<_>>(), vec![&ids[2], &ids[1]]);
    let last = world.jobs.list(&a, None, 2, second.next.as_ref()).await.unwrap();
    assert_eq!((last.jobs.len(), last.next), (1, None));
    let canceled = world.jobs.list(&a, Some(JobStatus::Canceled), 10, None).await.unwrap();
    assert_eq!(canceled.jobs.iter().map(|j| &j.id).collect::<Vec<_>>(), vec![&ids[1]]);
    assert!(world.jobs.list(&a, None, 0, None).await.is_err());
    assert!(world.jobs.list(&a, None, 101, None).await.is_err());
}

#[tokio::test]
async fn unknown_models_and_versions_are_named() {
    let world = world();
    let a = tenant("a");
    for body in [&br#"{"model":"nope","prompt":"x"}"#[..], br#"{"model":"demo@9.9","prompt":"x"}"#] {
        match world.jobs.submit(&a, body, None).await {
            Err(AppError::Input(e)) => {
                assert_eq!((e.kind, e.field.as_deref()), (InputErrorKind::UnknownModel, Some("model")))
            }
            other => panic!("{other:?}"),
        }
    }
    let pinned = world.jobs.submit(&a, br#"{"model":"demo@1.0.0","prompt":"x"}"#, None).await.unwrap();
    assert_eq!(pinned.job.model_version, "1.0.0");
}

fn limited(id: &str, max_active_jobs: u32, jobs_per_minute: u32) -> Tenant {
    Tenant { limits: Some(TenantLimits { max_active_jobs, jobs_per_minute, ..TenantLimits::default() }), ..tenant(id) }
}

fn fox(n: usize) -> Vec<u8> {
    format!(r#"{{"model":"demo","prompt":"fox number {n}"}}"#).into_bytes()
}

#[tokio::test]
async fn a_tenant_at_its_active_jobs_quota_gets_no_new_job_until_one_ends() {
    let world = world();
    let a = limited("a", 2, 100);
    let first = world.jobs.submit(&a, &fox(1), None).await.unwrap();
    world.jobs.submit(&a, &fox(2), None).await.unwrap();
    let refused = world.jobs.submit(&a, &fox(3), None).await.unwrap_err();
    assert!(matches!(refused, AppError::QuotaExceeded { limit: 2 }), "{refused:?}");
    // An identical request renders nothing: it is answered, whatever the quota.
    let again = world.jobs.submit(&a, &fox(1), None).await.unwrap();
    assert_eq!((again.disposition, &again.job.id), (Disposition::Deduplicated, &first.job.id));
    // Another tenant has its own quota.
    world.jobs.submit(&limited("b", 2, 100), &fox(3), None).await.unwrap();
    assert_eq!(world.queue.sent().len(), 3, "the refused job was not queued");

    finish(&world, &first.job.id, JobStatus::Succeeded).await;
    let third = world.jobs.submit(&a, &fox(3), None).await.unwrap();
    assert_eq!(third.disposition, Disposition::Created);
    world.jobs.cancel(&a, third.job.id.as_str()).await.unwrap();
    world.jobs.submit(&a, &fox(4), None).await.unwrap();
}

#[tokio::test]
async fn a_tenant_over_its_rate_is_told_when_to_come_back() {
    // The three submissions must fall in one minute window.
    let second = u64::from(chrono::Timelike::second(&Utc::now()));
    if second >= 58 {
        tokio::time::sleep(std::time::Duration::from_secs(61 - second)).await;
    }
    let world = world();
    let a = limited("a", 100, 2);
    let first = world.jobs.submit(&a, &fox(1), None).await.unwrap();
    world.jobs.submit(&a, &fox(2), None).await.unwrap();
    match world.jobs.submit(&a, &fox(3), None).await {
        Err(AppError::RateLimited { limit: 2, retry_after_secs, .. }) => assert!((1..=60).contains(&retry_after_secs)),
        other => panic!("expected a rate limit, got {other:?}"),
    }
    // Neither a deduplicated request nor an idempotent replay counts.
    let again = world.jobs.submit(&a, &fox(1), Some("k1")).await.unwrap();
    assert_eq!((again.disposition, &again.job.id), (Disposition::Deduplicated, &first.job.id));
    let replayed = world.jobs.submit(&a, &fox(1), Some("k1")).await.unwrap();
    assert_eq!(replayed.disposition, Disposition::Replayed);
    // A limit of 0 admits nothing.
    let suspended = world.jobs.submit(&limited("c", 100, 0), &fox(1), None).await.unwrap_err();
    assert!(matches!(suspended, AppError::RateLimited { limit: 0, .. }), "{suspended:?}");
}

/// The demo model's default job (512², 4 steps, unguided) costs 2 units; 9 a day let 4 in.
#[tokio::test]
async fn a_tenant_out_of_its_daily_units_is_told_the_limit_and_when_it_resets() {
    let world = world();
    let a = Tenant { limits: Some(TenantLimits { units_per_day: 9, ..TenantLimits::default() }), ..tenant("a") };
    let first = world.jobs.submit(&a, &fox(0), None).await.unwrap();
    assert_eq!(first.job.cost_units, 2);
    for n in 1..4 {
        world.jobs.submit(&a, &fox(n), None).await.unwrap();
    }
    let refused = world.jobs.submit(&a, &fox(4), None).await.unwrap_err();
    match &refused {
        AppError::UnitsExhausted { limit: 9, used: 8, cost: 2, resets_at, retry_after_secs } => {
            let midnight =
                (Utc::now() + chrono::Duration::days(1)).date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
            assert!(*resets_at == midnight || *resets_at == midnight - chrono::Duration::days(1), "{resets_at}");
            assert!((1..=86_400).contains(retry_after_secs));
        }
        other => panic!("expected the daily units, got {other:?}"),
    }
    assert_eq!(refused.code(), "units_exhausted");
    assert!(refused.to_string().contains("costs 2 units and 8 of this account's 9 units"), "{refused}");
    // A cheaper job still fits; what renders nothing costs nothing.
    let small = world.jobs.submit(&a, br#"{"model":"demo","prompt":"small","width":256,"height":256}"#, None).await;
    assert_eq!(small.unwrap().job.cost_units, 1);
    let again = world.jobs.submit(&a, &fox(0), None).await.unwrap();
    assert_eq!((again.disposition, &again.job.id), (Disposition::Deduplicated, &first.job.id));
    let usage = world.jobs.usage(&a).await.unwrap();
    assert_eq!((usage.counted.units_today, usage.limits.units_per_day, usage.active_jobs), (9, 9, 5));
}

/// A job that is not accepted after its charge (the queue failed) gives its units back.
#[tokio::test]
async fn a_job_the_queue_refused_costs_nothing() {
    let world = world();
    let a = tenant("a");
    world.queue.set_failing(true);
    world.jobs.submit(&a, &fox(0), None).await.unwrap_err();
    world.queue.set_failing(false);
    let usage = world.jobs.usage(&a).await.unwrap();
    assert_eq!((usage.counted.units_today, usage.counted.jobs_this_minute), (0, 0));
    world.jobs.submit(&a, &fox(0), None).await.unwrap();
    let usage = world.jobs.usage(&a).await.unwrap();
    assert_eq!((usage.counted.units_today, usage.counted.jobs_this_minute), (2, 1));
}

#[tokio::test]
async fn tenants_without_limits_of_their_own_get_the_deployments() {
    let config = JobsConfig {
        default_limits: TenantLimits { max_active_jobs: 1, jobs_per_minute: 100, ..Default::default() },
        ..JobsConfig::default()
    };
    let jobs = Jobs::new(&MemoryPorts::with_models(vec![demo_model()]).ports(), config);
    jobs.submit(&tenant("a"), &fox(1), None).await.unwrap();
    let refused = jobs.submit(&tenant("a"), &fox(2), None).await.unwrap_err();
    assert!(matches!(refused, AppError::QuotaExceeded { limit: 1 }), "{refused:?}");
    jobs.submit(&limited("b", 3, 100), &fox(1), None).await.unwrap();
    jobs.submit(&limited("b", 3, 100), &fox(2), None).await.unwrap();
}

/// Versions: a request without one gets the weighted version (identical requests the same),
/// `name@version` pins any active version, a retired one is refused naming the served ones;
/// a shadow share renders the request with the candidate too, as a job no client sees, for
/// free.
#[tokio::test]
async fn requests_get_versions_by_weight_or_pin_and_shadows_are_rendered_aside() {
    use kiln_app::catalog::Catalog;
    let memory = MemoryPorts::with_models(vec![demo_model()]);
    let jobs = Jobs::new(&memory.ports(), JobsConfig::default());
    let catalog = Catalog::new(memory.catalog.clone());
    let v2 = ModelSpec { version: "2.0.0".into(), ..demo_model() };
    assert_eq!(catalog.offer(&v2).await.unwrap(), kiln_domain::Offered::Candidate);
    let a = tenant("a");
    let version = |submitted: kiln_app::Submitted| submitted.job.model_version;
    assert_eq!(version(jobs.submit(&a, &fox(1), None).await.unwrap()), "1.0.0", "the candidate has no traffic");
    let pinned = jobs.submit(&a, br#"{"model":"demo@2.0.0","prompt":"pinned"}"#, None).await.unwrap();
    assert_eq!(version(pinned), "2.0.0");

    // Even split, read again after the catalog's reuse time: both versions serve, and the same
    // request always lands on the same one.
    catalog.change("demo", |m| m.set_weight("2.0.0", 100)).await.unwrap();
    let jobs = Jobs::new(&memory.ports(), JobsConfig::default());
    let mut seen = std::collections::HashSet::new();
    for n in 2..40 {
        seen.insert(version(jobs.submit(&a, &fox(n), None).await.unwrap()));
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let again = jobs.submit(&a, &fox(2), None).await.unwrap();
    assert_eq!(again.disposition, Disposition::Deduplicated, "the same request, the same version: one job");

    catalog.change("demo", |m| m.promote("2.0.0")).await.unwrap();
    catalog.change("demo", |m| m.retire("1.0.0")).await.unwrap();
    catalog
        .change("demo", |m| m.add(ModelSpec { version: "3.0.0".into(), ..demo_model() }, 0, Utc::now()))
        .await
        .unwrap();
    catalog.change("demo", |m| m.set_shadow("3.0.0", 100)).await.unwrap();
    let jobs = Jobs::new(&memory.ports(), JobsConfig::default());
    match jobs.submit(&a, br#"{"model":"demo@1.0.0","prompt":"old"}"#, None).await {
        Err(AppError::Input(e)) => {
            assert_eq!(e.kind, InputErrorKind::UnknownModel);
            assert!(e.message.contains("retired; served versions: 2.0.0, 3.0.0"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    let usage_before = jobs.usage(&a).await.unwrap().counted.units_today;
    let served = jobs.submit(&a, br#"{"model":"demo","prompt":"shadowed","seed":7}"#, None).await.unwrap();
    assert_eq!(served.job.model_version, "2.0.0");
    let shadow_tenant = TenantId::parse(kiln_domain::SHADOW_TENANT).unwrap();
    let shadows = memory.store.list(&shadow_tenant, None, 10, None).await.unwrap().jobs;
    assert_eq!(shadows.len(), 1);
    let shadow = &shadows[0];
    assert_eq!((shadow.model_version.as_str(), shadow.shadow_of.as_ref()), ("3.0.0", Some(&served.job.id)));
    assert_eq!((shadow.params.seed, shadow.priority), (7, kiln_domain::Priority::Low));
    assert_eq!(
        jobs.usage(&a).await.unwrap().counted.units_today,
        usage_before + served.job.cost_units,
        "the shadow is free"
    );
    let listed = jobs.list(&a, None, 100, None).await.unwrap();
    assert!(listed.jobs.iter().all(|job| job.shadow_of.is_none()), "the tenant never sees it");
    assert!(memory.queue.sent().iter().any(|m| m.job_id == shadow.id), "queued for the runners");
}

/// `quality: auto` gets the model's fast preset only while more jobs wait per GPU slot than
/// the threshold (8 by default), and says so on the job; other requests render as asked.
#[tokio::test]
async fn quality_auto_takes_the_fast_preset_under_load_and_says_so() {
    let model = ModelSpec { fast: Some(kiln_domain::FastPreset { steps: 2 }), ..demo_model() };
    let memory = MemoryPorts::with_models(vec![model]);
    let a = tenant("a");
    let auto = |n: usize| format!(r#"{{"model":"demo","prompt":"auto {n}","steps":20,"quality":"auto"}}"#).into_bytes();
    let calm = Jobs::new(&memory.ports(), JobsConfig::default());
    let first = calm.submit(&a, &auto(0), None).await.unwrap().job;
    assert_eq!((first.params.steps, first.warnings.len()), (20, 0), "no backlog: as asked");

    use kiln_app::ports::{FleetBoard, RunnerReport};
    let report =
        RunnerReport { runner: "r1".into(), slots: 1, busy: 1, units_per_sec: None, ms_per_unit: None, at: Utc::now() };
    memory.fleet.report("demo@1.0.0", &report, &[]).await.unwrap();
    for n in 0..8 {
        calm.submit(&a, &fox(n), None).await.unwrap();
    }
    // 9 waiting for 1 slot: over 8.
    let busy = Jobs::new(&memory.ports(), JobsConfig::default());
    let degraded = busy.submit(&a, &auto(1), None).await.unwrap().job;
    assert_eq!(degraded.params.steps, 2);
    assert!(
        degraded.warnings[0].contains("9 jobs were waiting for 1 GPU slots")
            && degraded.warnings[0].contains("2 steps instead of 20"),
        "{:?}",
        degraded.warnings
    );
    let full = busy.submit(&a, br#"{"model":"demo","prompt":"as asked","steps":20}"#, None).await.unwrap().job;
    assert_eq!((full.params.steps, full.warnings.len()), (20, 0), "without quality auto");
    // More slots, the same queue: under the threshold again.
    let more = RunnerReport { runner: "r2".into(), slots: 4, ..report };
    memory.fleet.report("demo@1.0.0", &more, &[]).await.unwrap();
    let roomy = Jobs::new(&memory.ports(), JobsConfig::default());
    assert_eq!(roomy.submit(&a, &auto(2), None).await.unwrap().job.params.steps, 20);
}

/// A job that expires before any runner starts it never rendered: its units go back, so a
/// tenant whose queue timed out can submit again the same day.
#[tokio::test]
async fn an_expired_job_gives_its_units_back() {
    let memory = MemoryPorts::with_models(vec![demo_model()]);
    let config = JobsConfig { queued_ttl: chrono::Duration::zero(), ..JobsConfig::default() };
    let jobs = Jobs::new(&memory.ports(), config);
    let a = Tenant { limits: Some(TenantLimits { units_per_day: 4, ..TenantLimits::default() }), ..tenant("a") };
    jobs.submit(&a, &fox(0), None).await.unwrap();
    jobs.submit(&a, &fox(1), None).await.unwrap();
    assert!(matches!(jobs.submit(&a, &fox(2), None).await, Err(AppError::UnitsExhausted { used: 4, .. })));
    assert_eq!(jobs.expire_overdue(Utc::now() + chrono::Duration::seconds(1), 10).await.unwrap(), 2);
    assert_eq!(jobs.usage(&a).await.unwrap().counted.units_today, 0);
    jobs.submit(&a, &fox(2), None).await.unwrap();
}

//! Scheduling for many tenants, end to end: jobs submitted over HTTP to the local stack (moto),
//! rendered by real runner processes on the demo model.

use futures_util::{StreamExt, stream};
use kiln_app::TenantLimits;
use kiln_tests::{Client, runner_options, stack, start_runner};
use serde_json::{Value, json};
use std::time::Duration;

/// Submits `count` demo jobs for `client` (a few hundred milliseconds of rendering each, so that
/// a batch is a render's time and not moto's), 8 at a time; their ids.
async fn submit_many(client: &Client, count: usize, prompt: &str) -> Vec<String> {
    stream::iter(0..count)
        .map(|seed| async move {
            let body = json!({"model": "kiln-demo", "prompt": format!("{prompt} {seed}"), "width": 512, "height": 512, "steps": 40, "seed": seed});
            let answer = client.post_json("/v1/jobs", &body).await;
            assert!(answer.status.is_success(), "{:?}", answer.body);
            answer.job_id()
        })
        .buffered(8)
        .collect()
        .await
}

/// Tenant a queues 200 jobs, then tenant b 5, then one runner starts (4 slots). b's jobs start
/// within about one batch of starts, not after a's backlog: the runner's fair intake reads past
/// a's messages (sending them to the end of the queue) to b's and holds them for the next slot.
/// The queue delivers in order here (moto); with fair share off (`KILN_FAIR_SHARE=false`), b's
/// jobs start 201st to 205th (RELIABILITY.md has that run).
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_behind_anothers_backlog_starts_within_about_a_batch() {
    let stack = stack().await;
    let limits = TenantLimits { max_active_jobs: 1000, jobs_per_minute: 1000, ..TenantLimits::default() };
    let client = |key: kiln_app::auth::ApiKey| Client::new(&stack.api_url, Some(key.expose()));
    let a = client(stack.create_tenant_with_limits("tenant-a", limits).await.unwrap());
    let b = client(stack.create_tenant_with_limits("tenant-b", limits).await.unwrap());
    let a_jobs = submit_many(&a, 200, "a's backlog").await;
    let b_jobs = submit_many(&b, 5, "b's few").await;

    let mut options = runner_options("fair-share");
    options.env.push(("KILN_MAX_IN_FLIGHT".into(), "4".into()));
    let _runner = start_runner(&stack, &options);
    for id in &b_jobs {
        let job = b.wait_finished(id, Duration::from_secs(300)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // Every start so far, in order: b's place among them.
    let mut starts: Vec<(String, &str)> = Vec::new();
    for (client, ids, tenant) in [(&a, &a_jobs, "a"), (&b, &b_jobs, "b")] {
        for id in ids {
            let job: Value = client.get(&format!("/v1/jobs/{id}")).await.body;
            if let Some(started) = job["started_at"].as_str() {
                starts.push((started.to_owned(), tenant));
            }
        }
    }
    starts.sort();
    let places: Vec<usize> = starts.iter().enumerate().filter(|(_, (_, t))| *t == "b").map(|(i, _)| i + 1).collect();
    eprintln!("b's jobs started {places:?} of the first {} starts (200 of a's queued ahead)", starts.len());
    // The runner's 4 slots fill with a's first jobs before it reads further; b's first four (its
    // share of the slots) come in the next starts, with at most a batch of a's (4) among them;
    // its fifth, past its share, when the runner reads it again.
    assert!(places[..4].iter().all(|&place| place <= 4 + 4 + 5), "b's jobs started {places:?}");
    assert!(places[4] <= 30, "b's jobs started {places:?}");
}

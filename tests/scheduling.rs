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
    // The runner's 4 slots fill with a's first jobs before it reads further (and a holds its
    // next in line); b's first four (its share of the slots) come in the next few batches of
    // starts; its fifth, past its share, when the runner reads it again. Measured here: 7, 8,
    // 11, 13, 15 (BENCHMARKS.md); the bounds leave room for a slower machine.
    assert!(places[..4].iter().all(|&place| place <= 18), "b's jobs started {places:?}");
    assert!(places[4] <= 30, "b's jobs started {places:?}");
}

/// Queue estimates against what happened. One tenant queues 32 jobs for one runner (1 slot).
/// Once a few have rendered (the runner has reported its speed, saturated), every queued job's
/// `queue_position` and `estimated_start_at` are read, then compared with when each really
/// started: the error is |estimated − actual| / the actual wait. Prints the table that
/// BENCHMARKS.md "Queue estimates" records; fails past a median error of
/// `KILN_ETA_MAX_MEDIAN_ERROR` (1.0 in the suite; the documented run sets 0.5).
#[tokio::test(flavor = "multi_thread")]
async fn queue_estimates_come_within_half_the_wait_once_the_queue_is_steady() {
    let stack = stack().await;
    let limits = TenantLimits { max_active_jobs: 1000, jobs_per_minute: 1000, ..TenantLimits::default() };
    let key = stack.create_tenant_with_limits("eta", limits).await.unwrap();
    let client = Client::new(&stack.api_url, Some(key.expose()));
    let ids = submit_many(&client, 32, "estimated").await;
    // Before any runner: a position (the jobs accepted before it), no times, and the basis
    // says why.
    let listed = client.get("/v1/jobs?limit=100").await.body;
    let created = |job: &Value| job["created_at"].as_str().unwrap().to_owned();
    let waiting = client.get(&format!("/v1/jobs/{}", ids[9])).await.body;
    let older = listed["jobs"].as_array().unwrap().iter().filter(|job| created(job) < created(&waiting)).count();
    assert_eq!(waiting["queue_position"], older, "{waiting}");
    assert_eq!((waiting["estimated_start_at"].is_null(), &waiting["estimate_basis"]["runners"]), (true, &json!(0)));

    let mut options = runner_options("estimates");
    options.env.push(("KILN_MAX_IN_FLIGHT".into(), "1".into()));
    options.env.push(("KILN_FLEET_REPORT_SECS".into(), "1".into()));
    let _runner = start_runner(&stack, &options);
    // Steady: the runner has been saturated long enough to have measured its throughput.
    client
        .wait_for(&ids[ids.len() - 1], Duration::from_secs(300), |job| {
            job["estimate_basis"]["throughput_measured"] == true
        })
        .await;

    let read_at = chrono::Utc::now();
    let mut estimates = Vec::new();
    let mut running_seen = 0;
    for id in &ids {
        let job = client.get(&format!("/v1/jobs/{id}")).await.body;
        match job["status"].as_str() {
            Some("queued") => {
                let start: chrono::DateTime<chrono::Utc> =
                    job["estimated_start_at"].as_str().unwrap_or_else(|| panic!("{job}")).parse().unwrap();
                assert!(job["estimated_finish_at"].as_str().is_some(), "{job}");
                assert_eq!(job["estimate_basis"]["runners"], 1, "{job}");
                estimates.push((created(&job), id.clone(), job["queue_position"].as_u64().unwrap(), start));
            }
            Some("running") => {
                running_seen += 1;
                assert_eq!(job["steps"], 40, "{job}");
                assert!(job["step"].as_u64().unwrap() <= 40 && job["estimated_finish_at"].is_string(), "{job}");
            }
            _ => assert!(job.get("queue_position").is_none() && job.get("estimated_finish_at").is_none(), "{job}"),
        }
    }
    assert!(running_seen >= 1 || estimates.len() < ids.len(), "nothing was running when read");
    assert!(estimates.len() >= 12, "{} queued when read", estimates.len());
    estimates.sort();
    let positions: Vec<u64> = estimates.iter().map(|e| e.2).collect();
    // Read one after another while jobs start: a later read may count one job fewer ahead.
    assert!(positions.windows(2).all(|w| w[0] <= w[1]), "positions rise in queue order: {positions:?}");
    assert!(positions[positions.len() - 1] + 3 >= positions.len() as u64, "{positions:?}");

    let mut errors = Vec::new();
    eprintln!("| position | estimated wait (s) | actual wait (s) | error |");
    eprintln!("|---:|---:|---:|---:|");
    for (_, id, position, estimated) in &estimates {
        let job = client.wait_finished(id, Duration::from_secs(300)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let started: chrono::DateTime<chrono::Utc> = job["started_at"].as_str().unwrap().parse().unwrap();
        let (actual, guess) = ((started - read_at).as_seconds_f64(), (*estimated - read_at).as_seconds_f64());
        let error = (guess - actual).abs() / actual.max(1.0);
        errors.push(error);
        eprintln!("| {position} | {guess:.2} | {actual:.2} | {:.0}% |", error * 100.0);
    }
    errors.sort_by(f64::total_cmp);
    let (median, p90) = (errors[errors.len() / 2], errors[errors.len() * 9 / 10]);
    eprintln!(
        "queue estimates over {} jobs: median error {:.0}%, p90 {:.0}%",
        errors.len(),
        median * 100.0,
        p90 * 100.0
    );
    // Alone (the documented command) the bound is the 50%. In the full suite other
    // tests share the machine's cores and finish while this one reads, so the runner's measured
    // throughput changes under it (a loaded run: median 62%): there the bound is a factor of 2.
    let bound = std::env::var("KILN_ETA_MAX_MEDIAN_ERROR").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    assert!(median <= bound, "median error {median:.2} over {bound}");
}

/// A copy of the demo package at `version`, alone in a models folder of its own (what a runner
/// of that version serves).
fn demo_at(version: &str) -> std::path::PathBuf {
    let root = kiln_local::workspace_root();
    let folder = root.join("target/test-packages").join(kiln_tests::unique_prefix());
    let package = folder.join("kiln-demo");
    std::fs::create_dir_all(&package).unwrap();
    let source = root.join("gpu-runner/models/kiln-demo");
    std::fs::copy(source.join("model.onnx"), package.join("model.onnx")).unwrap();
    let mut spec = kiln_domain::ModelSpec::read_manifest(&source).unwrap();
    spec.version = version.into();
    std::fs::write(package.join("manifest.json"), serde_json::to_string_pretty(&spec).unwrap()).unwrap();
    folder
}

/// The versions `GET /v1/models` lists for the demo model, with their weights.
async fn demo_versions(client: &Client) -> Vec<(String, u64)> {
    let models = client.get("/v1/models").await.body;
    let demo = models["models"].as_array().unwrap().iter().find(|m| m["name"] == "kiln-demo").cloned().unwrap();
    demo["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_str().unwrap().to_owned(), v["weight"].as_u64().unwrap()))
        .collect()
}

/// Submits small demo jobs (`model` as given) and waits for each: their versions, all succeeded.
async fn run_jobs(client: &Client, model: &str, prompts: std::ops::Range<usize>) -> Vec<String> {
    let mut ids = Vec::new();
    for n in prompts {
        let body = json!({"model": model, "prompt": format!("rollout {n}"), "width": 128, "height": 128, "steps": 2});
        let answer = client.post_json("/v1/jobs", &body).await;
        assert!(answer.status.is_success(), "{}", answer.body);
        ids.push(answer.job_id());
    }
    let mut versions = Vec::new();
    for id in ids {
        let job = client.wait_finished(&id, Duration::from_secs(120)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        versions.push(job["model_version"].as_str().unwrap().to_owned());
    }
    versions
}

/// A rollout: runners of v1 and v2 share the queue. v2 joins the catalog as a candidate (its
/// runner's start takes no traffic from v1); jobs pinned to v2 all succeed however the runners
/// pick their messages (a v1 runner sends a v2 job back for a v2 runner, never fails it); a
/// canary weight splits the rest; a v1 runner started again changes nothing (the catalog never
/// goes backwards); promotion and retirement move every request; a shadow share renders served
/// requests with the other version too, aside, for `kiln-admin models shadow-report`.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_shares_the_queue_between_versions_and_the_catalog_never_goes_backwards() {
    let options =
        kiln_local::StackOptions { prefix: kiln_tests::unique_prefix(), catalog_ttl_secs: 1, ..Default::default() };
    let stack = kiln_tests::stack_with(options).await;
    let client = Client::tenant(&stack, "rollout").await;
    let mut v1 = start_runner(&stack, &runner_options("rollout-v1"));
    let mut v2_options = runner_options("rollout-v2");
    v2_options.env.push(("RUST_LOG".into(), "info,kiln_runner=debug".into()));
    v2_options.models_dir = demo_at("2.0.0");
    let _v2 = start_runner(&stack, &v2_options);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while demo_versions(&client).await.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the v2 runner never offered its version");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let both = |w1, w2| vec![("1.0.0".to_owned(), w1), ("2.0.0".to_owned(), w2)];
    assert_eq!(demo_versions(&client).await, both(100, 0), "v2 joins as a candidate");

    let pinned = run_jobs(&client, "kiln-demo@2.0.0", 0..8).await;
    assert!(pinned.iter().all(|v| v == "2.0.0"), "{pinned:?}");
    let unpinned = run_jobs(&client, "kiln-demo", 8..14).await;
    assert!(unpinned.iter().all(|v| v == "1.0.0"), "{unpinned:?}");

    kiln_tests::admin(&stack, &["models", "weight", "--model", "kiln-demo", "--version", "2.0.0", "--weight", "100"])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let split = run_jobs(&client, "kiln-demo", 14..34).await;
    let on_v2 = split.iter().filter(|v| *v == "2.0.0").count();
    assert!((3..=17).contains(&on_v2), "an even split of 20: {on_v2} on v2");

    // A v1 runner starting again (a late instance of the old image) takes nothing back.
    drop(v1);
    let mut again = runner_options("rollout-v1-again");
    again.env.push(("RUST_LOG".into(), "info,kiln_runner=debug".into()));
    v1 = start_runner(&stack, &again);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(demo_versions(&client).await, both(100, 100), "unchanged by a runner's start");

    // Promoted, with v1 shadowing it: every request on v2, each also rendered by v1 aside.
    kiln_tests::admin(&stack, &["models", "promote", "--model", "kiln-demo", "--version", "2.0.0"]).await.unwrap();
    kiln_tests::admin(&stack, &["models", "shadow", "--model", "kiln-demo", "--version", "1.0.0", "--percent", "100"])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let promoted = run_jobs(&client, "kiln-demo", 34..38).await;
    assert!(promoted.iter().all(|v| v == "2.0.0"), "{promoted:?}");
    let listed = client.get("/v1/jobs?limit=100").await.body;
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 38, "the tenant sees only its own jobs");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let report = loop {
        let report = kiln_tests::admin(&stack, &["models", "shadow-report", "--model", "kiln-demo"]).await.unwrap();
        if report.matches("succeeded").count() >= 8 {
            break report;
        }
        assert!(std::time::Instant::now() < deadline, "the shadows never finished:\n{report}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("{report}");
    let rows: Vec<&str> = report.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "one shadow per request:\n{report}");
    assert!(rows.iter().all(|row| row.contains(" 1.0.0 ") && row.contains(" 2.0.0 ")), "{report}");

    kiln_tests::admin(&stack, &["models", "retire", "--model", "kiln-demo", "--version", "1.0.0"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refused = client.post_json("/v1/jobs", &json!({"model": "kiln-demo@1.0.0", "prompt": "too late"})).await;
    assert_eq!((refused.status.as_u16(), refused.error_code()), (422, Some("unknown_model")), "{}", refused.body);
    assert!(refused.body["error"]["message"].as_str().unwrap().contains("retired"), "{}", refused.body);
    drop(v1);
}

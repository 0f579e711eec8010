//! The gpu-runner end to end: real runner processes on the demo model (ONNX Runtime on the CPU),
//! jobs submitted over HTTP, SQS, DynamoDB and S3 on the moto server, artifacts downloaded
//! through their presigned URLs and decoded.

use kiln_domain::ModelSpec;
use kiln_local::workspace_root;
use kiln_tests::{Client, download, media, runner_options, slow_job, stack, start_runner, stored_keys};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// The key of a succeeded job's artifact, its bytes through the presigned URL, and its probe.
async fn artifact(job: &Value, format: &str) -> (Vec<u8>, media::Probe) {
    let output = &job["outputs"][0];
    let bytes = download(output["url"].as_str().expect("presigned url")).await;
    assert_eq!(output["bytes"].as_u64(), Some(bytes.len() as u64), "recorded size");
    let probe = media::probe(format, &bytes).unwrap_or_else(|err| panic!("{format} does not decode: {err}"));
    (bytes, probe)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_format_renders_to_a_file_of_the_asked_size_and_length() {
    let stack = stack().await;
    let runner = start_runner(&stack, &runner_options("formats"));
    let client = Client::tenant(&stack, "acme").await;
    let cases = [("png", 1, 256, 192), ("gif", 5, 160, 120), ("mp4", 7, 192, 128), ("webm", 6, 128, 96)];
    let mut ids = Vec::new();
    for (format, frames, width, height) in cases {
        let mut body = json!({"model": "kiln-demo", "prompt": format!("a {format} landscape"), "format": format,
            "width": width, "height": height, "num_frames": frames, "steps": 3});
        if frames > 1 {
            body["fps"] = json!(6);
        }
        ids.push(client.post_json("/v1/jobs", &body).await.job_id());
    }
    for ((format, frames, width, height), id) in cases.into_iter().zip(&ids) {
        let job = client.wait_finished(id, LIMIT).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["progress"], 1.0);
        assert_eq!(job["attempts"], 1);
        for stage in ["queue_ms", "batch_wait_ms", "render_ms", "encode_ms", "upload_ms"] {
            assert!(job["timings"][stage].is_u64(), "{stage} missing: {}", job["timings"]);
        }
        let output = &job["outputs"][0];
        assert_eq!(output["key"], format!("jobs/acme/{id}/output.{format}"));
        let content_type = match format {
            "png" => "image/png",
            "gif" => "image/gif",
            "mp4" => "video/mp4",
            _ => "video/webm",
        };
        assert_eq!(output["content_type"], content_type);
        let (_, probe) = artifact(&job, format).await;
        assert_eq!(probe, media::Probe { width, height, frames }, "{format}");
        // Every video also has a poster: its first frame as a PNG.
        let outputs = job["outputs"].as_array().unwrap();
        if format == "png" {
            assert_eq!(outputs.len(), 1, "{job}");
            continue;
        }
        assert_eq!(outputs.len(), 2, "{job}");
        let poster = &outputs[1];
        assert_eq!(
            (poster["key"].as_str(), poster["content_type"].as_str()),
            (Some(format!("jobs/acme/{id}/poster.png").as_str()), Some("image/png"))
        );
        let bytes = download(poster["url"].as_str().expect("a poster link")).await;
        assert_eq!(poster["bytes"].as_u64(), Some(bytes.len() as u64));
        let still =
            media::probe("png", &bytes).unwrap_or_else(|err| panic!("the {format} poster does not decode: {err}"));
        assert_eq!(still, media::Probe { width, height, frames: 1 }, "{format} poster");
    }

    let metrics = reqwest::get(format!("{}/metrics", runner.metrics_url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kiln_runner_jobs_total{outcome=\"succeeded\"} 4"), "{metrics}");
    assert!(metrics.contains("kiln_runner_render_seconds_count 4"), "{metrics}");
    // One render call per job (KILN_MAX_BATCH 1) plus the startup warm-up of each served model.
    let served = std::fs::read_dir(workspace_root().join("gpu-runner/models")).unwrap().count();
    assert!(metrics.contains(&format!("kiln_runner_batches_total {}", 4 + served)), "{served} models: {metrics}");
    let busy = metrics
        .lines()
        .find_map(|line| line.strip_prefix("kiln_runner_render_busy_seconds_total "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .expect("render_busy_seconds_total");
    assert!(busy > 0.0, "{metrics}");
    let health = reqwest::get(format!("{}/healthz", runner.metrics_url)).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_seed_renders_the_same_bytes() {
    let stack = stack().await;
    let _runner = start_runner(&stack, &runner_options("seed"));
    // Two tenants, so the second request is rendered again rather than served from the cache.
    let (first, second) = (Client::tenant(&stack, "one").await, Client::tenant(&stack, "two").await);
    let body = json!({"model": "kiln-demo", "prompt": "twin peaks", "seed": 42, "width": 128, "height": 128,
        "num_frames": 3, "fps": 3, "format": "gif"});
    let mut other_seed = body.clone();
    other_seed["seed"] = json!(43);
    let a = first.post_json("/v1/jobs", &body).await.job_id();
    let b = second.post_json("/v1/jobs", &body).await.job_id();
    let c = first.post_json("/v1/jobs", &other_seed).await.job_id();
    let mut files = Vec::new();
    for (client, id) in [(&first, &a), (&second, &b), (&first, &c)] {
        let job = client.wait_finished(id, LIMIT).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        files.push(artifact(&job, "gif").await.0);
    }
    assert_eq!(files[0], files[1], "same parameters and seed, different bytes");
    assert_ne!(files[0], files[2], "another seed gave the same picture");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_is_canceled_while_queued_and_while_running() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    // No runner yet: the job waits in the queue and is canceled there.
    let queued = client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": "never drawn"})).await.job_id();
    let answer = client.post(&format!("/v1/jobs/{queued}/cancel")).await;
    assert_eq!((answer.status, answer.body["status"].as_str()), (StatusCode::OK, Some("canceled")));

    let runner = start_runner(&stack, &runner_options("cancel"));
    let running = client.post_json("/v1/jobs", &slow_job("a long render")).await.job_id();
    client.wait_for(&running, LIMIT, |job| job["status"] == "running" && job["progress"].as_f64() > Some(0.0)).await;
    let answer = client.post(&format!("/v1/jobs/{running}/cancel")).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(answer.body["cancel_requested"], true);
    let job = client.wait_finished(&running, LIMIT).await;
    assert_eq!(job["status"], "canceled", "{job}");
    assert!(job["progress"].as_f64() < Some(1.0), "the render ran to its end: {job}");

    // The runner skipped the queued job's message and acknowledged both.
    let queued_job = client.get(&format!("/v1/jobs/{queued}")).await.body;
    assert_eq!(queued_job["status"], "canceled");
    assert!(stored_keys(&stack, "jobs/acme/").await.is_empty(), "a canceled job left an artifact");
    let metrics = reqwest::get(format!("{}/metrics", runner.metrics_url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kiln_runner_jobs_total{outcome=\"canceled\"} 1"), "{metrics}");
    assert!(metrics.contains("kiln_runner_jobs_total{outcome=\"skipped\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_killed_mid_job_is_replaced_and_the_job_yields_one_artifact() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let mut options = runner_options("killed");
    options.lease_secs = 3;
    options.heartbeat_secs = 1;
    let mut first = start_runner(&stack, &options);
    let id = client.post_json("/v1/jobs", &slow_job("interrupted")).await.job_id();
    client.wait_for(&id, LIMIT, |job| job["status"] == "running" && job["progress"].as_f64() > Some(0.0)).await;
    first.kill();

    let _second = start_runner(&stack, &options);
    let job = client.wait_finished(&id, LIMIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2, "the second runner restarts the job: {job}");
    assert_eq!(stored_keys(&stack, &format!("jobs/acme/{id}/")).await, vec![format!("jobs/acme/{id}/output.png")]);
    let (_, probe) = artifact(&job, "png").await;
    assert_eq!(probe, media::Probe { width: 768, height: 768, frames: 1 });
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_running_work_back_and_another_runner_finishes_it() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let mut options = runner_options("sigterm");
    options.shutdown_deadline_secs = 1;
    let mut first = start_runner(&stack, &options);
    let id = client.post_json("/v1/jobs", &slow_job("handed back")).await.job_id();
    client.wait_for(&id, LIMIT, |job| job["status"] == "running" && job["progress"].as_f64() > Some(0.0)).await;
    first.terminate();
    let status = first.wait_exit(Duration::from_secs(20)).expect("the runner did not stop after SIGTERM");
    assert!(status.success(), "{status}");

    // Handed back with visibility 0: a new runner (whose lease is long) gets it at once.
    let _second = start_runner(&stack, &runner_options("sigterm-second"));
    let job = client.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("succeeded"), Some(2)), "{job}");
}

/// A job pinned to a version no runner serves (a candidate whose runners are not up, or gone)
/// is handed back to the queue, not failed, until it has waited the runner's
/// `KILN_UNSERVED_VERSION_WAIT_SECS`; then it fails `model_version_unavailable`, never started.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_for_a_version_no_runner_serves_waits_for_one_then_fails_with_a_clear_error() {
    let stack = stack().await;
    let mut options = runner_options("unserved");
    options.env.push(("KILN_UNSERVED_VERSION_WAIT_SECS".into(), "4".into()));
    let _runner = start_runner(&stack, &options);
    // A newer version joins the catalog (as a candidate) while no runner of it is up.
    let mut model = ModelSpec::read_manifest(&workspace_root().join("gpu-runner/models/kiln-demo")).unwrap();
    model.version = "9.9.9".into();
    assert_eq!(stack.publish_model(&model).await.unwrap(), kiln_domain::Offered::Candidate);
    let client = Client::tenant(&stack, "acme").await;
    let served = client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": "today"})).await.job_id();
    assert_eq!(client.wait_finished(&served, LIMIT).await["status"], "succeeded", "the candidate takes no traffic");
    let id =
        client.post_json("/v1/jobs", &json!({"model": "kiln-demo@9.9.9", "prompt": "from the future"})).await.job_id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = client.get(&format!("/v1/jobs/{id}")).await.body;
    assert_eq!(waiting["status"], "queued", "handed back, not failed: {waiting}");
    let job = client.wait_finished(&id, LIMIT).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "model_version_unavailable");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("version 9.9.9 within 4 s") && message.contains("serve version 1.0.0"), "{message}");
    assert_eq!(job["attempts"], 0, "never started");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_message_reaches_the_dead_letter_queue_ends_failed() {
    let mut stack = stack().await;
    stack.start_relays().await.expect("relays");
    let client = Client::tenant(&stack, "acme").await;
    let id = client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": "cursed"})).await.job_id();
    // Five runners take the message and die without a word (the queue's maxReceiveCount is 5);
    // the first of them had marked the job running.
    let store = kiln_aws::DynamoJobStore::new(
        stack.clients.dynamodb().clone(),
        &stack.resources.jobs_table,
        &stack.resources.requests_table,
    );
    let runs = kiln_app::JobRuns::new(std::sync::Arc::new(store));
    let job_id_parsed = kiln_domain::JobId::parse(&id).unwrap();
    let sqs = &stack.clients.sqs();
    let mut receives = 0;
    for _ in 0..20 {
        let received = sqs
            .receive_message()
            .queue_url(&stack.resources.job_queue_url)
            .visibility_timeout(0)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        for message in received.messages.unwrap_or_default() {
            if receives == 0 {
                let message_id = message.message_id.unwrap();
                let started = runs.start(&job_id_parsed, &message_id, chrono::Utc::now()).await.unwrap();
                assert!(matches!(started, kiln_app::Start::Render(_)));
            }
            receives += 1;
        }
        if receives >= 6 {
            break;
        }
    }
    assert!(receives >= 5, "received the message {receives} times");
    let job = client.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "dead_lettered", "{job}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stable_diffusion_package_renders_through_the_whole_stack() {
    let stack = stack().await;
    let _runner = start_runner(&stack, &runner_options("latent-diffusion"));
    let client = Client::tenant(&stack, "acme").await;
    let long_prompt = "a lighthouse on a rocky coast at dusk ".repeat(12);
    let image = json!({"model": "kiln-tiny-sd", "prompt": long_prompt, "width": 96, "height": 64, "steps": 3,
        "guidance": 7.5, "seed": 3});
    let video = json!({"model": "kiln-tiny-sd", "prompt": "waves", "width": 64, "height": 64, "steps": 2,
        "num_frames": 4, "fps": 4, "format": "gif", "seed": 3});
    let image_id = client.post_json("/v1/jobs", &image).await.job_id();
    let video_id = client.post_json("/v1/jobs", &video).await.job_id();

    let job = client.wait_finished(&image_id, LIMIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["model_version"], "1.0.0");
    let (_, probe) = artifact(&job, "png").await;
    assert_eq!(probe, media::Probe { width: 96, height: 64, frames: 1 });
    let warnings = job["warnings"].as_array().expect("a warnings list");
    assert!(warnings[0].as_str().unwrap().contains("prompt truncated"), "{job}");

    let job = client.wait_finished(&video_id, LIMIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job.get("warnings").is_none(), "a short prompt is not truncated: {job}");
    let (_, probe) = artifact(&job, "gif").await;
    assert_eq!(probe, media::Probe { width: 64, height: 64, frames: 4 });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_sent_twice_is_rendered_by_one_runner_while_its_lease_holds() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let mut slower = slow_job("sent twice");
    (slower["width"], slower["height"]) = (json!(1024), json!(1024));
    let id = client.post_json("/v1/jobs", &slower).await.job_id();
    // An SDK retry of a send SQS had already accepted: a second message for the same job.
    let job: kiln_domain::Job = {
        let store = kiln_aws::DynamoJobStore::new(
            stack.clients.dynamodb().clone(),
            &stack.resources.jobs_table,
            &stack.resources.requests_table,
        );
        kiln_app::ports::JobStore::get(&store, &kiln_domain::JobId::parse(&id).unwrap()).await.unwrap().unwrap()
    };
    let body = serde_json::to_string(&kiln_app::JobMessage::for_job(&job)).unwrap();
    let sqs = stack.clients.sqs();
    sqs.send_message().queue_url(&stack.resources.job_queue_url).message_body(body).send().await.unwrap();

    // Two runners, each takes one of the messages; leases much shorter than the render.
    let mut options = runner_options("sent-twice");
    options.lease_secs = 2;
    options.heartbeat_secs = 1;
    let _first = start_runner(&stack, &options);
    let _second = start_runner(&stack, &options);
    let job = client.wait_finished(&id, LIMIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job["attempts"].as_u64() <= Some(2), "the runners took the job from each other: {job}");
    let render_ms = job["timings"]["render_ms"].as_u64().unwrap();
    assert!(
        render_ms > 2 * 2_000,
        "the render ({render_ms} ms) must outlast two leases for this test to mean anything"
    );

    assert_eq!(
        kiln_tests::messages_on(&stack, &stack.dead_letter_queue_url()).await,
        0,
        "a message of the job was dead-lettered"
    );
    // Both messages are gone: the duplicate deleted on sight, the holder's at the end.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while kiln_tests::messages_on(&stack, &stack.resources.job_queue_url).await > 0 {
        assert!(std::time::Instant::now() < deadline, "a message of the finished job stayed on the queue");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The demo model's package, copied with a render budget of one second.
fn demo_with_a_one_second_budget() -> std::path::PathBuf {
    let dir = workspace_root().join("target/test-models").join(kiln_tests::unique_prefix());
    let package = dir.join("kiln-demo");
    std::fs::create_dir_all(&package).unwrap();
    let source = workspace_root().join("gpu-runner/models/kiln-demo");
    std::fs::copy(source.join("model.onnx"), package.join("model.onnx")).unwrap();
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(source.join("manifest.json")).unwrap()).unwrap();
    manifest["render_budget"] = json!({"base_secs": 1.0, "per_megapixel_step_secs": 0.0});
    std::fs::write(package.join("manifest.json"), manifest.to_string()).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn a_render_past_its_budget_fails_and_a_stuck_one_takes_the_runner_out_of_service() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let mut options = runner_options("watchdog");
    options.models_dir = demo_with_a_one_second_budget();
    options.env.push(("KILN_FAULT_STUCK_PROMPT".into(), "hang for ever".into()));
    options.env.push(("KILN_STUCK_GRACE_SECS".into(), "1".into()));
    options.env.push(("KILN_WARM_UP".into(), "false".into()));
    let runner = start_runner(&stack, &options);
    let health = || async { reqwest::get(format!("{}/healthz", runner.metrics_url)).await.unwrap().status() };

    // A render that stops when asked: the job fails, the runner stays healthy.
    let slow = client.post_json("/v1/jobs", &slow_job("too slow for its budget")).await.job_id();
    let job = client.wait_finished(&slow, LIMIT).await;
    assert_eq!(
        (job["status"].as_str(), job["error"]["code"].as_str()),
        (Some("failed"), Some("render_timeout")),
        "{job}"
    );
    assert_eq!(health().await, StatusCode::OK);

    // A render that never returns: the job still ends, the runner turns unhealthy and idle.
    let stuck = client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": "hang for ever"})).await.job_id();
    let job = client.wait_finished(&stuck, Duration::from_secs(30)).await;
    assert_eq!(
        (job["status"].as_str(), job["error"]["code"].as_str()),
        (Some("failed"), Some("render_timeout")),
        "{job}"
    );
    assert!(job["error"]["message"].as_str().unwrap().contains("did not stop"), "{job}");
    assert_eq!(health().await, StatusCode::SERVICE_UNAVAILABLE);
    // The slot is given back after the job's end is written (and its message deleted): soon
    // after, not before, the job reads failed.
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = reqwest::get(format!("{}/metrics", runner.metrics_url)).await.unwrap().text().await.unwrap();
        if metrics.contains("kiln_runner_in_flight 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metrics.contains("kiln_runner_in_flight 0"), "{metrics}");
    let after = client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": "after the hang"})).await.job_id();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(client.get(&format!("/v1/jobs/{after}")).await.body["status"], "queued", "a stuck runner took a job");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_result_is_served_only_while_its_outputs_are_kept_then_rendered_again() {
    // Outputs kept 8 s, links valid 2 s: a cache hit must leave a link's lifetime of outputs.
    let options = kiln_local::StackOptions {
        prefix: kiln_tests::unique_prefix(),
        output_retention_secs: 8,
        link_ttl_secs: 2,
        ..kiln_local::StackOptions::default()
    };
    let stack = kiln_tests::stack_with(options).await;
    let _runner = start_runner(&stack, &runner_options("retention"));
    let client = Client::tenant(&stack, "acme").await;
    let body = json!({"model": "kiln-demo", "prompt": "kept for a while", "seed": 8, "width": 64, "height": 64,
        "steps": 1});
    let first = client.post_json("/v1/jobs", &body).await.job_id();
    let job = client.wait_finished(&first, LIMIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let finished = chrono::DateTime::parse_from_rfc3339(job["finished_at"].as_str().unwrap()).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(job["outputs"][0]["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires - finished, chrono::Duration::seconds(8), "outputs expire a retention after the end: {job}");

    // Within the retention (less a link's life): the cache answers.
    let again = client.post_json("/v1/jobs", &body).await;
    assert_eq!(
        (again.status.as_u16(), again.body["cached"].as_bool(), again.job_id()),
        (200, Some(true), first.clone())
    );
    let url_end = chrono::DateTime::parse_from_rfc3339(again.body["outputs"][0]["url_expires_at"].as_str().unwrap());
    assert!(url_end.unwrap() <= expires, "a link outlives its output: {}", again.body);

    // Past it: the same seeded request renders again, and its links download.
    let wait = (expires - chrono::Utc::now().fixed_offset()).to_std().unwrap_or_default();
    tokio::time::sleep(wait).await;
    let later = client.post_json("/v1/jobs", &body).await;
    assert_eq!(later.status, 202, "a result whose outputs are gone was served from the cache: {}", later.body);
    let second = later.job_id();
    assert_ne!(second, first);
    let job = client.wait_finished(&second, LIMIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (bytes, _) = artifact(&job, "png").await;
    assert!(!bytes.is_empty());

    // The records carry DynamoDB's TTL: past the outputs' retention (and the queued time to live).
    let item = stack
        .clients
        .dynamodb()
        .get_item()
        .table_name(&stack.resources.jobs_table)
        .key("id", aws_sdk_dynamodb::types::AttributeValue::S(second.clone()))
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    let purge_at: i64 = item["purge_at"].as_n().unwrap().parse().unwrap();
    let created = chrono::DateTime::parse_from_rfc3339(job["created_at"].as_str().unwrap()).unwrap().timestamp();
    assert_eq!(purge_at, created + 3600 + 8 + 86_400, "queued TTL + retention + a day's margin");
}

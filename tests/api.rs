//! Every route of the HTTP API over real HTTP, against DynamoDB, SQS and S3 on the moto server.

use chrono::Utc;
use kiln_app::{
    JobMessage,
    ports::{JobStore, PortError},
};
use kiln_aws::DynamoJobStore;
use kiln_domain::{JobId, JobStatus, Output};
use kiln_local::{LocalStack, StackOptions};
use kiln_tests::{Answer, Client, admin, stack, stack_with, unique_prefix};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn store(stack: &LocalStack) -> DynamoJobStore {
    DynamoJobStore::new(stack.clients.dynamodb().clone(), &stack.resources.jobs_table, &stack.resources.requests_table)
}

/// Up to 10 messages waiting on the job queue (received, so hidden for its visibility timeout).
async fn queued_messages(stack: &LocalStack) -> Vec<aws_sdk_sqs::types::Message> {
    let received = stack.clients.sqs().receive_message().queue_url(&stack.resources.job_queue_url);
    received.max_number_of_messages(10).send().await.unwrap().messages.unwrap_or_default()
}

fn fox() -> Value {
    json!({"model": "kiln-demo", "prompt": "a red fox in the snow", "width": 256, "height": 256})
}

/// Plays the runner: start the job, store an artifact, finish it.
async fn render(stack: &LocalStack, id: &str, body: &'static [u8]) -> Result<(), PortError> {
    let store = store(stack);
    let mut job = store.get(&JobId::parse(id).unwrap()).await?.expect("job");
    job.transition(JobStatus::Running, Utc::now()).unwrap();
    job.revision += 1; // as the app's revise does for every write
    assert!(store.update(&job).await?);
    let key = job.output_key("png");
    stack
        .clients
        .s3()
        .put_object()
        .bucket(&stack.resources.artifacts_bucket)
        .key(&key)
        .content_type("image/png")
        .body(body.to_vec().into())
        .send()
        .await
        .expect("upload");
    job.outputs = vec![Output { key, content_type: "image/png".into(), bytes: body.len() as u64 }];
    job.transition(JobStatus::Succeeded, Utc::now()).unwrap();
    job.revision += 1;
    assert!(store.update(&job).await?);
    Ok(())
}

async fn start_running(stack: &LocalStack, id: &str) {
    let store = store(stack);
    let mut job = store.get(&JobId::parse(id).unwrap()).await.unwrap().unwrap();
    job.transition(JobStatus::Running, Utc::now()).unwrap();
    job.revision += 1; // as the app's revise does for every write
    assert!(store.update(&job).await.unwrap());
}

#[tokio::test]
async fn submit_queues_a_job_and_sends_its_message() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let answer = client.post_json("/v1/jobs", &fox()).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    let job = &answer.body;
    assert_eq!(job["status"], "queued");
    assert_eq!(job["model"], "kiln-demo");
    assert_eq!(job["model_version"], "1.0.0");
    assert_eq!(job["input"]["width"], 256);
    assert_eq!(job["input"]["steps"], 4, "the model's default is applied");
    assert!(job["input"]["seed"].is_u64(), "a drawn seed is recorded");
    assert_eq!(job["input"]["seed_source"], "drawn");
    assert_eq!(job["cached"], false);

    let messages = queued_messages(&stack).await;
    assert_eq!(messages.len(), 1);
    let message: JobMessage = serde_json::from_str(messages[0].body().unwrap()).unwrap();
    assert_eq!(message.job_id.as_str(), job["id"].as_str().unwrap());
    assert_eq!(message.tenant_id.as_str(), "acme");

    let read = client.get(&format!("/v1/jobs/{}", job["id"].as_str().unwrap())).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body["id"], job["id"]);
    assert_eq!(read.body["status"], "queued");
}

#[tokio::test]
async fn tenants_never_see_each_others_jobs() {
    let stack = stack().await;
    let acme = Client::tenant(&stack, "acme").await;
    let globex = Client::tenant(&stack, "globex").await;
    let id = acme.post_json("/v1/jobs", &fox()).await.body["id"].as_str().unwrap().to_owned();

    let read = globex.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!((read.status, read.error_code()), (StatusCode::NOT_FOUND, Some("not_found")));
    let cancel = globex.post(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(cancel.status, StatusCode::NOT_FOUND);
    let list = globex.get("/v1/jobs").await;
    assert_eq!(list.body["jobs"], json!([]));
    // The same request from another tenant is a new job, never the first tenant's result.
    render(&stack, &id, b"acme's picture").await.unwrap();
    let other = globex.post_json("/v1/jobs", &fox()).await;
    assert_eq!(other.status, StatusCode::ACCEPTED);
    assert_ne!(other.body["id"].as_str().unwrap(), id);
    assert_eq!(acme.get(&format!("/v1/jobs/{id}")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn identical_requests_are_deduplicated_then_served_from_the_cache() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let first = client.post_json("/v1/jobs", &fox()).await;
    let id = first.body["id"].as_str().unwrap().to_owned();
    let again = client
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a red fox in the snow", "height": 256, "width": 256, "model": "kiln-demo"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!((again.body["id"].as_str(), &again.body["deduplicated"]), (Some(id.as_str()), &json!(true)));

    render(&stack, &id, b"the picture").await.unwrap();
    let cached = client.post_json("/v1/jobs", &fox()).await;
    assert_eq!(cached.status, StatusCode::OK);
    assert_eq!(cached.body["cached"], true);
    assert_eq!(cached.body["id"].as_str(), Some(id.as_str()));
    let url = cached.body["outputs"][0]["url"].as_str().expect("a download link");
    let downloaded = reqwest::get(url).await.unwrap();
    assert_eq!(downloaded.status(), StatusCode::OK);
    assert_eq!(downloaded.bytes().await.unwrap().as_ref(), b"the picture");

    let read = client.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(read.body["status"], "succeeded");
    assert_eq!(read.body["progress"], 1.0);
    assert!(read.body["outputs"][0]["url_expires_at"].is_string());
    assert_eq!(queued_messages(&stack).await.len(), 1, "one render for three requests");
}

#[tokio::test]
async fn idempotency_keys_return_the_first_job_and_refuse_a_different_body() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let body = fox().to_string();
    let headers = [("content-type", "application/json"), ("idempotency-key", "order-17")];
    let first = client.submit_raw(body.clone(), &headers).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let retry = client.submit_raw(body, &headers).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.body["id"], first.body["id"]);
    assert_eq!(retry.headers.get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    let other = client.submit_raw(json!({"model": "kiln-demo", "prompt": "a cat"}).to_string(), &headers).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!((other.error_code(), other.error_field()), (Some("idempotency_key_reused"), Some("Idempotency-Key")));
}

/// Clients retry on timeouts, so the first request and its retries can arrive together: every
/// one of them must get the one job (never a 5xx), and only one render is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_one_idempotency_key_get_one_job() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let body = json!({"model": "kiln-demo", "prompt": "raced", "seed": 5}).to_string();
    let headers = [("content-type", "application/json"), ("idempotency-key", "raced-1")];
    let requests = (0..8).map(|_| {
        let (client, body) = (client.clone(), body.clone());
        tokio::spawn(async move { client.submit_raw(body, &headers).await })
    });
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.unwrap());
    }
    let ids: std::collections::BTreeSet<&str> = answers.iter().filter_map(|a| a.body["id"].as_str()).collect();
    let statuses: Vec<u16> = answers.iter().map(|a| a.status.as_u16()).collect();
    assert!(statuses.iter().all(|s| *s == 200 || *s == 202), "statuses {statuses:?}: {answers:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 202).count(), 1, "one request created it: {statuses:?}");
    assert_eq!(ids.len(), 1, "one job for all: {ids:?}");
    assert_eq!(queued_messages(&stack).await.len(), 1, "one render queued");
}

#[tokio::test]
async fn cancel_queued_running_and_finished_jobs() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let submit = |prompt: &'static str| {
        let client = client.clone();
        async move { client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": prompt})).await }
    };

    let queued = submit("one").await.body["id"].as_str().unwrap().to_owned();
    let canceled = client.post(&format!("/v1/jobs/{queued}/cancel")).await;
    assert_eq!((canceled.status, &canceled.body["status"]), (StatusCode::OK, &json!("canceled")));
    assert_eq!(client.post(&format!("/v1/jobs/{queued}/cancel")).await.status, StatusCode::OK, "idempotent");

    let running = submit("two").await.body["id"].as_str().unwrap().to_owned();
    start_running(&stack, &running).await;
    let flagged = client.post(&format!("/v1/jobs/{running}/cancel")).await;
    assert_eq!(flagged.status, StatusCode::ACCEPTED);
    assert_eq!((&flagged.body["status"], &flagged.body["cancel_requested"]), (&json!("running"), &json!(true)));
    assert_eq!(client.get(&format!("/v1/jobs/{running}")).await.body["cancel_requested"], true);

    let done = submit("three").await.body["id"].as_str().unwrap().to_owned();
    render(&stack, &done, b"x").await.unwrap();
    let conflict = client.post(&format!("/v1/jobs/{done}/cancel")).await;
    assert_eq!((conflict.status, conflict.error_code()), (StatusCode::CONFLICT, Some("already_finished")));

    let missing = client.post(&format!("/v1/jobs/{}/cancel", JobId::generate(Utc::now()))).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn list_pages_newest_first_and_filters_by_status() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": format!("p{i}")})).await.body["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    client.post(&format!("/v1/jobs/{}/cancel", ids[0])).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?limit=2&cursor={c}"),
            None => "/v1/jobs?limit=2".to_owned(),
        };
        let page = client.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{:?}", page.body);
        let jobs = page.body["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 2);
        seen.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_owned()));
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);
    let canceled = client.get("/v1/jobs?status=canceled").await;
    let canceled: Vec<&str> =
        canceled.body["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(canceled, vec![ids[0].as_str()]);
    let queued = client.get("/v1/jobs?status=queued&limit=100").await;
    assert_eq!(queued.body["jobs"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn models_are_listed_with_their_limits() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let answer = client.get("/v1/models").await;
    assert_eq!(answer.status, StatusCode::OK);
    let demo = answer.body["models"].as_array().unwrap().iter().find(|m| m["name"] == "kiln-demo").expect("demo model");
    assert_eq!(demo["limits"]["width"]["max"], 1024);
    assert_eq!(demo["defaults"]["video_format"], "gif");
}

#[tokio::test]
async fn bad_requests_get_clear_errors_naming_the_field() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let json = [("content-type", "application/json")];
    let cases: Vec<(String, &[(&str, &str)], StatusCode, &str, Option<&str>)> = vec![
        ("{\"model\":".into(), &json, StatusCode::BAD_REQUEST, "invalid_json", None),
        ("[]".into(), &json, StatusCode::BAD_REQUEST, "invalid_json", None),
        (json!({"model": "kiln-demo"}).to_string(), &json, StatusCode::BAD_REQUEST, "missing_field", Some("prompt")),
        (
            json!({"model": "kiln-demo", "prompt": "x", "width": "wide"}).to_string(),
            &json,
            StatusCode::BAD_REQUEST,
            "invalid_type",
            Some("width"),
        ),
        (
            json!({"model": "kiln-demo", "prompt": "x", "colour": "red"}).to_string(),
            &json,
            StatusCode::BAD_REQUEST,
            "unknown_field",
            Some("colour"),
        ),
        (
            json!({"model": "kiln-demo", "prompt": "x", "width": 4096}).to_string(),
            &json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("width"),
        ),
        (
            json!({"model": "kiln-demo", "prompt": "x", "height": 100}).to_string(),
            &json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("height"),
        ),
        (
            json!({"model": "kiln-demo", "prompt": "x", "num_frames": 500}).to_string(),
            &json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("num_frames"),
        ),
        (
            json!({"model": "kiln-demo", "prompt": "x", "format": "tiff"}).to_string(),
            &json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("format"),
        ),
        (
            json!({"model": "kiln-demo", "prompt": "x".repeat(2001)}).to_string(),
            &json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("prompt"),
        ),
        (
            json!({"model": "kiln-demo", "prompt": "x", "webhook": {"url": "https://169.254.169.254/"}}).to_string(),
            &json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("webhook.url"),
        ),
        (
            json!({"model": "dall-e", "prompt": "x"}).to_string(),
            &json,
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_model",
            Some("model"),
        ),
        (
            json!({"model": "kiln-demo", "prompt": "x"}).to_string(),
            &[("content-type", "text/plain")],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            Some("Content-Type"),
        ),
        (
            json!({"model": "kiln-demo", "prompt": "x"}).to_string(),
            &[],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            Some("Content-Type"),
        ),
        (
            format!("{{\"model\":\"kiln-demo\",\"prompt\":\"{}\"}}", "x".repeat(70_000)),
            &json,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            None,
        ),
        (
            json!({"model": "kiln-demo", "prompt": "x"}).to_string(),
            &[("content-type", "application/json"), ("idempotency-key", "")],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("Idempotency-Key"),
        ),
    ];
    for (body, headers, status, code, field) in cases {
        let answer = client.submit_raw(body.clone(), headers).await;
        let shown: String = body.chars().take(80).collect();
        assert_eq!(answer.status, status, "{shown}: {:?}", answer.body);
        assert_eq!(answer.error_code(), Some(code), "{shown}: {:?}", answer.body);
        assert_eq!(answer.error_field(), field, "{shown}: {:?}", answer.body);
        assert!(answer.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    let invalid_utf8 = client.submit_raw(vec![0xff, 0xfe, b'{'], &json).await;
    assert_eq!(invalid_utf8.status, StatusCode::BAD_REQUEST);

    for (path, status, field) in [
        ("/v1/jobs?limit=0", StatusCode::UNPROCESSABLE_ENTITY, "limit"),
        ("/v1/jobs?limit=ten", StatusCode::UNPROCESSABLE_ENTITY, "limit"),
        ("/v1/jobs?status=done", StatusCode::UNPROCESSABLE_ENTITY, "status"),
        ("/v1/jobs?cursor=zzz", StatusCode::UNPROCESSABLE_ENTITY, "cursor"),
        ("/v1/jobs?sort=asc", StatusCode::BAD_REQUEST, "sort"),
    ] {
        let answer = client.get(path).await;
        assert_eq!((answer.status, answer.error_field()), (status, Some(field)), "{path}: {:?}", answer.body);
    }
    assert_eq!(client.get("/v1/jobs/not-a-job-id").await.status, StatusCode::NOT_FOUND);
    assert_eq!(client.get("/v1/nothing").await.status, StatusCode::NOT_FOUND);
    let wrong_method = Client::send(client.request(reqwest::Method::DELETE, "/v1/jobs")).await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn requests_without_a_valid_key_are_refused() {
    let stack = stack().await;
    let _acme = Client::tenant(&stack, "acme").await;
    for key in [None, Some("kiln_not_a_real_key"), Some("")] {
        let client = Client::new(&stack.api_url, key);
        for answer in
            [client.get("/v1/jobs").await, client.post_json("/v1/jobs", &fox()).await, client.get("/v1/models").await]
        {
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{key:?}");
            assert_eq!(answer.error_field(), Some("Authorization"));
            assert!(answer.headers.contains_key("www-authenticate"));
        }
    }
    let basic =
        Client::send(reqwest::Client::new().get(format!("{}/v1/jobs", stack.api_url)).basic_auth("u", Some("p"))).await;
    assert_eq!(basic.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_job_whose_message_cannot_be_sent_is_failed_not_left_queued() {
    let healthy = stack().await;
    // The same tables, but a queue URL that does not exist: every send fails.
    let mut config = healthy.config.clone();
    config.resources.job_queue_url = format!("{}-missing", healthy.resources.job_queue_url);
    let broken = LocalStack::serve(healthy.clients.clone(), config.resources.clone(), config, StackOptions::default())
        .await
        .unwrap();
    let key = healthy.create_tenant("acme", "Acme").await.unwrap();
    let client = Client::new(&broken.api_url, Some(key.expose()));
    let headers = [("content-type", "application/json"), ("idempotency-key", "k1")];
    let answer = client.submit_raw(fox().to_string(), &headers).await;
    assert_eq!((answer.status, answer.error_code()), (StatusCode::SERVICE_UNAVAILABLE, Some("queue_unavailable")));
    assert!(answer.headers.contains_key("retry-after"));
    let jobs = client.get("/v1/jobs").await.body["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["status"], "failed");
    assert_eq!(jobs[0]["error"]["code"], "enqueue_failed");

    // Retrying the same request through a healthy API makes a new, queued job.
    let healthy_client = Client::new(&healthy.api_url, Some(key.expose()));
    let retry = healthy_client.submit_raw(fox().to_string(), &headers).await;
    assert_eq!(retry.status, StatusCode::ACCEPTED, "{:?}", retry.body);
    assert_ne!(retry.body["id"], jobs[0]["id"]);
    assert_eq!(retry.body["status"], "queued");
}

#[tokio::test]
async fn queued_jobs_expire_after_their_time_to_live() {
    let stack =
        stack_with(StackOptions { prefix: unique_prefix(), queued_ttl_secs: 0, ..StackOptions::default() }).await;
    let client = Client::tenant(&stack, "acme").await;
    let id = client.post_json("/v1/jobs", &fox()).await.body["id"].as_str().unwrap().to_owned();
    let later = Utc::now() + chrono::Duration::seconds(2);
    assert_eq!(stack.api.jobs().expire_overdue(later, 100).await.unwrap(), 1);
    let read = client.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(read.body["status"], "expired");
    assert!(read.body["finished_at"].is_string());
    // An expired job is not a cache hit: the same request queues a new job.
    let again = client.post_json("/v1/jobs", &fox()).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_ne!(again.body["id"].as_str(), Some(id.as_str()));
}

/// Found by the burst: a tenant created with limits lost them in DynamoDB (the in-memory fake
/// kept them), so its jobs were held to the deployment's defaults.
#[tokio::test]
async fn a_tenant_created_with_limits_keeps_them() {
    use kiln_app::{Tenant, TenantLimits};
    let stack = stack().await;
    let tenants = stack.aws.tenants();
    let limits = TenantLimits { max_active_jobs: 7, jobs_per_minute: 3, ..Default::default() };
    let id = kiln_domain::TenantId::parse("limited-from-birth").unwrap();
    let tenant = Tenant {
        id: id.clone(),
        name: "Limited".into(),
        disabled: false,
        limits: Some(limits),
        share_weight: None,
        max_priority: None,
    };
    assert!(tenants.create_tenant(&tenant).await.unwrap());
    assert_eq!(tenants.tenant(&id).await.unwrap().expect("tenant").limits, Some(limits));
}

/// `kiln-admin tenant-weight` sets a tenant's fair-share weight in DynamoDB (created with one,
/// set, back to the default), refuses an unknown tenant and a weight of 0, and the weight rides
/// on the next job's message; `tenant-priority` sets the highest priority its jobs get.
#[tokio::test(flavor = "multi_thread")]
async fn kiln_admin_sets_a_tenants_share_weight_and_max_priority_and_its_jobs_carry_them() {
    let stack = stack().await;
    let tenants = stack.aws.tenants();
    let id = kiln_domain::TenantId::parse("weighty").unwrap();
    let key = admin(&stack, &["tenant-create", "--id", "weighty", "--name", "Weighty"]).await.unwrap();
    assert_eq!(tenants.tenant(&id).await.unwrap().unwrap().share_weight, None);
    assert_eq!(
        admin(&stack, &["tenant-weight", "--tenant", "weighty", "--weight", "3"]).await.unwrap().trim(),
        "share weight 3"
    );
    assert_eq!(tenants.tenant(&id).await.unwrap().unwrap().share_weight, Some(3));
    let unknown = admin(&stack, &["tenant-weight", "--tenant", "nobody", "--weight", "2"]).await.unwrap_err();
    assert!(unknown.to_string().contains("no tenant `nobody`"), "{unknown}");
    assert!(admin(&stack, &["tenant-weight", "--tenant", "weighty", "--weight", "0"]).await.is_err(), "weight 0");
    let born = kiln_app::Tenant { share_weight: Some(5), ..tenants.tenant(&id).await.unwrap().unwrap() };
    let born = kiln_app::Tenant { id: kiln_domain::TenantId::parse("born-weighty").unwrap(), ..born };
    assert!(tenants.create_tenant(&born).await.unwrap());
    assert_eq!(tenants.tenant(&born.id).await.unwrap().unwrap().share_weight, Some(5));

    // The API reads tenants through a short cache: a job submitted now carries weight 3.
    let client = Client::new(&stack.api_url, Some(key.trim()));
    let submitted = client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": "heavy"})).await;
    assert!(submitted.status.is_success(), "{:?}", submitted.body);
    let delivered = queued_messages(&stack).await;
    let message: Value = serde_json::from_str(delivered[0].body().unwrap()).unwrap();
    assert_eq!(message["weight"], 3, "{message}");

    admin(&stack, &["tenant-weight", "--tenant", "weighty", "--default"]).await.unwrap();
    assert_eq!(tenants.tenant(&id).await.unwrap().unwrap().share_weight, None);

    // The highest priority its jobs get, likewise.
    use kiln_domain::Priority;
    let set = admin(&stack, &["tenant-priority", "--tenant", "weighty", "--max", "high"]).await.unwrap();
    assert_eq!(set.trim(), "max priority high");
    assert_eq!(tenants.tenant(&id).await.unwrap().unwrap().max_priority, Some(Priority::High));
    assert!(admin(&stack, &["tenant-priority", "--tenant", "weighty", "--max", "urgent"]).await.is_err());
    assert!(admin(&stack, &["tenant-priority", "--tenant", "nobody", "--max", "low"]).await.is_err());
    admin(&stack, &["tenant-priority", "--tenant", "weighty", "--default"]).await.unwrap();
    assert_eq!(tenants.tenant(&id).await.unwrap().unwrap().max_priority, None);

    // Limits: the daily units set once stay when a later change leaves them out (a tenant
    // suspended at 0 is not un-suspended by a change of its rate).
    let limits = |tenant: kiln_app::Tenant| tenant.limits.expect("limits");
    admin(
        &stack,
        &[
            "tenant-limits",
            "--tenant",
            "weighty",
            "--max-active-jobs",
            "5",
            "--jobs-per-minute",
            "9",
            "--units-per-day",
            "0",
        ],
    )
    .await
    .unwrap();
    assert_eq!(limits(tenants.tenant(&id).await.unwrap().unwrap()).units_per_day, 0);
    admin(&stack, &["tenant-limits", "--tenant", "weighty", "--max-active-jobs", "5", "--jobs-per-minute", "20"])
        .await
        .unwrap();
    let kept = limits(tenants.tenant(&id).await.unwrap().unwrap());
    assert_eq!((kept.jobs_per_minute, kept.units_per_day), (20, 0));
}

#[tokio::test]
async fn tenants_limits_refuse_new_jobs_with_429_and_name_the_limit() {
    use kiln_app::{TenantLimits, ports::TenantDirectory};
    let stack = stack().await;
    let tenants = kiln_aws::DynamoTenants::new(stack.clients.dynamodb().clone(), &stack.resources.tenants_table);
    let quota = Client::tenant(&stack, "quota").await;
    let rate = Client::tenant(&stack, "rate").await;
    let id = |name: &str| kiln_domain::TenantId::parse(name).unwrap();
    // Set before either tenant's first request: the API caches a tenant for 30 s.
    assert!(
        tenants
            .set_limits(
                &id("quota"),
                Some(TenantLimits { max_active_jobs: 2, jobs_per_minute: 100, ..Default::default() })
            )
            .await
            .unwrap()
    );
    assert!(
        tenants
            .set_limits(
                &id("rate"),
                Some(TenantLimits { max_active_jobs: 100, jobs_per_minute: 2, ..Default::default() })
            )
            .await
            .unwrap()
    );
    assert!(!tenants.set_limits(&id("nobody"), None).await.unwrap(), "no such tenant");
    let job = |n: u32| json!({"model": "kiln-demo", "prompt": format!("limited {n}"), "width": 256, "height": 256});

    let first = quota.post_json("/v1/jobs", &job(1)).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    assert_eq!(quota.post_json("/v1/jobs", &job(2)).await.status, StatusCode::ACCEPTED);
    let refused = quota.post_json("/v1/jobs", &job(3)).await;
    assert_eq!(
        (refused.status, refused.error_code()),
        (StatusCode::TOO_MANY_REQUESTS, Some("quota_exceeded")),
        "{}",
        refused.body
    );
    assert!(
        refused.body["error"]["message"].as_str().unwrap().contains("2 jobs are queued or running"),
        "{}",
        refused.body
    );
    assert_eq!(refused.body["error"]["limit"], "max_active_jobs", "{}", refused.body);
    let error = refused.body["error"].as_object().unwrap();
    assert!(error.get("resets_at").is_some_and(Value::is_null), "frees when a job ends: {}", refused.body);
    // Answering an identical request renders nothing: not refused.
    let same = quota.post_json("/v1/jobs", &job(1)).await;
    assert_eq!((same.status, same.body["deduplicated"].as_bool()), (StatusCode::ACCEPTED, Some(true)), "{}", same.body);
    // A canceled job frees its place.
    let id1 = first.body["id"].as_str().unwrap();
    assert_eq!(quota.post(&format!("/v1/jobs/{id1}/cancel")).await.status, StatusCode::OK);
    assert_eq!(quota.post_json("/v1/jobs", &job(3)).await.status, StatusCode::ACCEPTED);

    // The three requests must fall in one minute window.
    let second = u64::from(chrono::Timelike::second(&Utc::now()));
    if second >= 50 {
        tokio::time::sleep(std::time::Duration::from_secs(61 - second)).await;
    }
    assert_eq!(rate.post_json("/v1/jobs", &job(1)).await.status, StatusCode::ACCEPTED);
    assert_eq!(rate.post_json("/v1/jobs", &job(2)).await.status, StatusCode::ACCEPTED);
    let limited = rate.post_json("/v1/jobs", &job(3)).await;
    assert_eq!(
        (limited.status, limited.error_code()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited")),
        "{}",
        limited.body
    );
    let retry_after: u64 = limited.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(limited.body["error"]["limit"], "jobs_per_minute", "{}", limited.body);
    let resets_at: chrono::DateTime<Utc> = limited.body["error"]["resets_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(chrono::Timelike::second(&resets_at), 0, "the next minute: {resets_at}");
    // Only the two accepted jobs reached the queue for this tenant; the refused ones left nothing.
    let listed = rate.get("/v1/jobs").await;
    assert_eq!(listed.body["jobs"].as_array().map(Vec::len), Some(2), "{}", listed.body);
}

/// A tenant with 5 units a day sends 12 one-unit jobs at once: exactly 5 pass, however the
/// requests interleave (one conditional update on the day's usage item counts each), and the
/// rest get 429 `units_exhausted` naming the limit, when it resets and a Retry-After.
/// `GET /v1/usage` then shows the day spent.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_submits_never_pass_the_last_units_of_a_daily_quota() {
    use kiln_app::TenantLimits;
    let stack = stack().await;
    let tenants = stack.aws.tenants();
    let client = Client::tenant(&stack, "units").await;
    let limits = TenantLimits { units_per_day: 5, ..TenantLimits::default() };
    let tenant = kiln_domain::TenantId::parse("units").unwrap();
    assert!(tenants.set_limits(&tenant, Some(limits)).await.unwrap());
    // 256² × 1 step, unguided: 0.07 megapixel-steps, 1 unit.
    let job = |n: usize| json!({"model": "kiln-demo", "prompt": format!("unit {n}"), "width": 256, "height": 256, "steps": 1});
    let answers = futures_util::future::join_all((0..12).map(|n| {
        let (client, body) = (&client, job(n));
        async move { client.post_json("/v1/jobs", &body).await }
    }))
    .await;
    let accepted: Vec<&Answer> = answers.iter().filter(|a| a.status == StatusCode::ACCEPTED).collect();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert_eq!((accepted.len(), refused.len()), (5, 7), "{:?}", answers.iter().map(|a| &a.body).collect::<Vec<_>>());
    assert!(accepted.iter().all(|a| a.body["cost_units"] == 1), "{}", accepted[0].body);
    let midnight = (Utc::now() + chrono::Duration::days(1)).date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    for answer in refused {
        let error = &answer.body["error"];
        assert_eq!((error["code"].as_str(), error["limit"].as_str()), (Some("units_exhausted"), Some("units_per_day")));
        let resets_at: chrono::DateTime<Utc> = error["resets_at"].as_str().unwrap().parse().unwrap();
        assert!(resets_at == midnight || resets_at == midnight - chrono::Duration::days(1), "{resets_at}");
        let retry_after: i64 = answer.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((resets_at - Utc::now()).num_seconds().abs_diff(retry_after) <= 2, "Retry-After {retry_after}");
        assert!(error["message"].as_str().unwrap().contains("5 of this account's 5 units"), "{error}");
    }
    let usage = client.get("/v1/usage").await;
    assert_eq!(usage.status, StatusCode::OK);
    let units = &usage.body["units_per_day"];
    assert_eq!(
        (units["limit"].as_u64(), units["used"].as_u64(), units["remaining"].as_u64()),
        (Some(5), Some(5), Some(0))
    );
    assert_eq!(usage.body["max_active_jobs"]["used"], 5, "{}", usage.body);
    let listed = client.get("/v1/jobs").await;
    assert_eq!(listed.body["jobs"].as_array().map(Vec::len), Some(5), "the refused left no job");
}

/// DynamoDB answers a query with at most 1 MB: a page of long (multi-byte) jobs comes back
/// short, with a key to go on from. Listing must go on from it, or `next_cursor` comes back
/// null and older jobs can never be listed.
#[tokio::test(flavor = "multi_thread")]
async fn listing_jobs_larger_than_a_dynamodb_page_returns_every_job_once() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let limits = kiln_app::TenantLimits { max_active_jobs: 1_000, jobs_per_minute: 1_000, ..Default::default() };
    let tenant = kiln_domain::TenantId::parse("acme").unwrap();
    assert!(stack.aws.tenants().set_limits(&tenant, Some(limits)).await.unwrap());
    // About 16 KB each in DynamoDB: 2,000 four-byte characters in each of the two prompts.
    let negative = "🌊".repeat(2_000);
    let mut submitted = std::collections::BTreeSet::new();
    for chunk in (0..150).collect::<Vec<usize>>().chunks(10) {
        let answers = chunk.iter().map(|i| {
            let body = json!({"model": "kiln-demo", "prompt": format!("{i:04}{}", "🦊".repeat(1_996)),
                "negative_prompt": negative});
            let client = client.clone();
            async move { client.post_json("/v1/jobs", &body).await }
        });
        for answer in futures_util::future::join_all(answers).await {
            assert_eq!(answer.status, 202, "{}", answer.body);
            submitted.insert(answer.body["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(submitted.len(), 150);

    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(cursor) => format!("/v1/jobs?limit=100&cursor={cursor}"),
            None => "/v1/jobs?limit=100".to_owned(),
        };
        let page = client.get(&path).await;
        assert_eq!(page.status, 200, "{}", page.body);
        listed.extend(page.body["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()));
        cursor = page.body["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    let distinct: std::collections::BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(listed.len(), distinct.len(), "a job listed twice");
    let missing = submitted.difference(&distinct).count();
    assert_eq!((distinct.len(), missing), (150, 0), "{} of 150 listed, {missing} never", distinct.len());
    assert!(distinct.is_subset(&submitted));
}

/// The sparse index of queued jobs is spread over partitions (one partition would cap every
/// queued job's writes, platform-wide, near 1,000 a second), and the sweep still finds every
/// overdue job in all of them, in batches smaller than the backlog.
#[tokio::test(flavor = "multi_thread")]
async fn queued_jobs_spread_over_the_index_partitions_and_all_expire() {
    let stack =
        stack_with(StackOptions { prefix: unique_prefix(), queued_ttl_secs: 0, ..StackOptions::default() }).await;
    let client = Client::tenant(&stack, "acme").await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let answer =
            client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": format!("spread {i}")})).await;
        assert_eq!(answer.status, 202, "{}", answer.body);
        ids.push(answer.body["id"].as_str().unwrap().to_owned());
    }
    let scanned = stack
        .clients
        .dynamodb()
        .scan()
        .table_name(&stack.resources.jobs_table)
        .index_name("queued_by_expiry")
        .send()
        .await
        .unwrap();
    let shards: std::collections::BTreeSet<String> = scanned
        .items()
        .iter()
        .filter_map(|item| item.get("queued_shard").and_then(|v| v.as_s().ok()).cloned())
        .collect();
    assert_eq!(scanned.items().len(), 40);
    assert!(shards.len() >= 8, "40 queued jobs in {} index partitions: {shards:?}", shards.len());

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let jobs = kiln_app::Jobs::new(&stack.aws.all(), stack.config.jobs_config());
    let mut expired = 0;
    for _ in 0..10 {
        let batch = jobs.expire_overdue(Utc::now(), 15).await.unwrap();
        expired += batch;
        if batch == 0 {
            break;
        }
    }
    assert_eq!(expired, 40);
    for id in &ids {
        assert_eq!(client.get(&format!("/v1/jobs/{id}")).await.body["status"], "expired");
    }
}

/// Runs a `kiln-admin` command against the stack's tables; what it printed.

#[tokio::test(flavor = "multi_thread")]
async fn kiln_admin_makes_keys_only_for_tenants_that_exist_and_lists_and_revokes_them() {
    let stack = stack().await;
    let refused = admin(&stack, &["keys", "create", "--tenant", "acme-typo"]).await;
    let error = refused.expect_err("a key was made for a tenant that does not exist");
    assert!(error.to_string().contains("no tenant `acme-typo`"), "{error}");
    admin(&stack, &["tenant-create", "--id", "acme-typo", "--name", "Later"]).await.unwrap();
    assert_eq!(
        admin(&stack, &["keys", "list", "--tenant", "acme-typo"]).await.unwrap().lines().count(),
        2,
        "the refused key exists after all (a header and one key expected)"
    );

    let first = admin(&stack, &["tenant-create", "--id", "acme", "--name", "Acme"]).await.unwrap().trim().to_owned();
    let second = admin(&stack, &["keys", "create", "--tenant", "acme"]).await.unwrap().trim().to_owned();
    let other =
        admin(&stack, &["tenant-create", "--id", "globex", "--name", "Globex"]).await.unwrap().trim().to_owned();
    let listed = admin(&stack, &["keys", "list", "--tenant", "acme"]).await.unwrap();
    let rows: Vec<&str> = listed.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{listed}");
    assert!(!listed.contains(&first) && !listed.contains(&second), "a listing shows a key: {listed}");
    let row_of = |key: &str| *rows.iter().find(|row| row.contains(&format!("...{}", &key[key.len() - 4..]))).unwrap();
    let second_id = row_of(&second).split_whitespace().next().unwrap().to_owned();

    // Another tenant's key is not acme's to revoke, by id or by text.
    let globex_id = admin(&stack, &["keys", "list", "--tenant", "globex"]).await.unwrap();
    let globex_id = globex_id.lines().nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    assert!(admin(&stack, &["keys", "revoke", "--tenant", "acme", "--id", &globex_id]).await.is_err());
    assert!(admin(&stack, &["keys", "revoke", "--tenant", "acme", "--key", &other]).await.is_err());

    let revoked = admin(&stack, &["keys", "revoke", "--tenant", "acme", "--id", &second_id]).await.unwrap();
    assert_eq!(revoked.trim(), format!("revoked {second_id}"));
    let answer = |key: &str| {
        let client = Client::new(&stack.api_url, Some(key));
        async move { client.get("/v1/jobs").await.status }
    };
    assert_eq!(answer(&second).await, StatusCode::UNAUTHORIZED, "a revoked key still works");
    assert_eq!(answer(&first).await, StatusCode::OK);
    assert_eq!(answer(&other).await, StatusCode::OK);
    assert_eq!(admin(&stack, &["keys", "list", "--tenant", "acme"]).await.unwrap().lines().count(), 2);
}

/// `quality: "auto"` through the API: as asked on an empty queue; the demo model's fast preset
/// (2 steps) once more than 8 jobs wait per GPU slot (no runner is up: one slot is assumed), with
/// the job's warning saying so and its cost counted at the steps it renders.
#[tokio::test(flavor = "multi_thread")]
async fn quality_auto_renders_the_fast_preset_while_the_backlog_is_long() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "hurried").await;
    let auto =
        |n: usize| json!({"model": "kiln-demo", "prompt": format!("hurried {n}"), "steps": 40, "quality": "auto"});
    let first = client.post_json("/v1/jobs", &auto(0)).await;
    assert_eq!(
        (first.status, first.body["input"]["steps"].as_u64()),
        (StatusCode::ACCEPTED, Some(40)),
        "{}",
        first.body
    );
    for n in 1..9 {
        let body = json!({"model": "kiln-demo", "prompt": format!("waiting {n}")});
        assert_eq!(client.post_json("/v1/jobs", &body).await.status, StatusCode::ACCEPTED);
    }
    // Estimates' reads of the queue are reused for 2 s.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let hurried = client.post_json("/v1/jobs", &auto(9)).await;
    assert_eq!(hurried.body["input"]["steps"], 2, "{}", hurried.body);
    let warning = hurried.body["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.starts_with("quality auto: 9 jobs were waiting") && warning.contains("2 steps instead of 40"),
        "{}",
        hurried.body
    );
    assert!(hurried.body["cost_units"].as_u64() < first.body["cost_units"].as_u64(), "{}", hurried.body);
    let bad = client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": "x", "quality": "best"})).await;
    assert_eq!(
        (bad.status, bad.body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("quality")),
        "{}",
        bad.body
    );
}

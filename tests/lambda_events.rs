//! The Lambda entry points fed with the real event payloads in `events/`, decoded the way the
//! Lambda runtime decodes them.

use aws_lambda_events::{apigw::ApiGatewayProxyRequest, eventbridge::EventBridgeEvent};
use chrono::Utc;
use kiln_api::{Api, Function};
use kiln_app::ApiKey;
use kiln_events::{deliver_webhooks, expire_jobs, inbox_trigger, job_dead_letters, job_events};
use kiln_lambda::{LambdaEvent, local_context};
use kiln_local::{LocalStack, StackOptions};
use kiln_tests::{Client, receiver::Receiver, stack, stack_with, unique_prefix};
use lambda_http::{Body, request::LambdaRequest};
use serde_json::{Value, json};
use std::{sync::Arc, time::Duration};

const FIXTURE_KEY: &str = "kiln_fixture00000000000000000000000000000000000";
const FIXTURE_JOB: &str = "01KAQ3Z8X9K2M3N4P5Q6R7S8T9";

const SUBMIT: &str = include_str!("../events/apigw-rest-submit-job.json");
const SUBMIT_BASE64: &str = include_str!("../events/apigw-rest-submit-job-base64.json");
const GET: &str = include_str!("../events/apigw-rest-get-job.json");
const LIST: &str = include_str!("../events/apigw-rest-list-jobs.json");
const LIST_PAGE: &str = include_str!("../events/apigw-rest-list-jobs-page.json");
const CANCEL: &str = include_str!("../events/apigw-rest-cancel-job.json");
const MODELS: &str = include_str!("../events/apigw-rest-list-models.json");
const OPENAPI: &str = include_str!("../events/apigw-rest-openapi.json");
const USAGE: &str = include_str!("../events/apigw-rest-get-usage.json");
const SCHEDULE: &str = include_str!("../events/eventbridge-schedule-expire-jobs.json");
const DEAD_LETTERS: &str = include_str!("../events/sqs-job-dead-letters.json");

/// Replaces the fixture's job id with a real one.
fn with_job(fixture: &str, id: &str) -> String {
    fixture.replace(FIXTURE_JOB, id)
}

/// An event as the runtime hands it over, with a minute to answer.
fn lambda_event<T>(payload: T) -> LambdaEvent<T> {
    LambdaEvent::new(payload, local_context(Duration::from_secs(60)))
}

/// Decodes an event as the runtime does and calls the function's handler, on the ports the
/// function's binary wires (so a route reaching for a port its function lacks fails here).
async fn invoke(stack: &LocalStack, function: Function, event: &str) -> (u16, Value) {
    let request: LambdaRequest = serde_json::from_str(event).expect("an API Gateway event");
    let api = Api::new(&kiln_api::wiring::for_function(function, &stack.aws), &stack.config);
    let response = api.handle(function, request.into()).await;
    let status = response.status().as_u16();
    let body = match response.into_body() {
        Body::Text(text) => serde_json::from_str(&text).unwrap(),
        Body::Binary(bytes) => serde_json::from_slice(&bytes).unwrap(),
        _ => Value::Null,
    };
    (status, body)
}

async fn fixture_stack() -> LocalStack {
    let stack = stack().await;
    stack.add_tenant_key("fixture-tenant", "Fixture", &ApiKey::from_text(FIXTURE_KEY)).await.unwrap();
    stack
}

#[test]
fn api_events_round_trip_through_the_event_types() {
    for fixture in [SUBMIT, SUBMIT_BASE64, GET, LIST, LIST_PAGE, CANCEL, MODELS, OPENAPI, USAGE] {
        let event: ApiGatewayProxyRequest = serde_json::from_str(fixture).unwrap();
        let again: ApiGatewayProxyRequest = serde_json::from_value(serde_json::to_value(&event).unwrap()).unwrap();
        assert_eq!(again.path, event.path);
        assert_eq!(again.http_method, event.http_method);
        assert_eq!(event.request_context.stage.as_deref(), Some("live"), "the REST API's stage");
        assert_eq!(again.body, event.body);
        assert_eq!(again.headers, event.headers);
    }
    let schedule: EventBridgeEvent<Value> = serde_json::from_str(SCHEDULE).unwrap();
    assert_eq!(schedule.detail_type, "Scheduled Event");
}

#[tokio::test]
async fn each_route_answers_its_event() {
    let stack = fixture_stack().await;

    let (status, job) = invoke(&stack, Function::SubmitJob, SUBMIT).await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["input"]["seed"], 1234);
    let id = job["id"].as_str().unwrap().to_owned();
    let (status, replay) = invoke(&stack, Function::SubmitJob, SUBMIT).await;
    assert_eq!((status, replay["id"].as_str()), (200, Some(id.as_str())), "the Idempotency-Key replays");

    let (status, video) = invoke(&stack, Function::SubmitJob, SUBMIT_BASE64).await;
    assert_eq!(status, 202, "{video}");
    assert_eq!((video["input"]["num_frames"].as_u64(), video["input"]["format"].as_str()), (Some(8), Some("gif")));

    let (status, read) = invoke(&stack, Function::GetJob, &with_job(GET, &id)).await;
    assert_eq!((status, read["id"].as_str()), (200, Some(id.as_str())));

    let (status, list) = invoke(&stack, Function::ListJobs, LIST).await;
    assert_eq!(status, 200);
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2);

    let (status, models) = invoke(&stack, Function::ListModels, MODELS).await;
    assert_eq!(status, 200);
    assert!(models["models"].as_array().unwrap().iter().any(|m| m["name"] == "kiln-demo"));

    // The document needs no key (the event has no Authorization header).
    let (status, document) = invoke(&stack, Function::ListModels, OPENAPI).await;
    assert_eq!(status, 200, "{document}");
    assert_eq!(document, serde_json::from_str::<Value>(kiln_api::openapi::document_json()).unwrap());

    let (status, usage) = invoke(&stack, Function::GetUsage, USAGE).await;
    assert_eq!(status, 200, "{usage}");
    let spent = job["cost_units"].as_u64().unwrap() + video["cost_units"].as_u64().unwrap();
    assert!(spent >= 2, "{job} {video}");
    assert_eq!(usage["units_per_day"]["used"].as_u64(), Some(spent), "{usage}");
    assert_eq!(usage["max_active_jobs"]["used"], 2, "{usage}");
    assert!(usage["jobs_per_minute"]["used"].as_u64().unwrap() <= 2, "{usage}");

    let (status, canceled) = invoke(&stack, Function::CancelJob, &with_job(CANCEL, &id)).await;
    assert_eq!((status, canceled["status"].as_str()), (200, Some("canceled")));
    let (_, queued) = invoke(&stack, Function::ListJobs, LIST).await;
    let (status, every) = invoke(&stack, Function::ListJobs, LIST_PAGE).await;
    let statuses =
        |list: &Value| list["jobs"].as_array().unwrap().iter().map(|j| j["status"].clone()).collect::<Vec<_>>();
    assert_eq!(statuses(&queued), ["queued"], "the canceled job left the queued list");
    assert_eq!(
        (status, statuses(&every)),
        (200, vec![json!("queued"), json!("canceled")]),
        "newest first, every status"
    );

    // The fixture's own id belongs to no job.
    let (status, missing) = invoke(&stack, Function::GetJob, GET).await;
    assert_eq!((status, missing["error"]["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn a_function_refuses_routes_it_does_not_serve() {
    let stack = fixture_stack().await;
    let (status, body) = invoke(&stack, Function::GetJob, SUBMIT).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("route_not_found")));
}

#[tokio::test]
async fn a_wrong_key_in_the_event_is_refused() {
    let stack = stack().await; // the fixture key is not registered here
    let (status, body) = invoke(&stack, Function::ListModels, MODELS).await;
    assert_eq!((status, body["error"]["field"].as_str()), (401, Some("Authorization")));
}

#[tokio::test]
async fn the_schedule_event_expires_overdue_jobs() {
    let stack =
        stack_with(StackOptions { prefix: unique_prefix(), queued_ttl_secs: 0, ..StackOptions::default() }).await;
    let client = Client::tenant(&stack, "acme").await;
    let id = client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": "x"})).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let mut event: EventBridgeEvent<Value> = serde_json::from_str(SCHEDULE).unwrap();
    event.time = Some(Utc::now());
    let report = expire_jobs::handle(sweep(&stack), lambda_event(event)).await.unwrap();
    let empty = kiln_app::jobs::Backlog { schedulable: 0, low: 0, complete: true };
    assert_eq!(report, expire_jobs::SweepReport { expired: 1, backlog: Some(empty) });
    assert_eq!(client.get(&format!("/v1/jobs/{id}")).await.body["status"], "expired");
}

fn sweep(stack: &kiln_local::LocalStack) -> Arc<expire_jobs::Sweep> {
    let jobs = expire_jobs::wire(&stack.aws, &stack.config);
    Arc::new(expire_jobs::Sweep { jobs, queue_url: stack.resources.job_queue_url.clone() })
}

/// The sweep also publishes the backlog the runner group scales on: low-priority jobs (and
/// shadows) are counted apart, so they never make it grow on their own.
#[tokio::test]
async fn the_schedule_event_publishes_the_backlog_without_low_priority_jobs() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    for (n, priority) in ["normal", "low", "normal", "low", "low"].iter().enumerate() {
        let body = json!({"model": "kiln-demo", "prompt": format!("waiting {n}"), "priority": priority});
        assert_eq!(client.post_json("/v1/jobs", &body).await.status, reqwest::StatusCode::ACCEPTED);
    }
    let mut event: EventBridgeEvent<Value> = serde_json::from_str(SCHEDULE).unwrap();
    event.time = Some(Utc::now());
    let report = expire_jobs::handle(sweep(&stack), lambda_event(event)).await.unwrap();
    let backlog = report.backlog.expect("a backlog");
    assert_eq!((backlog.schedulable, backlog.low, backlog.complete), (2, 3, true));
    let line: Value =
        serde_json::from_str(&expire_jobs::backlog_metric(&stack.resources.job_queue_url, &backlog, Utc::now()))
            .unwrap();
    let queue = stack.resources.job_queue_url.rsplit('/').next().unwrap();
    assert_eq!(
        (line["QueueName"].as_str(), line["SchedulableBacklog"].as_f64(), line["LowPriorityBacklog"].as_f64()),
        (Some(queue), Some(2.0), Some(3.0))
    );
    assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Namespace"], "kiln");
}

#[tokio::test]
async fn the_dead_letter_function_fails_the_job_and_drops_unreadable_messages() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let answer = client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": "lost at sea"})).await;
    let id = answer.body["id"].as_str().unwrap().to_owned();
    let event: aws_lambda_events::sqs::SqsEvent = serde_json::from_str(&with_job(DEAD_LETTERS, &id)).unwrap();
    let runs = Arc::new(job_dead_letters::wire(&stack.aws));
    let response = job_dead_letters::handle(runs.clone(), lambda_event(event.clone())).await.unwrap();
    assert!(response.batch_item_failures.is_empty(), "both records are done: {response:?}");
    let job = client.get(&format!("/v1/jobs/{id}")).await.body;
    assert_eq!(
        (job["status"].as_str(), job["error"]["code"].as_str()),
        (Some("failed"), Some("dead_lettered")),
        "{job}"
    );

    // Delivered again (SQS is at-least-once): the job has ended, nothing changes.
    let again = job_dead_letters::handle(runs, lambda_event(event)).await.unwrap();
    assert!(again.batch_item_failures.is_empty());
    assert_eq!(client.get(&format!("/v1/jobs/{id}")).await.body["finished_at"], job["finished_at"]);
}

const WEBHOOK_SECRET: &str = include_str!("../events/apigw-rest-webhook-secret.json");
const ROTATE_SECRET: &str = include_str!("../events/apigw-rest-rotate-webhook-secret.json");
const CREATE_UPLOAD: &str = include_str!("../events/apigw-rest-create-upload.json");
const JOB_STREAM: &str = include_str!("../events/dynamodb-stream-job-events.json");
const WEBHOOK_MESSAGES: &str = include_str!("../events/sqs-deliver-webhooks.json");
const INBOX_PUT: &str = include_str!("../events/s3-put-inbox.json");

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_secret_and_upload_routes_answer_their_events() {
    let stack = fixture_stack().await;
    let (status, first) = invoke(&stack, Function::WebhookSecret, WEBHOOK_SECRET).await;
    assert_eq!(status, 200, "{first}");
    assert!(first["secret"].as_str().unwrap().starts_with("whsec_"));
    let (status, rotated) = invoke(&stack, Function::WebhookSecret, ROTATE_SECRET).await;
    assert_eq!(status, 200, "{rotated}");
    assert_ne!(rotated["secret"], first["secret"]);
    let (status, upload) = invoke(&stack, Function::CreateUpload, CREATE_UPLOAD).await;
    assert_eq!(status, 201, "{upload}");
    let upload_id = upload["upload_id"].as_str().unwrap();
    assert_eq!(upload["key"], format!("inbox/fixture-tenant/lighthouse-1/{upload_id}.json"));
    assert_eq!(upload["headers"]["content-length"], "60");
    assert_eq!(upload["method"], "PUT");
    let (status, _) = invoke(&stack, Function::CreateUpload, WEBHOOK_SECRET).await;
    assert_eq!(status, 404, "each function serves only its own routes");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_job_stream_event_queues_the_subscribed_webhook_events() {
    let stack = fixture_stack().await;
    let event: aws_lambda_events::dynamodb::Event = serde_json::from_str(JOB_STREAM).expect("a DynamoDB stream event");
    let changes = Arc::new(job_events::wire(&stack.aws));
    let response = job_events::handle(changes, lambda_event(event)).await.unwrap();
    assert!(response.batch_item_failures.is_empty());
    let events = queued_webhook_events(&stack).await;
    assert_eq!(events.len(), 1, "the insert raises nothing; running → succeeded raises completed");
    let queued = &events[0];
    assert_eq!(queued["type"], "completed");
    assert_eq!(queued["id"], format!("evt_{FIXTURE_JOB}_completed_3"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_queue_event_is_delivered_signed() {
    let stack = fixture_stack().await;
    // A receiver on 127.0.0.1 in place of the fixture's public URL (the local stack allows
    // loopback receivers).
    let receiver = Receiver::start(vec![204]).await;
    let url = receiver.url.clone();
    let event: aws_lambda_events::sqs::SqsEvent =
        serde_json::from_str(&WEBHOOK_MESSAGES.replace("https://hooks.example.com/kiln", &url)).unwrap();
    let deliveries = Arc::new(deliver_webhooks::wire(&stack.aws, &stack.delivery_config()).unwrap());
    let response = deliver_webhooks::handle(deliveries, lambda_event(event)).await.unwrap();
    assert!(response.batch_item_failures.is_empty(), "delivered, so nothing to retry");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1, "one POST: {seen:?}");
    assert_eq!(seen[0].request_line, "POST /hook");
    assert_eq!(seen[0].id, format!("evt_{FIXTURE_JOB}_completed_3"));
    assert!(!seen[0].timestamp.is_empty(), "webhook-timestamp is set");
    assert!(seen[0].signature.starts_with("v1,"), "{:?}", seen[0].signature);
    assert_eq!(seen[0].body["type"], "completed", "{:?}", seen[0].body);
}

/// The object the inbox fixtures announce, holding `spec`.
async fn put_inbox_fixture_object(stack: &LocalStack, spec: &'static str) {
    let put = stack.clients.s3().put_object().bucket(&stack.resources.artifacts_bucket);
    let put = put.key("inbox/fixture-tenant/lighthouse-1/01JX3F8Z2M4N6P8R0T2V4W6Y8Z.json");
    put.body(spec.as_bytes().to_vec().into()).send().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_s3_inbox_event_starts_a_job() {
    let stack = fixture_stack().await;
    put_inbox_fixture_object(&stack, r#"{"model":"kiln-demo","prompt":"a lighthouse from the inbox"}"#).await;
    let event: aws_lambda_events::s3::S3Event = serde_json::from_str(INBOX_PUT).expect("an S3 event");
    let inbox = inbox_trigger::wire(&stack.aws, &stack.config);
    let outcomes = inbox_trigger::on_event(&inbox, &event).await.unwrap();
    let [kiln_app::inbox::InboxOutcome::Started(id)] = outcomes.as_slice() else { panic!("{outcomes:?}") };
    let client = Client::new(&stack.api_url, Some(FIXTURE_KEY));
    let job = client.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job.body["input"]["prompt"], "a lighthouse from the inbox");
    assert_eq!(inbox_trigger::on_event(&inbox, &event).await.unwrap(), outcomes, "a repeated event is the same job");
}

/// Up to 10 events waiting on the webhook queue.
async fn queued_webhook_events(stack: &LocalStack) -> Vec<Value> {
    let received = stack
        .clients
        .sqs()
        .receive_message()
        .queue_url(&stack.resources.webhook_queue_url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    let messages = received.messages.unwrap_or_default();
    messages.iter().map(|m| serde_json::from_str(m.body().unwrap()).unwrap()).collect()
}

const INBOX_FAILURE: &str = include_str!("../events/lambda-destination-inbox-failure.json");
const STREAM_FAILURE: &str = include_str!("../events/lambda-destination-job-events-failure.json");

async fn send(stack: &LocalStack, queue: &str, body: &str) {
    stack.clients.sqs().send_message().queue_url(stack.queue_url(queue)).message_body(body).send().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inbox_event_lambda_gave_up_on_is_replayed_from_its_failures_queue() {
    let stack = fixture_stack().await;
    // The upload happened while inbox-trigger kept failing: the object is there, no job.
    put_inbox_fixture_object(&stack, r#"{"model":"kiln-demo","prompt":"kept through an outage"}"#).await;
    send(&stack, "inbox-failures", INBOX_FAILURE).await;
    send(&stack, "inbox-failures", "not a destination record").await;
    let inbox = inbox_trigger::wire(&stack.aws, &stack.config);
    let url = stack.queue_url("inbox-failures");
    let replayed = kiln_events::replay::replay_inbox(stack.clients.sqs(), &url, &inbox).await.unwrap();
    assert_eq!(replayed, kiln_events::replay::Replayed { replayed: 1, failed: 1 });
    let client = Client::new(&stack.api_url, Some(FIXTURE_KEY));
    let jobs = client.get("/v1/jobs").await.body;
    let started: Vec<&Value> =
        jobs["jobs"].as_array().unwrap().iter().filter(|j| j["input"]["prompt"] == "kept through an outage").collect();
    assert_eq!(started.len(), 1, "the replay started the upload's job once: {jobs}");
    assert_eq!(
        kiln_tests::messages_on(&stack, &stack.queue_url("inbox-failures")).await,
        1,
        "the replayed failure is deleted, the bad one kept"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_batch_lambda_gave_up_on_is_read_back_and_its_events_queued() {
    let stack = fixture_stack().await;
    let client = Client::new(&stack.api_url, Some(FIXTURE_KEY));
    let receiver = "https://hooks.example.com/kiln";
    let body =
        json!({"model": "kiln-demo", "prompt": "lost event", "webhook": {"url": receiver, "events": ["completed"]}});
    let id = client.post_json("/v1/jobs", &body).await.job_id();
    assert_eq!(client.post(&format!("/v1/jobs/{id}/cancel")).await.body["status"], "canceled");

    // job-events failed on the cancel's record until Lambda gave up: find that record's place.
    let kiln_tests::StreamStart { streams, arn, shard, iterator } = kiln_tests::jobs_stream_from_start(&stack).await;
    let records = streams.get_records().shard_iterator(iterator).send().await.unwrap().records.unwrap();
    let canceled = records
        .iter()
        .filter_map(|record| record.dynamodb.as_ref())
        .find(|change| {
            let new = change.new_image.as_ref();
            let text = |name: &str| new.and_then(|image| image.get(name)).and_then(|v| v.as_s().ok()).cloned();
            text("id").as_deref() == Some(id.as_str()) && text("status").as_deref() == Some("canceled")
        })
        .and_then(|change| change.sequence_number.clone())
        .expect("the cancel's stream record");
    let failure = STREAM_FAILURE
        .replace("shardId-00000001763633700000-00000000", &shard)
        .replace("100000000000000000001", &canceled)
        .replace("arn:aws:dynamodb:us-east-1:123456789012:table/kiln-jobs/stream/2026-11-20T00:00:00.000", &arn);
    send(&stack, "job-events-failures", &failure).await;

    let changes = job_events::wire(&stack.aws);
    let url = stack.queue_url("job-events-failures");
    let replayed = kiln_events::replay::replay_job_events(stack.clients.sqs(), &streams, &url, &changes).await.unwrap();
    assert_eq!(replayed, kiln_events::replay::Replayed { replayed: 1, failed: 0 });
    let events = queued_webhook_events(&stack).await;
    assert_eq!(events.len(), 1, "only the failed record's event: {events:?}");
    assert_eq!((events[0]["type"].as_str(), events[0]["job"]["id"].as_str()), (Some("completed"), Some(id.as_str())));
    assert_eq!(kiln_tests::messages_on(&stack, &stack.queue_url("job-events-failures")).await, 0);
}

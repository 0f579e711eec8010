//! The S3 inbox end to end over moto: a tenant asks for an upload link, PUTs a job spec to
//! `inbox/<tenant>/<name>/<upload id>.json`, the bucket's notification starts the job
//! (`inbox-trigger`), a runner renders it, and `job-events` writes the artifact and
//! `result.json` under `outbox/<tenant>/<name>/<upload id>/`. Bad specs get `error.json` with
//! the API's own messages.

use kiln_local::LocalStack;
use kiln_tests::{Client, media, runner_options, stack, start_runner, wait_for_object};
use serde_json::{Value, json};
use std::time::Duration;

async fn started_stack() -> LocalStack {
    let mut stack = stack().await;
    stack.start_relays().await.expect("relays");
    stack
}

/// Asks for an upload link and PUTs `body` there, as a tenant's script would.
async fn upload(client: &Client, name: &str, body: &str) -> Value {
    let link = client.post_json("/v1/uploads", &json!({"name": name, "size": body.len()})).await;
    assert_eq!(link.status, 201, "{}", link.body);
    let url = link.body["url"].as_str().unwrap();
    let put = reqwest::Client::new()
        .put(url)
        .header("content-type", "application/json")
        .header("content-length", link.body["headers"]["content-length"].as_str().unwrap())
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "upload: {}", put.status());
    link.body
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uploaded_spec_renders_into_the_outbox() {
    let stack = started_stack().await;
    let _runner = start_runner(&stack, &runner_options("inbox"));
    let client = Client::tenant(&stack, "acme").await;
    let link = upload(
        &client,
        "harbour-01",
        r#"{"model":"kiln-demo","prompt":"a harbour","width":128,"height":96,"steps":2,"seed":4}"#,
    )
    .await;
    let upload_id = link["upload_id"].as_str().unwrap();
    assert_eq!(link["key"], format!("inbox/acme/harbour-01/{upload_id}.json"));
    let outbox = format!("outbox/acme/harbour-01/{upload_id}/");
    assert_eq!(link["outbox"], outbox.as_str());

    let result: Value = serde_json::from_slice(
        &wait_for_object(&stack, &format!("{outbox}result.json"), Duration::from_secs(90)).await,
    )
    .unwrap();
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["input"]["prompt"], "a harbour");
    let id = result["id"].as_str().unwrap();
    let png = wait_for_object(&stack, &format!("{outbox}output.png"), Duration::from_secs(5)).await;
    assert_eq!(media::probe("png", &png).unwrap(), media::Probe { width: 128, height: 96, frames: 1 });
    // The job is the tenant's, visible through the API like any other.
    let job = client.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job.status, 200);
    assert_eq!(job.body["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_spec_gets_the_apis_error_and_a_repeated_event_starts_no_second_job() {
    let stack = started_stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let bad = r#"{"model":"kiln-demo","prompt":"x","width":100000}"#;
    let link = upload(&client, "too-wide", bad).await;
    let error_key = format!("{}error.json", link["outbox"].as_str().unwrap());
    let error: Value =
        serde_json::from_slice(&wait_for_object(&stack, &error_key, Duration::from_secs(30)).await).unwrap();
    let api = client.post_json("/v1/jobs", &serde_json::from_str(bad).unwrap()).await;
    assert_eq!(api.status, 422);
    assert_eq!(error["error"], api.body["error"], "the same code, message and field as the API");
    assert_eq!(error["error"]["field"], "width");

    let link = upload(&client, "not-json", "this is not json").await;
    let error_key = format!("{}error.json", link["outbox"].as_str().unwrap());
    let error: Value =
        serde_json::from_slice(&wait_for_object(&stack, &error_key, Duration::from_secs(30)).await).unwrap();
    assert_eq!(error["error"]["code"], "invalid_json", "{error}");

    // The same object announced twice (S3 delivers at least once) is one job.
    let link = upload(&client, "twice", r#"{"model":"kiln-demo","prompt":"once only"}"#).await;
    let twice_key = link["key"].as_str().unwrap();
    let mut relayed = None;
    for _ in 0..100 {
        let listed = client.get("/v1/jobs").await;
        relayed = listed.body["jobs"].as_array().unwrap().iter().find(|j| j["input"]["prompt"] == "once only").cloned();
        if relayed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let relayed = relayed.expect("the notification started the job");
    let inbox = kiln_events::inbox_trigger::wire(&stack.aws, &stack.config);
    let head =
        stack.clients.s3().head_object().bucket(&stack.resources.artifacts_bucket).key(twice_key).send().await.unwrap();
    let first =
        inbox.on_object(twice_key, head.version_id(), head.e_tag()).await.map_err(|e| format!("{e:?}")).unwrap();
    let second = inbox.on_object(twice_key, head.version_id(), head.e_tag()).await.unwrap();
    assert_eq!(first, second);
    let kiln_app::inbox::InboxOutcome::Started(id) = first else { panic!("{first:?}") };
    assert_eq!(relayed["id"], id.as_str(), "the event announced again is the job the first one started");
    let listed = client.get("/v1/jobs").await;
    let count = listed.body["jobs"].as_array().unwrap().iter().filter(|j| j["input"]["prompt"] == "once only").count();
    assert_eq!(count, 1, "one job for the object, however often it is announced: {}", listed.body);
    assert!(listed.body["jobs"].as_array().unwrap().iter().any(|j| j["id"] == id.as_str()));

    // A tenant's upload link only ever points into its own prefix.
    let other = Client::tenant(&stack, "globex").await;
    let link = other.post_json("/v1/uploads", &json!({"name": "../acme/x", "size": 10})).await;
    assert_eq!((link.status.as_u16(), link.error_field()), (422, Some("name")));
    let link = other.post_json("/v1/uploads", &json!({"name": "x", "size": 10})).await;
    assert!(link.body["key"].as_str().unwrap().starts_with("inbox/globex/x/"), "{}", link.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_link_is_signed_for_the_specs_size_and_no_more_than_the_inbox_reads() {
    let stack = started_stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let limit = stack.config.max_body_bytes;
    for (body, status, why) in [
        (json!({"name": "big"}), 400, "no size"),
        (json!({"name": "big", "size": limit + 1}), 422, "a size over the inbox's limit"),
        (json!({"name": "big", "size": 0}), 422, "an empty spec"),
        (json!({"name": "big", "size": "12"}), 422, "a size that is not a number"),
    ] {
        let link = client.post_json("/v1/uploads", &body).await;
        assert_eq!((link.status.as_u16(), link.error_field()), (status, Some("size")), "{why}: {}", link.body);
    }
    let link = client.post_json("/v1/uploads", &json!({"name": "big", "size": limit})).await;
    assert_eq!(link.status, 201, "{}", link.body);
    assert_eq!(link.body["headers"]["content-length"], limit.to_string());
    // S3 refuses a PUT whose headers differ from the signed ones: the size is among them.
    // (moto does not check signatures, so this is asserted on the link; see RELIABILITY.md.)
    let url = url::Url::parse(link.body["url"].as_str().unwrap()).unwrap();
    let signed = url.query_pairs().find(|(name, _)| name == "X-Amz-SignedHeaders").map(|(_, v)| v.into_owned());
    let signed = signed.expect("a SigV4 query-signed link");
    assert!(signed.split(';').any(|h| h == "content-length"), "the size is not signed: {signed}");
    assert!(signed.split(';').any(|h| h == "content-type"), "the type is not signed: {signed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_specs_uploaded_under_one_name_answer_in_two_outboxes() {
    let stack = started_stack().await;
    let _runner = start_runner(&stack, &runner_options("inbox-same-name"));
    let client = Client::tenant(&stack, "acme").await;
    let bad = upload(&client, "nightly", r#"{"model":"kiln-demo","prompt":"x","width":100000}"#).await;
    let bad_outbox = bad["outbox"].as_str().unwrap().to_owned();
    wait_for_object(&stack, &format!("{bad_outbox}error.json"), Duration::from_secs(30)).await;
    let good =
        upload(&client, "nightly", r#"{"model":"kiln-demo","prompt":"fixed","width":64,"height":64,"steps":1}"#).await;
    let good_outbox = good["outbox"].as_str().unwrap().to_owned();
    assert_ne!(bad_outbox, good_outbox, "two uploads of one name share an outbox");
    let result: Value = serde_json::from_slice(
        &wait_for_object(&stack, &format!("{good_outbox}result.json"), Duration::from_secs(90)).await,
    )
    .unwrap();
    assert_eq!((result["status"].as_str(), result["input"]["prompt"].as_str()), (Some("succeeded"), Some("fixed")));
    let beside_result = kiln_tests::stored_keys(&stack, &good_outbox).await;
    assert!(
        !beside_result.iter().any(|key| key.ends_with("error.json")),
        "an old error.json lies beside the later result: {beside_result:?}"
    );
    // The first upload's answer is still its own.
    let error: Value = serde_json::from_slice(
        &wait_for_object(&stack, &format!("{bad_outbox}error.json"), Duration::from_secs(5)).await,
    )
    .unwrap();
    assert_eq!(error["error"]["field"], "width");
}

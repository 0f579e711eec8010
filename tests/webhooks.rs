//! Webhooks and the S3 inbox end to end over moto: the jobs table's stream feeds `job-events`,
//! which queues events; `deliver-webhooks` drains the webhook queue and POSTs signed events to
//! a receiver on 127.0.0.1; uploads to `inbox/` start jobs whose results land in `outbox/`.
//! The relays (`LocalStack::start_relays`) stand in for the Lambda triggers.

use bytes::Bytes;
use kiln_local::LocalStack;
use kiln_tests::{Client, receiver::Receiver, runner_options, stack, start_runner};
use kiln_webhooks::Secret;
use serde_json::{Value, json};
use std::time::Duration;

async fn started_stack() -> LocalStack {
    let mut stack = stack().await;
    stack.start_relays().await.expect("relays");
    stack
}

async fn secret(client: &Client) -> Secret {
    let answer = client.get("/v1/webhooks/secret").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    Secret::parse(answer.body["secret"].as_str().unwrap()).unwrap()
}

/// A queued job with a webhook, canceled at once: its `completed` event goes out with no runner.
async fn canceled_job(client: &Client, url: &str, prompt: &str) -> String {
    let body = json!({"model": "kiln-demo", "prompt": prompt, "webhook": {"url": url, "events": ["completed"]}});
    let answer = client.post_json("/v1/jobs", &body).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let id = answer.body["id"].as_str().unwrap().to_owned();
    let canceled = client.post(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(canceled.body["status"], "canceled", "{}", canceled.body);
    id
}

async fn job(client: &Client, id: &str) -> Value {
    client.get(&format!("/v1/jobs/{id}")).await.body
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_event_failing_twice_is_delivered_on_the_third_attempt() {
    let stack = started_stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let receiver = Receiver::start(vec![500, 503, 200]).await;
    receiver.secrets.lock().unwrap().push(secret(&client).await);
    let id = canceled_job(&client, &receiver.url, "retry me").await;

    let seen = receiver.wait_for(3, Duration::from_secs(60)).await;
    assert_eq!(seen.len(), 3, "three attempts: {seen:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.seen().len(), 3, "nothing after the delivery");
    for attempt in &seen {
        assert_eq!(attempt.verified_with, [0], "every attempt is signed with the tenant's secret");
        assert_eq!(attempt.id, seen[0].id, "the same webhook-id on every attempt");
        assert_eq!(attempt.body["type"], "completed");
        assert_eq!(attempt.body["job"]["id"], id.as_str());
        assert_eq!(attempt.body["job"]["status"], "canceled");
        assert!(attempt.body["timestamp"].is_string());
    }
    let record = job(&client, &id).await["webhook_delivery"].clone();
    assert_eq!((record["attempts"].as_u64(), record["delivered"].as_u64()), (Some(3), Some(1)), "{record}");
    assert_eq!(record["last_status"], 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_that_always_fails_ends_in_the_dead_letter_queue() {
    let stack = started_stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let receiver = Receiver::start(vec![500]).await;
    let id = canceled_job(&client, &receiver.url, "never delivered").await;
    let attempts = kiln_local::stack::webhook_max_attempts() as usize;
    // The receiver gets attempts until the endpoint's circuit opens; the rest of the schedule's
    // attempts are held back (recorded, no request), and the event still ends in the DLQ.
    let sent = stack.delivery_config().circuit_failures as usize;

    let dlq = stack.webhook_dead_letter_queue_url();
    let mut dead = None;
    for _ in 0..120 {
        let received = stack.clients.sqs().receive_message().queue_url(&dlq).wait_time_seconds(1).send().await.unwrap();
        if let Some(message) = received.messages.unwrap_or_default().pop() {
            dead = message.body;
            break;
        }
    }
    let dead: Value = serde_json::from_str(&dead.expect("the event reached the webhook DLQ")).unwrap();
    assert_eq!(dead["job"]["id"], id.as_str());
    // The circuit opens after `sent` failures and closes again after its cool-down, when one
    // more request may go before it reopens.
    let requests = receiver.seen().len();
    assert!((sent..=sent + 1).contains(&requests), "{requests} requests, the circuit opening after {sent}");
    assert!(receiver.seen().iter().all(|attempt| attempt.body["job"]["id"] == id.as_str()));
    let record = job(&client, &id).await["webhook_delivery"].clone();
    assert_eq!(record["attempts"].as_u64(), Some(attempts as u64), "every scheduled attempt was made: {record}");
    assert_eq!((record["delivered"].as_u64(), record["abandoned"].as_u64()), (Some(0), Some(1)), "{record}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_refuses_gets_no_retries_and_a_rotated_secret_signs_twice() {
    let stack = started_stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let old = secret(&client).await;
    assert_eq!(secret(&client).await.reveal(), old.reveal(), "the secret is stable until rotated");
    let rotated = client.post("/v1/webhooks/secret/rotate").await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let new = Secret::parse(rotated.body["secret"].as_str().unwrap()).unwrap();
    assert_ne!(new.reveal(), old.reveal());
    assert_eq!(secret(&client).await.reveal(), new.reveal());

    let receiver = Receiver::start(vec![410]).await;
    receiver.secrets.lock().unwrap().extend([new, old]);
    let id = canceled_job(&client, &receiver.url, "gone").await;
    let seen = receiver.wait_for(1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.seen().len(), 1, "a 410 is not retried");
    assert_eq!(seen[0].verified_with, [0, 1], "signed with the new and the still-valid old secret");
    assert_eq!(seen[0].signature.matches("v1,").count(), 2);
    let record = job(&client, &id).await["webhook_delivery"].clone();
    assert_eq!((record["attempts"].as_u64(), record["abandoned"].as_u64()), (Some(1), Some(1)), "{record}");

    // Other tenants have their own secret.
    let other = Client::tenant(&stack, "globex").await;
    assert_ne!(secret(&other).await.reveal(), secret(&client).await.reveal());
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_urls_to_private_and_metadata_addresses_are_refused() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    for url in [
        "https://169.254.169.254/latest/meta-data",
        "https://10.0.0.1/hook",
        "https://[fd00::1]/hook",
        "https://192.168.1.1/",
        "https://192.0.2.10/hook",
        "https://[64:ff9b::a9fe:a9fe]/",
        "https://[::ffff:169.254.169.254]/",
    ] {
        let body = json!({"model": "kiln-demo", "prompt": "x", "webhook": {"url": url}});
        let answer = client.post_json("/v1/jobs", &body).await;
        assert_eq!(answer.status, 422, "{url}: {}", answer.body);
        assert_eq!(answer.error_field(), Some("webhook.url"), "{url}");
    }
    // Names are checked after resolution, by the sender (kiln-webhooks' guard tests cover
    // rebinding); here: a name that resolves to loopback is refused where loopback is not allowed.
    let sender = kiln_webhooks::WebhookSender::new(kiln_webhooks::SenderConfig::default());
    let attempt = sender
        .deliver(&kiln_webhooks::DeliveryRequest {
            url: "https://localhost/hook".into(),
            message_id: "msg_1".into(),
            body: Bytes::from_static(b"{}"),
            secrets: vec![Secret::generate()],
        })
        .await;
    assert_eq!(attempt.outcome, kiln_webhooks::Outcome::GiveUp, "{attempt:?}");
    assert_eq!(attempt.status, None, "no connection was made");
}

/// Accepts connections on 127.0.0.1 and never answers (nor closes them).
async fn tarpit() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    format!("http://{address}/hook")
}

/// Every message waiting on `queue_url` (received, so hidden for their visibility timeout).
async fn receive_all(stack: &LocalStack, queue_url: &str, expected: usize) -> Vec<aws_sdk_sqs::types::Message> {
    let mut messages = Vec::new();
    for _ in 0..20 {
        let received = stack
            .clients
            .sqs()
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        messages.extend(received.messages.unwrap_or_default());
        if messages.len() >= expected {
            break;
        }
    }
    messages
}

/// The `deliver-webhooks` handler on one batch of ten events, three of whose receivers accept
/// the connection and never answer: the batch is sent concurrently and answered well before
/// the invocation's deadline (one after another the three would take longer than the whole
/// invocation, and SQS would send all ten again); the seven fast ones are delivered once, and
/// only the three slow ones come back, later.
#[tokio::test(flavor = "multi_thread")]
async fn three_silent_receivers_do_not_hold_up_or_repeat_seven_fast_ones_in_one_batch() {
    use kiln_events::deliver_webhooks;
    let stack = stack().await; // no relays: this test is the trigger
    let client = Client::tenant(&stack, "acme").await;
    let fast = Receiver::start(vec![204]).await;
    let slow = tarpit().await;
    let mut slow_jobs = Vec::new();
    for n in 0..10 {
        let url = if n < 3 { &slow } else { &fast.url };
        let id = canceled_job(&client, url, &format!("batch {n}")).await;
        let job = stack.aws.job_store().get(&kiln_domain::JobId::parse(&id).unwrap()).await.unwrap().unwrap();
        let event = kiln_domain::JobEvent {
            id: format!("evt_{id}_completed_{}", job.revision),
            kind: kiln_domain::WebhookEvent::Completed,
            timestamp: job.finished_at.unwrap(),
            job,
            webhook: None,
        };
        stack.aws.webhook_queue().send(&event).await.unwrap();
        if n < 3 {
            slow_jobs.push(id);
        }
    }
    let queue = stack.resources.webhook_queue_url.clone();
    let messages = receive_all(&stack, &queue, 10).await;
    assert_eq!(messages.len(), 10);
    let mut event = aws_lambda_events::sqs::SqsEvent::default();
    event.records = messages.iter().map(kiln_local::relays::sqs_record).collect();

    // A 5 s invocation; each attempt may take 2 s (1 s to connect): three silent receivers
    // one after another would take 6 s.
    let config =
        deliver_webhooks::DeliveryConfig { timeout_secs: 2, connect_timeout_secs: 1, ..stack.delivery_config() };
    let deliveries = std::sync::Arc::new(deliver_webhooks::wire(&stack.aws, &config).unwrap());
    let invoked = std::time::Instant::now();
    let context = kiln_lambda::local_context(Duration::from_secs(5));
    let response = deliver_webhooks::handle(deliveries, kiln_lambda::LambdaEvent::new(event, context)).await.unwrap();
    let took = invoked.elapsed();
    assert!(took < Duration::from_millis(4_500), "answered {took:?} after the invocation began, at its deadline");

    // What the event source mapping does with the answer: delete every message not reported.
    let failed: Vec<&str> = response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
    assert_eq!(failed.len(), 3, "{response:?}");
    for message in &messages {
        if !failed.contains(&message.message_id().unwrap()) {
            stack
                .clients
                .sqs()
                .delete_message()
                .queue_url(&queue)
                .receipt_handle(message.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
    let seen = fast.seen();
    let mut ids: Vec<&str> = seen.iter().map(|r| r.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((seen.len(), ids.len()), (7, 7), "each fast event delivered once: {seen:?}");

    // The three come back after their retry delay (a second here), on their second receive.
    let again = receive_all(&stack, &queue, 3).await;
    let mut again_jobs: Vec<String> = again
        .iter()
        .map(|m| serde_json::from_str::<Value>(m.body().unwrap()).unwrap()["job"]["id"].as_str().unwrap().to_owned())
        .collect();
    again_jobs.sort();
    slow_jobs.sort();
    assert_eq!(again_jobs, slow_jobs, "only the silent receivers' events come back");
    for message in &again {
        let count = message
            .attributes()
            .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount));
        assert_eq!(count.map(String::as_str), Some("2"));
    }
    assert_eq!(fast.seen().len(), 7, "nothing delivered twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_caller_of_a_deduplicated_or_cached_job_gets_its_own_webhook() {
    let stack = started_stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let (first, second, third) =
        (Receiver::start(vec![200]).await, Receiver::start(vec![200]).await, Receiver::start(vec![200]).await);
    let body = |url: &str| {
        json!({"model": "kiln-demo", "prompt": "one job, three callers", "seed": 5, "width": 64, "height": 64,
            "steps": 1, "webhook": {"url": url, "events": ["completed"]}})
    };
    let created = client.post_json("/v1/jobs", &body(&first.url)).await;
    assert_eq!(created.status, 202, "{}", created.body);
    let joined = client.post_json("/v1/jobs", &body(&second.url)).await;
    assert_eq!((joined.status.as_u16(), joined.body["deduplicated"].as_bool()), (202, Some(true)), "{}", joined.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(joined.body["id"], id.as_str());

    let _runner = start_runner(&stack, &runner_options("webhook-callers"));
    for (name, receiver) in [("first", &first), ("second", &second)] {
        let seen = receiver.wait_for(1, Duration::from_secs(90)).await;
        assert_eq!(seen.len(), 1, "the {name} caller was not notified");
        assert_eq!(
            (seen[0].body["type"].as_str(), seen[0].body["job"]["id"].as_str()),
            (Some("completed"), Some(id.as_str()))
        );
        assert_eq!(seen[0].body["job"]["status"], "succeeded");
    }
    assert_ne!(first.seen()[0].id, second.seen()[0].id, "two callers, one webhook-id");

    // A caller answered from the cache is told at once too.
    let cached = client.post_json("/v1/jobs", &body(&third.url)).await;
    assert_eq!((cached.status.as_u16(), cached.body["cached"].as_bool()), (200, Some(true)), "{}", cached.body);
    let seen = third.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(
        (seen[0].body["type"].as_str(), seen[0].body["job"]["id"].as_str()),
        (Some("completed"), Some(id.as_str()))
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!((first.seen().len(), second.seen().len()), (1, 1), "an earlier caller was told twice");
}

/// Accepts connections on 127.0.0.1, never answers, and counts them.
async fn counting_tarpit() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket);
        }
    });
    (format!("http://{address}/hook"), accepted)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_never_answers_is_held_back_and_delays_no_other_tenant() {
    let stack = started_stack().await; // local delivery: 5 s timeout, circuit after 5 failures
    let (silent, connections) = counting_tarpit().await;
    let tenant_a = Client::tenant(&stack, "tarpit-owner").await;
    for n in 0..30 {
        canceled_job(&tenant_a, &silent, &format!("to a receiver that never answers {n}")).await;
    }
    let tenant_b = Client::tenant(&stack, "fast-owner").await;
    let fast = Receiver::start(vec![204]).await;
    let sent = std::time::Instant::now();
    for n in 0..5 {
        canceled_job(&tenant_b, &fast.url, &format!("to a fast receiver {n}")).await;
    }
    let seen = fast.wait_for(5, Duration::from_secs(60)).await;
    let took = sent.elapsed();
    assert_eq!(seen.len(), 5);
    let tried = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        took < Duration::from_secs(12),
        "tenant B's events waited {took:?} behind a receiver that never answers ({tried} connections to it)"
    );
    // A's events back off: a batch's worth of attempts opens the circuit, the rest are held.
    assert!(tried <= 15, "{tried} attempts at the silent receiver: its circuit did not hold its events back");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let later = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(later <= 15, "{later} attempts at the silent receiver while its circuit is open");
}

//! The fault suite in the build: the fault proxy does what each fault says, and a reduced chaos
//! run (about 100 jobs, 3 runners killed every few seconds, 5% of AWS requests faulted) breaks
//! no invariant. The full run is `cargo run -p kiln-tests --bin kiln-chaos` (RELIABILITY.md).

use aws_sdk_sqs::error::ProvideErrorMetadata;
use kiln_local::{FaultKind, FaultPlan, FaultProxy, Service};
use kiln_tests::{
    chaos::{ChaosOptions, run},
    moto_url,
};
use std::time::{Duration, Instant};

async fn sqs_through(proxy: &FaultProxy) -> aws_sdk_sqs::Client {
    let sdk = kiln_aws::load_sdk_config(Some(&proxy.url)).await;
    let config = aws_sdk_sqs::config::Builder::from(&sdk)
        .retry_config(aws_sdk_sqs::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

async fn waiting(direct: &aws_sdk_sqs::Client, queue: &str) -> usize {
    let received = direct.receive_message().queue_url(queue).max_number_of_messages(10).send().await.expect("receive");
    received.messages.unwrap_or_default().len()
}

/// Each fault, injected into every request: what the caller sees, and whether the call happened.
#[tokio::test]
async fn each_fault_does_what_it_says() {
    let direct = aws_sdk_sqs::Client::new(&kiln_aws::load_sdk_config(Some(&moto_url())).await);
    for kind in FaultKind::ALL {
        let plan = FaultPlan {
            rate: 1.0,
            kinds: vec![kind],
            latency: (Duration::from_millis(300), Duration::from_millis(300)),
            hang: Duration::from_millis(500),
        };
        let proxy = FaultProxy::start(&moto_url(), plan).await.expect("proxy");
        let queue = direct
            .create_queue()
            .queue_name(format!("{}-{}", kiln_tests::unique_prefix(), kind.as_str()))
            .send()
            .await
            .expect("queue")
            .queue_url
            .expect("url");
        let sqs = sqs_through(&proxy).await;
        sqs.get_queue_url().queue_name("nothing-yet").send().await.ok();
        assert_eq!(proxy.counts().total_faults(), 0, "{kind:?}: nothing is injected before start_faults");
        proxy.start_faults();
        let started = Instant::now();
        let sent = sqs.send_message().queue_url(&queue).message_body("hello").send().await;
        let took = started.elapsed();
        let arrived = waiting(&direct, &queue).await;
        match kind {
            FaultKind::ServerError | FaultKind::Unavailable | FaultKind::Throttle => {
                let err = sent.expect_err("an error answer");
                let code = err.code().unwrap_or_default().to_owned();
                let status = err.raw_response().map(|r| r.status().as_u16());
                let expected: &[&str] = match kind {
                    FaultKind::ServerError => &["InternalError"],
                    FaultKind::Unavailable => &["ServiceUnavailable"],
                    _ => &["ThrottlingException", "RequestThrottled"],
                };
                assert!(expected.contains(&code.as_str()), "{kind:?}: code {code}");
                let expected_status = match kind {
                    FaultKind::ServerError => 500,
                    FaultKind::Unavailable => 503,
                    _ => 400,
                };
                assert_eq!(status, Some(expected_status), "{kind:?}");
                assert_eq!(arrived, 0, "{kind:?}: the request was not carried out");
            }
            FaultKind::Reset | FaultKind::Hang => {
                let err = sent.expect_err("a dropped connection");
                assert!(err.raw_response().is_none(), "{kind:?}: no answer at all: {err:?}");
                assert_eq!(arrived, 0, "{kind:?}: the request was not carried out");
                if kind == FaultKind::Hang {
                    assert!(took >= Duration::from_millis(500), "held for the hang: {took:?}");
                }
            }
            FaultKind::Latency => {
                sent.expect("a slow success");
                assert!(took >= Duration::from_millis(300), "delayed: {took:?}");
                assert_eq!(arrived, 1);
            }
            FaultKind::LostResponse => {
                let err = sent.expect_err("the caller sees a failure");
                assert!(err.raw_response().is_none(), "no answer: {err:?}");
                assert_eq!(arrived, 1, "but the message was sent");
            }
        }
        let counts = proxy.counts();
        assert_eq!(counts.faults_of(kind), 1, "{kind:?} counted: {counts:?}");
    }
}

/// Throttling and server errors in the shape each service's SDK reads (DynamoDB and S3 here;
/// SQS above).
#[tokio::test]
async fn dynamodb_and_s3_read_the_injected_errors_as_their_own() {
    let plan = FaultPlan { kinds: vec![FaultKind::Throttle], ..FaultPlan::every_kind(1.0) };
    let proxy = FaultProxy::start(&moto_url(), plan).await.expect("proxy");
    proxy.start_faults();
    let sdk = kiln_aws::load_sdk_config(Some(&proxy.url)).await;
    let no_retries = aws_sdk_sqs::config::retry::RetryConfig::disabled();
    let dynamodb = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk).retry_config(no_retries.clone()).build(),
    );
    let err = dynamodb.list_tables().send().await.expect_err("throttled");
    let code = err.code().unwrap_or_default().to_owned();
    assert!(
        ["ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"]
            .contains(&code.as_str()),
        "{code}"
    );
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true).retry_config(no_retries).build(),
    );
    let err = s3.list_buckets().send().await.expect_err("slowed down");
    assert_eq!(err.code(), Some("SlowDown"));
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(503));
}

/// Multi-threaded: the runners the run starts talk to a proxy served by this runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_jobs_under_faults_and_runner_kills_lose_nothing() {
    let report = run(&moto_url(), ChaosOptions::reduced()).await.expect("the chaos run");
    println!("{report}");
    let broken: Vec<String> = report.findings.violations().iter().map(|f| format!("{} {}", f.name, f.count)).collect();
    assert!(broken.is_empty(), "invariants broken: {broken:?}\n{report}");
    assert!(report.outcomes.accepted.len() >= 80, "most jobs were accepted: {}", report.outcomes.accepted.len());
    assert!(!report.outcomes.uploads.is_empty(), "some jobs came through the inbox");
    assert!(report.kills >= 3, "runners were killed: {}", report.kills);
    for kind in FaultKind::ALL {
        assert!(report.faults.faults_of(kind) > 0, "{kind:?} was injected:\n{}", report.faults);
    }
}

/// A stack behind a fault proxy that injects nothing at random: tests script one fault at a time.
async fn scripted_stack() -> kiln_local::LocalStack {
    let options = kiln_local::StackOptions {
        prefix: kiln_tests::unique_prefix(),
        faults: Some(FaultPlan::every_kind(0.0)),
        ..kiln_local::StackOptions::default()
    };
    let stack = kiln_local::LocalStack::start(&moto_url(), options).await.expect("stack");
    stack.publish_models(&kiln_local::workspace_root().join("gpu-runner/models")).await.expect("models");
    stack
}

/// Found by the chaos run: the submit's transaction landed, its answer was lost, the SDK's retry
/// failed the transaction's conditions (the job's own cache pointer), and the API answered with
/// the job as a duplicate of itself, never sending its queue message: queued for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_submit_whose_write_answer_is_lost_is_queued_once() {
    let stack = scripted_stack().await;
    let client = kiln_tests::Client::tenant(&stack, "lost").await;
    let proxy = stack.faults().expect("proxy");
    proxy.inject_next(Service::DynamoDb, "TransactWriteItems", FaultKind::LostResponse);
    let answer =
        client.post_json("/v1/jobs", &serde_json::json!({"model": "kiln-demo", "prompt": "lost answer"})).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.body["deduplicated"], false, "a new job, not a duplicate of itself: {}", answer.body);
    assert_eq!(proxy.counts().faults_of(FaultKind::LostResponse), 1);
    assert_eq!(kiln_tests::messages_on(&stack, &stack.resources.job_queue_url).await, 1, "its message was sent");
}

/// A conditional job write whose answer is lost is still reported as written (it was), not as a
/// race lost to another writer (the runner would have dropped a job it had just finished).
#[tokio::test(flavor = "multi_thread")]
async fn a_job_update_whose_answer_is_lost_reports_written() {
    let stack = scripted_stack().await;
    let client = kiln_tests::Client::tenant(&stack, "lost-update").await;
    let id =
        client.post_json("/v1/jobs", &serde_json::json!({"model": "kiln-demo", "prompt": "update"})).await.job_id();
    let store = stack.aws.job_store();
    let mut job = store.get(&kiln_domain::JobId::parse(&id).unwrap()).await.unwrap().expect("job");
    job.revision += 1;
    job.progress = 0.5;
    let proxy = stack.faults().expect("proxy");
    proxy.inject_next(Service::DynamoDb, "PutItem", FaultKind::LostResponse);
    assert!(store.update(&job).await.expect("update"), "the write landed");
    assert_eq!(proxy.counts().faults_of(FaultKind::LostResponse), 1);
    let stored = store.get(&job.id).await.unwrap().expect("job");
    assert_eq!((stored.revision, stored.progress), (job.revision, 0.5));
}

/// Found by the chaos run: moto 5.2.5 undid a failed transaction by swapping in a copy of the
/// table, stream included, so stream readers stopped seeing writes (no webhook, no outbox) and
/// concurrent writes were undone. kiln's moto launcher (functions/local/moto_server.py) fixes it.
#[tokio::test]
async fn a_failed_transaction_leaves_the_tables_stream_flowing() {
    use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
    let stack = kiln_tests::stack().await;
    let table = stack.resources.jobs_table.clone();
    let dynamodb = stack.direct.dynamodb();
    let kiln_tests::StreamStart { streams, mut iterator, .. } = kiln_tests::jobs_stream_from_start(&stack).await;
    let id = |v: &str| AttributeValue::S(v.to_owned());
    dynamodb.put_item().table_name(&table).item("id", id("first")).send().await.unwrap();
    let (keys, next) = stream_keys(&streams, &iterator).await;
    assert_eq!(keys, ["first"]);
    iterator = next;
    let failing = Put::builder()
        .table_name(&table)
        .item("id", id("never"))
        .condition_expression("attribute_exists(id)")
        .build()
        .unwrap();
    let other = Put::builder().table_name(&table).item("id", id("rolled-back")).build().unwrap();
    let changed =
        Put::builder().table_name(&table).item("id", id("first")).item("note", id("changed")).build().unwrap();
    let transaction = dynamodb
        .transact_write_items()
        .transact_items(TransactWriteItem::builder().put(other).build())
        .transact_items(TransactWriteItem::builder().put(changed).build())
        .transact_items(TransactWriteItem::builder().put(failing).build())
        .send()
        .await;
    assert!(transaction.is_err(), "the condition fails");
    dynamodb.put_item().table_name(&table).item("id", id("after")).send().await.unwrap();
    let (keys, _) = stream_keys(&streams, &iterator).await;
    assert_eq!(keys, ["after"], "the write after the failed transaction, and nothing of it");
    // And the table holds nothing of it either: the new item is gone, the changed one as it was.
    let get =
        |key: &'static str| dynamodb.get_item().table_name(&table).key("id", id(key)).consistent_read(true).send();
    assert_eq!(get("rolled-back").await.unwrap().item, None);
    let first = get("first").await.unwrap().item.expect("the first item");
    assert_eq!(first.get("note"), None, "the transaction's change to an existing item is undone: {first:?}");
}

/// Found by a CI chaos run (a job's `completed` webhook never sent): a stream reader could read
/// a failing transaction's records before moto cut them back, so its iterator passed sequence
/// numbers that the next writes then reused, and those writes' records were never read. Here
/// transactions that fail at their last item race plain writes and a reader: the reader must see
/// every plain write and nothing of a failed transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_stream_reader_racing_failed_transactions_misses_no_write() {
    use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Put, TransactWriteItem};
    let stack = kiln_tests::stack().await;
    let table = stack.resources.jobs_table.clone();
    let dynamodb = stack.direct.dynamodb().clone();
    let kiln_tests::StreamStart { streams, iterator, .. } = kiln_tests::jobs_stream_from_start(&stack).await;
    let id = |v: String| AttributeValue::S(v);
    let racing = Duration::from_secs(4);
    let failing = {
        let (dynamodb, table) = (dynamodb.clone(), table.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut round = 0;
            while started.elapsed() < racing {
                let mut transaction = dynamodb.transact_write_items();
                for n in 0..40 {
                    let put = Put::builder().table_name(&table).item("id", id(format!("undone-{round}-{n}")));
                    transaction =
                        transaction.transact_items(TransactWriteItem::builder().put(put.build().unwrap()).build());
                }
                let check = ConditionCheck::builder()
                    .table_name(&table)
                    .key("id", id("nowhere".into()))
                    .condition_expression("attribute_exists(id)")
                    .build()
                    .unwrap();
                let result = transaction
                    .transact_items(TransactWriteItem::builder().condition_check(check).build())
                    .send()
                    .await;
                assert!(result.is_err(), "the condition check fails");
                round += 1;
            }
            round
        })
    };
    let writing = {
        let (dynamodb, table) = (dynamodb.clone(), table.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut written = 0;
            while started.elapsed() < racing {
                dynamodb.put_item().table_name(&table).item("id", id(format!("kept-{written}"))).send().await.unwrap();
                written += 1;
            }
            written
        })
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut iterator = iterator;
    let read_until = Instant::now() + racing + Duration::from_secs(3);
    while Instant::now() < read_until {
        let (keys, next) = stream_keys(&streams, &iterator).await;
        seen.extend(keys);
        iterator = next;
    }
    let (rounds, written) = (failing.await.unwrap(), writing.await.unwrap());
    let undone: Vec<&String> = seen.iter().filter(|k| k.starts_with("undone-")).take(5).collect();
    let missed: Vec<String> = (0..written).map(|n| format!("kept-{n}")).filter(|k| !seen.contains(k)).collect();
    println!(
        "{rounds} failed transactions, {written} writes; {} undone records read, {} writes missed",
        undone.len(),
        missed.len()
    );
    assert!(rounds > 0 && written > 0);
    assert!(undone.is_empty(), "records of failed transactions were read: {undone:?}");
    assert!(missed.is_empty(), "writes whose records were never read: {missed:?}");
}

/// The `id` keys of the records at `iterator`, and the next iterator.
async fn stream_keys(streams: &aws_sdk_dynamodbstreams::Client, iterator: &str) -> (Vec<String>, String) {
    let page = streams.get_records().shard_iterator(iterator).send().await.expect("records");
    let keys = page
        .records
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.dynamodb?.keys?.get("id")?.as_s().ok().cloned())
        .collect();
    (keys, page.next_shard_iterator.expect("next iterator"))
}

/// A burst in small (300 jobs from 16 clients, every 4th the limited tenant's; the full one is
/// `kiln-burst`): nothing answered
/// 2xx is lost or left unfinished, no 5xx, and only the tenant past its limit hears 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_loses_nothing_and_refuses_only_past_the_limit() {
    let report =
        kiln_tests::burst::run(&moto_url(), kiln_tests::burst::BurstOptions::reduced()).await.expect("the burst");
    println!("{report}");
    assert!(report.violations().is_empty(), "{:?}\n{report}", report.violations());
    assert!(report.limited_429 > 0, "the limited tenant was refused past its limit:\n{report}");
    assert!(report.limited_accepted > 0, "and served up to it:\n{report}");
    let answered: u64 = report.statuses.iter().filter(|((route, _), _)| route == "POST /v1/jobs").map(|(_, n)| n).sum();
    assert_eq!(answered, 300, "every submit was answered:\n{report}");
    assert_eq!(report.accepted as u64 + report.limited_429, 300, "each 2xx or (the limited tenant) 429:\n{report}");
}

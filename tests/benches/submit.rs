//! Submit latency against moto, next to the bare AWS calls it is made of.
//!
//!     cargo bench -p kiln-tests --bench submit            # 1000 requests of each
//!     cargo bench -p kiln-tests --bench submit -- 200     # fewer
//!
//! Prints, for N sequential operations: median and p99 latency, and AWS calls per operation.
//! "submit" is `POST /v1/jobs` through the local HTTP server into the same handler Lambda
//! runs (auth, validation, cache lookup, the tenant's quota count and rate counter,
//! transactional write, SQS send), each with a new
//! prompt so every one creates a job. "bare put" and "bare send" are single DynamoDB PutItem
//! and SQS SendMessage calls of the same size on the same moto server. moto is slow, so the
//! absolute times say little; the ratio says what our code adds.

use aws_sdk_dynamodb::types::AttributeValue;
use chrono::Utc;
use kiln_aws::{AwsCallCounters, AwsClients, provision::provision};
use kiln_domain::JobId;
use kiln_lambda::FunctionConfig;
use kiln_local::{LocalStack, StackOptions, workspace_root};
use kiln_tests::{moto_url, unique_prefix};
use std::time::{Duration, Instant};

struct Stats {
    name: &'static str,
    samples: Vec<Duration>,
    calls: f64,
}

impl Stats {
    fn quantile(&self, q: f64) -> f64 {
        let mut sorted = self.samples.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted[index].as_secs_f64() * 1000.0
    }
}

fn total_calls(counters: &AwsCallCounters) -> u64 {
    counters.dynamodb.get() + counters.sqs.get() + counters.s3.get()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let moto = moto_url();
    let counters = AwsCallCounters::default();
    let clients = AwsClients::connect_counting(Some(&moto), &counters).await;
    let resources = provision(&clients, &unique_prefix(), Some(&moto)).await?;
    // Every submit makes a job and no runner drains them: the quota must admit them all (its
    // count then reads every queued job, as it would with that many waiting).
    let mut config = FunctionConfig::for_resources(resources.clone());
    config.default_max_active_jobs = u32::MAX;
    config.default_jobs_per_minute = u32::MAX;
    let stack = LocalStack::serve(clients.clone(), resources.clone(), config, StackOptions::default()).await?;
    stack.publish_models(&workspace_root().join("gpu-runner/models")).await?;
    let key = stack.create_tenant("bench", "Bench").await?;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/jobs", stack.api_url);

    let submit = |i: usize| {
        let body = serde_json::json!({"model": "kiln-demo", "prompt": format!("a lighthouse at dusk, variation {i}"), "seed": i});
        http.post(&url).bearer_auth(key.expose()).json(&body).send()
    };
    // Warm up: connections, the auth and model caches, moto's tables.
    let mut sample_job = String::new();
    for i in 0..20 {
        sample_job = submit(n + i).await?.text().await?;
    }
    let sample_message = serde_json::json!({"type": "render_job", "v": 1, "job_id": JobId::generate(Utc::now()), "tenant_id": "bench", "model": "kiln-demo", "model_version": "1.0.0"}).to_string();

    let mut results = Vec::new();

    let before = total_calls(&counters);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let response = submit(i).await?;
        let status = response.status();
        let _ = response.bytes().await?;
        samples.push(started.elapsed());
        anyhow::ensure!(status.as_u16() == 202, "submit {i} answered {status}");
    }
    results.push(Stats {
        name: "submit (POST /v1/jobs)",
        samples,
        calls: (total_calls(&counters) - before) as f64 / n as f64,
    });

    let before = total_calls(&counters);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        clients
            .dynamodb()
            .put_item()
            .table_name(&resources.jobs_table)
            .item("id", AttributeValue::S(JobId::generate(Utc::now()).to_string()))
            .item("tenant_id", AttributeValue::S("bench".into()))
            .item("doc", AttributeValue::S(sample_job.clone()))
            .send()
            .await?;
        samples.push(started.elapsed());
    }
    results.push(Stats {
        name: "bare DynamoDB PutItem",
        samples,
        calls: (total_calls(&counters) - before) as f64 / n as f64,
    });

    let before = total_calls(&counters);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        clients.sqs().send_message().queue_url(&resources.job_queue_url).message_body(&sample_message).send().await?;
        samples.push(started.elapsed());
    }
    results.push(Stats {
        name: "bare SQS SendMessage",
        samples,
        calls: (total_calls(&counters) - before) as f64 / n as f64,
    });

    println!("\n{n} sequential operations against moto at {moto}\n");
    println!("| operation | median ms | p99 ms | AWS calls/op |");
    println!("|---|---:|---:|---:|");
    for stats in &results {
        println!("| {} | {:.2} | {:.2} | {:.2} |", stats.name, stats.quantile(0.5), stats.quantile(0.99), stats.calls);
    }
    let bare = results[1].quantile(0.5) + results[2].quantile(0.5);
    println!(
        "\nsubmit median / (bare put median + bare send median) = {:.2} / {:.2} = {:.2}",
        results[0].quantile(0.5),
        bare,
        results[0].quantile(0.5) / bare
    );
    stack.stop().await;
    Ok(())
}

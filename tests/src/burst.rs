//! The burst: many clients at once submitting small jobs and reading them back through the local
//! API while runners drain the queue; then every job answered 2xx is looked up. Latencies of each
//! route are printed beside those of bare calls to the same backend (moto) at the same
//! concurrency, so what the figures say is the platform's overhead, not moto's speed.
//!
//! `tests/chaos.rs` runs it small in the suite; `cargo run -p kiln-tests --bin kiln-burst` runs it
//! at any size (RELIABILITY.md).

use crate::{Client, unique_prefix, workspace_root};
use kiln_app::{Tenant, limits::TenantLimits};
use kiln_domain::TenantId;
use kiln_local::{LocalStack, StackOptions};
use serde_json::json;
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

#[derive(Debug, Clone)]
pub struct BurstOptions {
    pub jobs: usize,
    /// Clients sending at once.
    pub clients: usize,
    /// Tenants sharing the jobs (limits far above the burst).
    pub tenants: usize,
    /// One more tenant gets every `limited_every`th job with this many jobs a minute: it alone
    /// should see 429s.
    pub limited_per_minute: u32,
    pub limited_every: usize,
    pub runners: usize,
    /// How long the runners may take to drain once the last job was submitted.
    pub deadline: Duration,
}

impl BurstOptions {
    pub fn reduced() -> Self {
        // Every 4th job is the limited tenant's: past 5 a minute on any machine that submits more
        // than one job every 3 s.
        Self {
            jobs: 300,
            clients: 16,
            tenants: 3,
            limited_per_minute: 5,
            limited_every: 4,
            runners: 2,
            deadline: Duration::from_secs(240),
        }
    }
}

/// Latencies of one route or backend call, in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Latencies(Vec<f64>);

impl Latencies {
    fn push(&mut self, took: Duration) {
        self.0.push(took.as_secs_f64() * 1000.0);
    }

    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// The `q` quantile (0–1), nearest rank.
    pub fn quantile(&self, q: f64) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            return 0.0;
        }
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }
}

/// What the burst measured and found.
#[derive(Debug, Default)]
pub struct BurstReport {
    pub options: Option<BurstOptions>,
    /// Per route: latencies of every answer.
    pub routes: BTreeMap<String, Latencies>,
    /// Per bare backend call at the same concurrency.
    pub bare: BTreeMap<String, Latencies>,
    /// (route, status) → answers.
    pub statuses: BTreeMap<(String, u16), u64>,
    pub accepted: usize,
    /// Jobs answered 2xx that have no record.
    pub lost: Vec<String>,
    /// Jobs answered 2xx still queued or running at the deadline.
    pub not_ended: Vec<String>,
    /// 429s of tenants whose limits are far above the burst.
    pub unlimited_429: u64,
    /// The limited tenant: accepted, refused with 429, and how many it could have had.
    pub limited_accepted: u64,
    pub limited_429: u64,
    pub limited_allowed: u64,
    pub server_errors: u64,
    pub submit_secs: f64,
    pub drain_secs: f64,
}

impl BurstReport {
    /// What broke the burst's promises (empty when none).
    pub fn violations(&self) -> Vec<String> {
        let mut broken = Vec::new();
        if !self.lost.is_empty() {
            broken.push(format!("{} jobs answered 2xx are missing", self.lost.len()));
        }
        if !self.not_ended.is_empty() {
            broken.push(format!("{} jobs did not end by the deadline", self.not_ended.len()));
        }
        if self.unlimited_429 > 0 {
            broken.push(format!("{} 429s below the configured limits", self.unlimited_429));
        }
        if self.limited_accepted > self.limited_allowed {
            broken.push(format!(
                "the limited tenant got {} jobs, past its {}",
                self.limited_accepted, self.limited_allowed
            ));
        }
        if self.server_errors > 0 {
            broken.push(format!("{} answers were 5xx", self.server_errors));
        }
        broken
    }
}

impl std::fmt::Display for BurstReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(o) = &self.options {
            writeln!(
                f,
                "burst: {} jobs from {} clients at once, {} tenants (+1 limited to {}/min, every {}th job), {} runners",
                o.jobs, o.clients, o.tenants, o.limited_per_minute, o.limited_every, o.runners
            )?;
        }
        writeln!(
            f,
            "submitting took {:.1} s ({:.1} submits/s), draining {:.1} s more; {} accepted; lost {}, not ended {}, 5xx {}, 429 below the limits {}; limited tenant: {} accepted of {} allowed, {} refused with 429\n",
            self.submit_secs,
            self.accepted as f64 / self.submit_secs.max(0.001),
            self.drain_secs,
            self.accepted,
            self.lost.len(),
            self.not_ended.len(),
            self.server_errors,
            self.unlimited_429,
            self.limited_accepted,
            self.limited_allowed,
            self.limited_429
        )?;
        writeln!(f, "| route | answers | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|")?;
        for (route, latencies) in &self.routes {
            writeln!(
                f,
                "| {route} | {} | {:.1} | {:.1} | {:.1} |",
                latencies.count(),
                latencies.quantile(0.5),
                latencies.quantile(0.99),
                latencies.quantile(1.0)
            )?;
        }
        writeln!(
            f,
            "\n| bare backend call, same concurrency | calls | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|"
        )?;
        for (call, latencies) in &self.bare {
            writeln!(
                f,
                "| {call} | {} | {:.1} | {:.1} | {:.1} |",
                latencies.count(),
                latencies.quantile(0.5),
                latencies.quantile(0.99),
                latencies.quantile(1.0)
            )?;
        }
        writeln!(f, "\n| route | status | answers |\n|---|---:|---:|")?;
        for ((route, status), n) in &self.statuses {
            writeln!(f, "| {route} | {status} | {n} |")?;
        }
        Ok(())
    }
}

/// What the clients share while they send.
#[derive(Default)]
struct Tally {
    report: BurstReport,
    /// Accepted job ids per tenant index (the last index is the limited tenant).
    accepted: Vec<(usize, String)>,
}

async fn timed(
    tally: &Mutex<Tally>,
    route: &str,
    request: reqwest::RequestBuilder,
) -> Option<(u16, serde_json::Value)> {
    let started = Instant::now();
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    let body = response.json::<serde_json::Value>().await.unwrap_or_default();
    let took = started.elapsed();
    let mut tally = tally.lock().unwrap();
    tally.report.routes.entry(route.to_owned()).or_default().push(took);
    *tally.report.statuses.entry((route.to_owned(), status)).or_default() += 1;
    if status >= 500 {
        tally.report.server_errors += 1;
    }
    Some((status, body))
}

/// Runs the burst on `moto_url`.
pub async fn run(moto_url: &str, options: BurstOptions) -> anyhow::Result<BurstReport> {
    let mut stack =
        LocalStack::start(moto_url, StackOptions { prefix: unique_prefix(), ..StackOptions::default() }).await?;
    stack.start_relays().await?;
    stack.publish_models(&workspace_root().join("gpu-runner/models")).await?;
    let mut clients = Vec::new();
    for index in 0..=options.tenants {
        let limited = index == options.tenants;
        let limits = if limited {
            TenantLimits {
                max_active_jobs: 1_000_000,
                jobs_per_minute: options.limited_per_minute,
                units_per_day: u64::MAX,
            }
        } else {
            TenantLimits { max_active_jobs: 1_000_000, jobs_per_minute: 1_000_000, units_per_day: u64::MAX }
        };
        let id = if limited { "burst-limited".to_owned() } else { format!("burst-{index}") };
        let tenant = Tenant {
            id: TenantId::parse(&id)?,
            name: id.clone(),
            disabled: false,
            limits: Some(limits),
            share_weight: None,
            max_priority: None,
        };
        stack.aws.tenants().create_tenant(&tenant).await?;
        let key = kiln_app::ApiKey::generate();
        stack.aws.tenants().add_key(&tenant.id, &key.stored(chrono::Utc::now())).await?;
        clients.push(Client::new(&stack.api_url, Some(key.expose())));
    }
    let mut runner = crate::runner_options("burst");
    runner.poll_wait_secs = 1;
    let runners = crate::start_runners(&stack, options.runners, |n| crate::chaos::with_log(&runner, n))?;

    let tally = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(Mutex::new(0usize));
    let clients = Arc::new(clients);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..options.clients {
        let (tally, next, clients, options) = (tally.clone(), next.clone(), clients.clone(), options.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let index = {
                    let mut next = next.lock().unwrap();
                    if *next >= options.jobs {
                        return;
                    }
                    *next += 1;
                    *next - 1
                };
                let every = options.limited_every.max(2);
                let tenant = if index % every == every - 1 { options.tenants } else { index % options.tenants };
                let client = &clients[tenant];
                let body = json!({"model": "kiln-demo", "prompt": format!("burst {index}"), "seed": index,
                    "width": 64, "height": 64, "steps": 1});
                let submit = client.request(reqwest::Method::POST, "/v1/jobs").json(&body);
                let Some((status, answer)) = timed(&tally, "POST /v1/jobs", submit).await else { continue };
                {
                    let mut tally = tally.lock().unwrap();
                    let limited = tenant == options.tenants;
                    match (status, limited) {
                        (429, true) => tally.report.limited_429 += 1,
                        (429, false) => tally.report.unlimited_429 += 1,
                        (200..=299, true) => tally.report.limited_accepted += 1,
                        _ => {}
                    }
                    if (200..300).contains(&status) {
                        tally.accepted.push((tenant, answer["id"].as_str().unwrap_or_default().to_owned()));
                    }
                }
                if (200..300).contains(&status) {
                    let id = answer["id"].as_str().unwrap_or_default();
                    let read = client.request(reqwest::Method::GET, &format!("/v1/jobs/{id}"));
                    timed(&tally, "GET /v1/jobs/{id}", read).await;
                }
                if index % 10 == 0 {
                    let list = client.request(reqwest::Method::GET, "/v1/jobs?limit=10");
                    timed(&tally, "GET /v1/jobs?limit=10", list).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let submit_secs = started.elapsed().as_secs_f64();
    let accepted = std::mem::take(&mut tally.lock().unwrap().accepted);
    let (lost, not_ended) = drain(&stack, &accepted, options.deadline).await?;
    let drain_secs = started.elapsed().as_secs_f64() - submit_secs;
    drop(runners);
    let bare = bare_calls(&stack, options.clients, 1000.min(options.jobs * 2)).await?;
    let mut report = std::mem::take(&mut tally.lock().unwrap().report);
    // Fixed one-minute windows: a burst of `submit_secs` spans at most this many.
    let windows = (submit_secs / 60.0).ceil() as u64 + 1;
    report.limited_allowed = u64::from(options.limited_per_minute) * windows;
    report.accepted = accepted.len();
    report.lost = lost;
    report.not_ended = not_ended;
    report.bare = bare;
    report.submit_secs = submit_secs;
    report.drain_secs = drain_secs;
    report.options = Some(options);
    stack.stop().await;
    Ok(report)
}

/// Waits until every accepted job has ended (reading the table straight from moto, one scan a
/// round); returns the ids missing and those not ended at the deadline.
async fn drain(
    stack: &LocalStack,
    accepted: &[(usize, String)],
    limit: Duration,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let deadline = Instant::now() + limit;
    loop {
        let statuses = job_statuses(stack).await?;
        let lost: Vec<String> =
            accepted.iter().filter(|(_, id)| !statuses.contains_key(id)).map(|(_, id)| id.clone()).collect();
        let open: Vec<String> = accepted
            .iter()
            .filter(|(_, id)| statuses.get(id).is_some_and(|s| s == "queued" || s == "running"))
            .map(|(_, id)| id.clone())
            .collect();
        if open.is_empty() || Instant::now() > deadline {
            return Ok((lost, open));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Every job's status, by id.
async fn job_statuses(stack: &LocalStack) -> anyhow::Result<BTreeMap<String, String>> {
    let mut statuses = BTreeMap::new();
    let mut pages = stack
        .direct
        .dynamodb()
        .scan()
        .table_name(&stack.resources.jobs_table)
        .projection_expression("id, #s")
        .expression_attribute_names("#s", "status")
        .into_paginator()
        .items()
        .send();
    while let Some(item) = pages.next().await {
        let item = item?;
        let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
        statuses.insert(text("id"), text("status"));
    }
    Ok(statuses)
}

/// The backend's own latency at the API's concurrency: `calls` each of a DynamoDB read, a
/// conditional write and an SQS send, from `concurrency` tasks.
async fn bare_calls(
    stack: &LocalStack,
    concurrency: usize,
    calls: usize,
) -> anyhow::Result<BTreeMap<String, Latencies>> {
    use aws_sdk_dynamodb::types::AttributeValue;
    let queue = stack.direct.sqs().create_queue().queue_name(format!("{}-bare", unique_prefix())).send().await?;
    let queue = queue.queue_url.unwrap_or_default();
    let results: Arc<Mutex<BTreeMap<String, Latencies>>> = Arc::default();
    let next = Arc::new(Mutex::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (results, next, direct, resources, queue) =
            (results.clone(), next.clone(), stack.direct.clone(), stack.resources.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let index = {
                    let mut next = next.lock().unwrap();
                    *next += 1;
                    *next - 1
                };
                if index >= calls {
                    return;
                }
                let key = AttributeValue::S(format!("bare-{index}"));
                let started = Instant::now();
                let put = direct
                    .dynamodb()
                    .put_item()
                    .table_name(&resources.requests_table)
                    .item("pk", key.clone())
                    .condition_expression("attribute_not_exists(pk)")
                    .send()
                    .await;
                let put_took = started.elapsed();
                let started = Instant::now();
                let get = direct
                    .dynamodb()
                    .get_item()
                    .table_name(&resources.requests_table)
                    .key("pk", key)
                    .consistent_read(true)
                    .send()
                    .await;
                let get_took = started.elapsed();
                let started = Instant::now();
                let send = direct.sqs().send_message().queue_url(&queue).message_body("bare").send().await;
                let send_took = started.elapsed();
                let mut results = results.lock().unwrap();
                for (name, ok, took) in [
                    ("DynamoDB PutItem (conditional)", put.is_ok(), put_took),
                    ("DynamoDB GetItem", get.is_ok(), get_took),
                    ("SQS SendMessage", send.is_ok(), send_took),
                ] {
                    if ok {
                        results.entry(name.to_owned()).or_default().push(took);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let results = std::mem::take(&mut *results.lock().unwrap());
    Ok(results)
}

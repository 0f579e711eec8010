//! The chaos run: many jobs of every kind through the whole local stack while runners are killed
//! with SIGKILL and a proxy injects faults into the AWS calls; then an invariant checker reads
//! DynamoDB, S3, the queues and the webhook receiver's log and counts what went wrong.
//!
//! `tests/chaos.rs` runs it small in the suite; `cargo run -p kiln-tests --bin kiln-chaos` runs it
//! at any size (RELIABILITY.md has the commands and the figures).

use crate::{Client, check::Checker, receiver::Receiver, runner_options, unique_prefix};
use kiln_local::{FaultPlan, LocalStack, RunnerOptions, RunnerProcess, StackOptions, workspace_root};
use kiln_webhooks::Secret;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How big and how hostile a chaos run is.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Jobs the clients ask for (API submits, repeats and inbox uploads together).
    pub jobs: usize,
    /// Fraction of AWS requests the proxy faults.
    pub fault_rate: f64,
    /// Runner processes.
    pub runners: usize,
    /// A random runner is killed (SIGKILL) and restarted after a pause drawn from this range.
    pub kill_every: (Duration, Duration),
    /// Clients submitting at once.
    pub clients: usize,
    /// How long the jobs may take to end once the last one was submitted.
    pub deadline: Duration,
    /// Seed of the job mix (the faults and kills are not reproducible: they race).
    pub seed: u64,
}

impl ChaosOptions {
    /// The suite's run: about a hundred jobs in a couple of minutes.
    pub fn reduced() -> Self {
        Self {
            jobs: 100,
            fault_rate: 0.05,
            runners: 3,
            kill_every: (Duration::from_secs(2), Duration::from_secs(6)),
            clients: 6,
            deadline: Duration::from_secs(240),
            seed: 15,
        }
    }
}

/// How a planned job reaches the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/jobs`.
    Api,
    /// The same body as an earlier job of the tenant (served by dedup or the cache).
    Repeat,
    /// A spec uploaded to the S3 inbox through a presigned link.
    Inbox,
}

/// One job of the mix.
#[derive(Debug, Clone)]
pub struct PlannedJob {
    pub index: usize,
    pub tenant: usize,
    pub route: Route,
    pub body: Value,
    pub idempotency_key: Option<String>,
    /// Cancel this long after the submit was answered.
    pub cancel_after: Option<Duration>,
}

/// The job mix: mostly small jobs in every format across two tenants; some with webhooks, some
/// with idempotency keys (each sent twice), some canceled, some repeats, some via the inbox.
pub fn plan(options: &ChaosOptions, webhook_url: &str) -> Vec<PlannedJob> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut planned: Vec<PlannedJob> = Vec::with_capacity(options.jobs);
    for index in 0..options.jobs {
        let tenant = index % 2;
        let roll: f64 = rng.random();
        let earlier: Vec<&PlannedJob> = planned
            .iter()
            .rev()
            .take(40)
            .filter(|p| p.tenant == tenant && p.route == Route::Api && p.cancel_after.is_none())
            .collect();
        if roll < 0.10 && !earlier.is_empty() {
            let original = earlier.choose(&mut rng).expect("not empty");
            planned.push(PlannedJob {
                index,
                tenant,
                route: Route::Repeat,
                body: original.body.clone(),
                idempotency_key: None,
                cancel_after: None,
            });
            continue;
        }
        let format = ["png", "gif", "mp4", "webm"][index % 4];
        let canceled = (0.10..0.20).contains(&roll);
        let side = 8 * rng.random_range(8..=if canceled { 48 } else { 16 });
        let mut body = json!({
            "model": "kiln-demo",
            "prompt": format!("chaos job {index}"),
            "seed": rng.random_range(0..1_000_000),
            "width": side, "height": side,
            "steps": rng.random_range(1..=if canceled { 40 } else { 4 }),
            "format": format,
        });
        if format != "png" {
            body["num_frames"] = json!(rng.random_range(2..=if canceled { 16 } else { 6 }));
        }
        let route = if (0.20..0.30).contains(&roll) { Route::Inbox } else { Route::Api };
        if route == Route::Api && rng.random_bool(0.25) {
            body["webhook"] = json!({"url": webhook_url, "events": ["started", "progress", "completed"]});
        }
        planned.push(PlannedJob {
            index,
            tenant,
            route,
            body,
            idempotency_key: (route == Route::Api && rng.random_bool(0.2))
                .then(|| format!("chaos-{}-{index}", options.seed)),
            cancel_after: (canceled && route == Route::Api).then(|| Duration::from_millis(rng.random_range(0..1500))),
        });
    }
    planned
}

/// What the clients were told: every job answered 2xx, each upload stored, the other answers.
#[derive(Debug, Default)]
pub struct Outcomes {
    pub accepted: Vec<Accepted>,
    pub uploads: Vec<InboxUpload>,
    /// Submits (or uploads) that never got a 2xx after the client's retries, by last answer.
    pub not_accepted: BTreeMap<String, u64>,
    /// Answers per route and status class (`submit 2xx`, `cancel 5xx`, …), retries included.
    pub answers: BTreeMap<String, u64>,
    /// An idempotency key answered with two different jobs.
    pub idempotency_mismatches: u64,
    /// The other tenant's `GET /v1/jobs/{id}` answered with the job.
    pub cross_tenant_answers: u64,
    pub cross_tenant_probes: u64,
}

#[derive(Debug, Clone)]
pub struct Accepted {
    pub planned: PlannedJob,
    pub id: String,
    /// When a cancel was answered 2xx (the job may still end otherwise if it was running).
    pub cancel_answered_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone)]
pub struct InboxUpload {
    pub tenant: usize,
    pub key: String,
    pub outbox: String,
}

/// A client of one tenant that retries the way the API asks: 429 after `Retry-After`, 5xx and
/// lost connections only where the request is safe to repeat.
struct ChaosClient {
    client: Client,
    http: reqwest::Client,
    answers: Mutex<BTreeMap<String, u64>>,
}

/// An answer, or a transport failure (`None` status).
struct Reply {
    status: Option<StatusCode>,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl ChaosClient {
    async fn call(&self, route: &str, request: reqwest::RequestBuilder) -> Reply {
        let reply = match request.send().await {
            Ok(response) => {
                let status = response.status();
                let headers = response.headers().clone();
                let bytes = response.bytes().await.unwrap_or_default();
                Reply { status: Some(status), headers, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
            }
            Err(_) => Reply { status: None, headers: Default::default(), body: Value::Null },
        };
        let class = reply.status.map_or("connection error".to_owned(), |s| format!("{}xx", s.as_u16() / 100));
        *self.answers.lock().unwrap().entry(format!("{route} {class}")).or_default() += 1;
        reply
    }

    /// Sends until an answer that is final for this client: 2xx or 4xx other than 429; 5xx and
    /// connection errors only when `safe` (idempotent). At most 8 tries.
    async fn until_final(&self, route: &str, safe: bool, make: impl Fn() -> reqwest::RequestBuilder) -> Reply {
        let mut tries = 0;
        loop {
            tries += 1;
            let reply = self.call(route, make()).await;
            let retry = match reply.status {
                Some(StatusCode::TOO_MANY_REQUESTS) => true,
                Some(status) if status.is_server_error() => safe,
                None => safe,
                Some(_) => false,
            };
            if !retry || tries >= 8 {
                return reply;
            }
            let wait = reply
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .map_or(Duration::from_millis(200 * tries), Duration::from_secs);
            tokio::time::sleep(wait.min(Duration::from_secs(5))).await;
        }
    }
}

/// Runs the planned jobs through `concurrency` client tasks; returns what the clients saw.
async fn drive(clients: &[Arc<ChaosClient>; 2], planned: Vec<PlannedJob>, concurrency: usize) -> Outcomes {
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let work = Arc::new(Mutex::new(planned.into_iter()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (work, outcomes, clients) = (work.clone(), outcomes.clone(), clients.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(job) = work.lock().unwrap().next() else { return };
                run_one(&clients, job, &outcomes).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("a client task panicked");
    }
    let mut outcomes = Arc::try_unwrap(outcomes).expect("clients done").into_inner().unwrap();
    for client in clients {
        for (route, n) in client.answers.lock().unwrap().iter() {
            *outcomes.answers.entry(route.clone()).or_default() += n;
        }
    }
    outcomes
}

async fn run_one(clients: &[Arc<ChaosClient>; 2], job: PlannedJob, outcomes: &Mutex<Outcomes>) {
    let client = &clients[job.tenant];
    if job.route == Route::Inbox {
        return upload(client, job, outcomes).await;
    }
    let submit = || {
        let mut request = client.client.request(reqwest::Method::POST, "/v1/jobs").json(&job.body);
        if let Some(key) = &job.idempotency_key {
            request = request.header("idempotency-key", key);
        }
        request
    };
    // Only a request with an idempotency key may be repeated after a 5xx or a lost answer.
    let reply = client.until_final("submit", job.idempotency_key.is_some(), submit).await;
    if !reply.status.is_some_and(|s| s.is_success()) {
        let last = reply.status.map_or("connection error".to_owned(), |s| s.as_u16().to_string());
        *outcomes.lock().unwrap().not_accepted.entry(format!("submit {last}")).or_default() += 1;
        return;
    }
    let id = reply.body["id"].as_str().unwrap_or_default().to_owned();
    if job.idempotency_key.is_some() {
        // The client retries although it got its answer (as after a timeout): the same job.
        let again = client.until_final("submit (retry)", true, submit).await;
        if again.status.is_some_and(|s| s.is_success()) && again.body["id"].as_str() != Some(id.as_str()) {
            outcomes.lock().unwrap().idempotency_mismatches += 1;
        }
    }
    let mut accepted = Accepted { id: id.clone(), cancel_answered_at: None, planned: job.clone() };
    if let Some(after) = job.cancel_after {
        tokio::time::sleep(after).await;
        let cancel = || client.client.request(reqwest::Method::POST, &format!("/v1/jobs/{id}/cancel"));
        let reply = client.until_final("cancel", true, cancel).await;
        if reply.status.is_some_and(|s| s.is_success()) {
            accepted.cancel_answered_at = Some(chrono::Utc::now());
        }
    }
    if job.index % 5 == 0 {
        let other = &clients[1 - job.tenant];
        let probe = || other.client.request(reqwest::Method::GET, &format!("/v1/jobs/{id}"));
        let reply = other.until_final("get (other tenant)", true, probe).await;
        let mut outcomes = outcomes.lock().unwrap();
        outcomes.cross_tenant_probes += 1;
        if reply.status.is_some_and(|s| s.is_success()) {
            outcomes.cross_tenant_answers += 1;
        }
    }
    outcomes.lock().unwrap().accepted.push(accepted);
}

async fn upload(client: &ChaosClient, job: PlannedJob, outcomes: &Mutex<Outcomes>) {
    let spec = job.body.to_string();
    let name = format!("chaos-{}", job.index);
    let link = client
        .until_final("upload link", true, || {
            client.client.request(reqwest::Method::POST, "/v1/uploads").json(&json!({"name": name, "size": spec.len()}))
        })
        .await;
    if !link.status.is_some_and(|s| s.is_success()) {
        *outcomes.lock().unwrap().not_accepted.entry("upload link".into()).or_default() += 1;
        return;
    }
    let url = link.body["url"].as_str().unwrap_or_default().to_owned();
    // A PUT of the same bytes is safe to repeat.
    let put = client
        .until_final("inbox put", true, || {
            client.http.put(&url).header("content-type", "application/json").body(spec.clone())
        })
        .await;
    if !put.status.is_some_and(|s| s.is_success()) {
        *outcomes.lock().unwrap().not_accepted.entry("inbox put".into()).or_default() += 1;
        return;
    }
    outcomes.lock().unwrap().uploads.push(InboxUpload {
        tenant: job.tenant,
        key: link.body["key"].as_str().unwrap_or_default().to_owned(),
        outbox: link.body["outbox"].as_str().unwrap_or_default().to_owned(),
    });
}

/// The stack's own log (API, relays, event functions) in `target/test-logs/<name>.log`, at
/// `RUST_LOG` or info; nothing if this process already logs somewhere.
fn log_to_file(name: &str) {
    let folder = workspace_root().join("target/test-logs");
    let Ok(file) =
        std::fs::create_dir_all(&folder).and_then(|()| std::fs::File::create(folder.join(format!("{name}.log"))))
    else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(Mutex::new(file)).try_init();
}

/// `options` with a log file of the runner's own (`<log>.<n>`), kept after it is killed.
pub(crate) fn with_log(options: &RunnerOptions, n: usize) -> RunnerOptions {
    let mut options = options.clone();
    options.log_file = options.log_file.map(|path| path.with_extension(format!("{n}.log")));
    options
}

/// Kills a random runner every so often and starts a new one in its place, until stopped.
struct Killer {
    stop: Arc<AtomicBool>,
    kills: Arc<AtomicU64>,
    task: std::thread::JoinHandle<Vec<RunnerProcess>>,
}

impl Killer {
    fn start(
        stack: &LocalStack,
        runners: Vec<RunnerProcess>,
        options: &RunnerOptions,
        every: (Duration, Duration),
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let kills = Arc::new(AtomicU64::new(0));
        let (resources, options) = (stack.resources.clone(), options.clone());
        let (stopped, killed) = (stop.clone(), kills.clone());
        let task = std::thread::spawn(move || {
            let mut runners = runners;
            let mut rng = rand::rng();
            let binary = kiln_local::runner_binary(&workspace_root()).expect("the runner binary");
            while !stopped.load(Ordering::SeqCst) {
                let pause = rng.random_range(every.0.as_millis()..=every.1.as_millis());
                let until = Instant::now() + Duration::from_millis(pause as u64);
                while Instant::now() < until && !stopped.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if stopped.load(Ordering::SeqCst) || runners.is_empty() {
                    break;
                }
                let victim = rng.random_range(0..runners.len());
                runners[victim].kill();
                killed.fetch_add(1, Ordering::SeqCst);
                let generation = runners.len() as u64 + killed.load(Ordering::SeqCst);
                match RunnerProcess::start(
                    &binary,
                    &crate::tools(),
                    &resources,
                    &with_log(&options, generation as usize),
                ) {
                    Ok(runner) => runners[victim] = runner,
                    Err(err) => eprintln!("chaos: a runner did not restart: {err:#}"),
                }
            }
            runners
        });
        Self { stop, kills, task }
    }

    fn stop(self) -> (Vec<RunnerProcess>, u64) {
        self.stop.store(true, Ordering::SeqCst);
        let runners = self.task.join().expect("the killer thread panicked");
        (runners, self.kills.load(Ordering::SeqCst))
    }
}

/// A chaos run's result: what the clients saw, the checker's counts, the faults and kills.
pub struct ChaosReport {
    pub options: ChaosOptions,
    pub outcomes: Outcomes,
    pub findings: crate::check::Findings,
    pub faults: kiln_local::FaultCounts,
    pub kills: u64,
    pub submit_secs: f64,
    pub drain_secs: f64,
}

/// Runs the whole thing on `moto_url`.
pub async fn run(moto_url: &str, options: ChaosOptions) -> anyhow::Result<ChaosReport> {
    let prefix = unique_prefix();
    log_to_file(&format!("chaos-{prefix}-stack"));
    let stack_options =
        StackOptions { prefix, faults: Some(FaultPlan::every_kind(options.fault_rate)), ..StackOptions::default() };
    let mut stack = LocalStack::start(moto_url, stack_options).await?;
    stack.start_relays().await?;
    stack.publish_models(&workspace_root().join("gpu-runner/models")).await?;
    let receiver = Receiver::start(vec![200]).await;
    let mut clients = Vec::new();
    let mut secrets = Vec::new();
    for tenant in ["chaos-a", "chaos-b"] {
        let client = Client::tenant(&stack, tenant).await;
        let secret = client.get("/v1/webhooks/secret").await;
        secrets.push(Secret::parse(secret.body["secret"].as_str().unwrap_or_default())?);
        clients.push(Arc::new(ChaosClient { client, http: reqwest::Client::new(), answers: Mutex::default() }));
    }
    receiver.secrets.lock().unwrap().extend(secrets);
    let clients: [Arc<ChaosClient>; 2] = [clients[0].clone(), clients[1].clone()];

    let mut runner = runner_options("chaos");
    runner.lease_secs = 10;
    runner.heartbeat_secs = 3;
    let runners = crate::start_runners(&stack, options.runners, |n| with_log(&runner, n))?;
    let killer = Killer::start(&stack, runners, &runner, options.kill_every);
    stack.start_faults();

    let started = Instant::now();
    let planned = plan(&options, &receiver.url);
    let outcomes = drive(&clients, planned, options.clients).await;
    let submit_secs = started.elapsed().as_secs_f64();

    let checker = Checker::new(&stack, &receiver);
    let ids: Vec<String> = outcomes.accepted.iter().map(|a| a.id.clone()).collect();
    checker.wait_until_ended(&ids, &outcomes.uploads, options.deadline).await;
    let (runners, kills) = killer.stop();
    // What is still in flight (webhook retries) gets its chance without faults or kills.
    stack.faults().expect("the stack has a fault proxy").set_rate(0.0);
    checker.wait_for_deliveries(&outcomes, Duration::from_secs(60)).await;
    let drain_secs = started.elapsed().as_secs_f64() - submit_secs;
    let findings = checker.check(&outcomes).await?;
    drop(runners);
    let faults = stack.faults().map(|p| p.counts()).unwrap_or_default();
    stack.stop().await;
    Ok(ChaosReport { options, outcomes, findings, faults, kills, submit_secs, drain_secs })
}

impl std::fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "chaos run: {} jobs, {} runners (one killed every {}–{} s), faults in {:.1}% of AWS requests, {} clients",
            o.jobs,
            o.runners,
            o.kill_every.0.as_secs(),
            o.kill_every.1.as_secs(),
            o.fault_rate * 100.0,
            o.clients
        )?;
        writeln!(
            f,
            "submitting took {:.1} s, draining {:.1} s; {} runners killed; {} jobs accepted, {} inbox uploads\n",
            self.submit_secs,
            self.drain_secs,
            self.kills,
            self.outcomes.accepted.len(),
            self.outcomes.uploads.len()
        )?;
        writeln!(f, "{}", self.findings)?;
        writeln!(f, "faults injected:\n{}", self.faults)?;
        writeln!(f, "| client answers | count |\n|---|---:|")?;
        for (route, n) in &self.outcomes.answers {
            writeln!(f, "| {route} | {n} |")?;
        }
        for (route, n) in &self.outcomes.not_accepted {
            writeln!(f, "| not accepted after retries: {route} | {n} |")?;
        }
        Ok(())
    }
}

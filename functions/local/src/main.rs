//! `kiln-local`: run the platform on this machine.
//!
//! - `demo`: start the local stack and run the main job (submit through the HTTP API, follow
//!   the job's progress), then stop; `--keep` leaves the stack running.
//! - `up`: start the local stack and leave it running for curl.
//! - `test`: run every test of the workspace against one shared moto server.

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_local::{LocalStack, MotoServer, StackOptions, ensure_moto, workspace_root};
use serde_json::{Value, json};
use std::{net::SocketAddr, time::Duration};

#[derive(Parser)]
#[command(about = "Run the kiln platform locally against the moto server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the stack, run the demo job, and stop (unless --keep).
    Demo {
        #[command(flatten)]
        stack: StackArgs,
        /// Leave the stack running after the demo, until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Start the stack and leave it running until Ctrl-C.
    Up {
        #[command(flatten)]
        stack: StackArgs,
    },
    /// Run every test in the workspace (cargo test) against one moto server.
    Test {
        /// Extra arguments for cargo test.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
}

#[derive(clap::Args, Clone)]
struct StackArgs {
    /// Where the API listens.
    #[arg(long, env = "KILN_LOCAL_API_ADDR", default_value = "127.0.0.1:8080")]
    api_addr: SocketAddr,
    /// moto's port on 127.0.0.1 (0 picks a free one).
    #[arg(long, env = "KILN_LOCAL_MOTO_PORT", default_value_t = 0)]
    moto_port: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
    match Cli::parse().command {
        Command::Demo { stack, keep } => {
            let running = Running::start(&stack).await?;
            demo(&running).await?;
            if keep {
                running.wait().await;
            }
            Ok(())
        }
        Command::Up { stack } => {
            let running = Running::start(&stack).await?;
            running.wait().await;
            Ok(())
        }
        Command::Test { cargo_args } => test(cargo_args),
    }
}

/// The running local stack and the moto server under it.
struct Running {
    stack: LocalStack,
    key: String,
    _moto: MotoServer,
}

impl Running {
    async fn start(args: &StackArgs) -> anyhow::Result<Self> {
        let root = workspace_root();
        let moto_bin = ensure_moto(&root)?;
        let moto = MotoServer::start(&moto_bin, args.moto_port)?;
        let options = StackOptions { api_addr: args.api_addr, ..StackOptions::default() };
        let stack = LocalStack::start(&moto.url, options).await.context("starting the local stack")?;
        let models = stack.publish_models(&root.join("gpu-runner/models")).await?;
        let key = stack.create_tenant("dev", "Local developer").await?;
        println!("kiln local stack");
        println!("  AWS (moto):  {}", moto.url);
        println!("  API:         {}", stack.api_url);
        println!("  models:      {}", models.iter().map(|m| format!("{}@{}", m.name, m.version)).collect::<Vec<_>>().join(", "));
        println!("  tenant:      dev");
        println!("  API key:     {}", key.expose());
        println!();
        println!("  export KILN_API={} KILN_KEY={}", stack.api_url, key.expose());
        println!(
            "  curl -s $KILN_API/v1/jobs -H \"authorization: Bearer $KILN_KEY\" -H 'content-type: application/json' \\\n    -d '{{\"model\":\"kiln-demo\",\"prompt\":\"a lighthouse at dusk\"}}'"
        );
        println!();
        Ok(Self { stack, key: key.expose().to_owned(), _moto: moto })
    }

    async fn wait(self) {
        println!("Running; Ctrl-C stops it.");
        let _ = tokio::signal::ctrl_c().await;
        self.stack.stop().await;
    }
}

/// The main job, through the HTTP API as a client would use it.
async fn demo(running: &Running) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let api = &running.stack.api_url;
    let submit = |body: Value| {
        http.post(format!("{api}/v1/jobs")).bearer_auth(&running.key).json(&body).send()
    };
    let request = json!({"model": "kiln-demo", "prompt": "a lighthouse at dusk, oil painting", "seed": 7});
    let response = submit(request.clone()).await?;
    let status = response.status();
    let job: Value = response.json().await?;
    anyhow::ensure!(status.is_success(), "submission failed: {status} {job}");
    let id = job["id"].as_str().context("no job id")?.to_owned();
    println!("submitted job {id}: {status}, status {}", job["status"]);

    let again: Value = submit(request).await?.json().await?;
    println!("the same request again returns job {} (deduplicated: {})", again["id"], again["deduplicated"]);

    let mut last = String::new();
    for _ in 0..6 {
        let job: Value = http.get(format!("{api}/v1/jobs/{id}")).bearer_auth(&running.key).send().await?.json().await?;
        let line = format!("status {} progress {}", job["status"], job["progress"]);
        if line != last {
            println!("job {id}: {line}");
            last = line;
        }
        if job["status"] != "queued" && job["status"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("(no gpu-runner is wired into the local stack yet: the job stays queued until one drains the queue)");
    Ok(())
}

/// `cargo test --workspace` with one moto server for every test process. Ends with one
/// `N passed, N failed` line summing every test binary.
fn test(cargo_args: Vec<String>) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let root = workspace_root();
    let moto = MotoServer::start(&ensure_moto(&root)?, 0)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = std::process::Command::new(cargo)
        .current_dir(&root)
        .args(["test", "--workspace", "--lib", "--bins", "--tests", "--no-fail-fast"])
        .args(&cargo_args)
        .env("KILN_TEST_MOTO_URL", &moto.url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(result) = line.strip_prefix("test result: ") {
                passed += count_before(result, " passed");
                failed += count_before(result, " failed");
            }
        }
    }
    let status = child.wait()?;
    drop(moto);
    println!("\n{passed} passed, {failed} failed");
    std::process::exit(if status.success() && failed == 0 { 0 } else { status.code().unwrap_or(1).max(1) });
}

/// The number just before `label` in a cargo test summary (`ok. 3 passed; 0 failed; ...`).
fn count_before(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(label.trim()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

//! `kiln-local`: run the platform on this machine.
//!
//! - `demo`: start the local stack (moto, the API, a gpu-runner process) and run the main job:
//!   submit jobs through the HTTP API, follow their progress, download the artifacts through
//!   their presigned URLs into `.kiln/demo/`; then stop (`--keep` leaves the stack running).
//! - `up`: start the local stack and leave it running for curl.
//! - `test`: run every test of the workspace against one shared moto server.

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_local::{
    FaultKind, FaultPlan, LocalStack, MotoServer, RunnerOptions, RunnerProcess, StackOptions, ensure_system_libraries,
    ensure_tools, runner_binary, workspace_root,
};
use serde_json::{Value, json};
use std::{net::SocketAddr, path::Path, time::Duration};

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
    /// Inject faults into this fraction (0–1) of the AWS requests of the API, the functions and
    /// the runner, through a proxy in front of moto (e.g. 0.05).
    #[arg(long, value_name = "RATE", value_parser = fault_rate)]
    faults: Option<f64>,
    /// Which faults to inject (default: every kind).
    #[arg(long, value_enum, value_delimiter = ',', requires = "faults")]
    fault_kinds: Vec<FaultKind>,
    /// Print the API's and webhooks' metric lines (CloudWatch Embedded Metric Format, as the
    /// deployed functions do) on stdout.
    #[arg(long)]
    emit_metrics: bool,
}

fn fault_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("`{text}` is not a fraction between 0 and 1")),
    }
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

/// The running local stack, the moto server under it and the gpu-runner draining it.
struct Running {
    stack: LocalStack,
    key: String,
    _runner: RunnerProcess,
    _moto: MotoServer,
}

impl Running {
    async fn start(args: &StackArgs) -> anyhow::Result<Self> {
        let root = workspace_root();
        let tools = ensure_tools(&root)?;
        let runner_bin = runner_binary(&root)?;
        let moto = MotoServer::start(&tools, args.moto_port)?;
        let faults = args.faults.map(|rate| {
            let mut plan = FaultPlan::every_kind(rate);
            if !args.fault_kinds.is_empty() {
                plan.kinds = args.fault_kinds.clone();
            }
            plan
        });
        let options = StackOptions {
            api_addr: args.api_addr,
            faults,
            emit_metrics: args.emit_metrics,
            ..StackOptions::default()
        };
        let mut stack = LocalStack::start(&moto.url, options).await.context("starting the local stack")?;
        stack.start_relays().await?;
        let models = stack.publish_models(&root.join("gpu-runner/models")).await?;
        let key = stack.create_tenant("dev", "Local developer").await?;
        let state = root.join(".kiln");
        std::fs::create_dir_all(&state)?;
        let mut runner_options = RunnerOptions::new(root.join("gpu-runner/models"));
        runner_options.log_file = Some(state.join("runner.log"));
        let runner = RunnerProcess::start(&runner_bin, &tools, &stack.resources, &runner_options)
            .context("starting the gpu-runner (its log: .kiln/runner.log)")?;
        println!("kiln local stack");
        println!("  AWS (moto):  {}", moto.url);
        println!("  API:         {}", stack.api_url);
        println!(
            "  models:      {}",
            models.iter().map(|m| format!("{}@{}", m.name, m.version)).collect::<Vec<_>>().join(", ")
        );
        println!("  gpu-runner:  pid {}, log .kiln/runner.log", runner.id());
        println!("  playground:  {}/", stack.api_url);
        println!("  OpenAPI:     {}/v1/openapi.json", stack.api_url);
        println!(
            "  metrics:     {}/metrics (the runner's Prometheus metrics; Grafana dashboard: \
             terraform/grafana/runner-dashboard.json); {}",
            runner.metrics_url,
            if args.emit_metrics {
                "the API's and webhooks' EMF lines on this stdout"
            } else {
                "--emit-metrics prints the API's and webhooks' EMF lines here"
            }
        );
        if let Some(proxy) = stack.faults() {
            stack.start_faults();
            let kinds: Vec<&str> = proxy.plan().kinds.iter().map(|k| k.as_str()).collect();
            println!(
                "  faults:      {:.1}% of AWS requests ({}) through {}",
                proxy.plan().rate * 100.0,
                kinds.join(", "),
                proxy.url
            );
        }
        println!("  tenant:      dev");
        println!("  API key:     {}", key.expose());
        println!();
        println!("  export KILN_API={} KILN_KEY={}", stack.api_url, key.expose());
        println!(
            "  curl -s $KILN_API/v1/jobs -H \"authorization: Bearer $KILN_KEY\" -H 'content-type: application/json' \\\n    -d '{{\"model\":\"kiln-demo\",\"prompt\":\"a lighthouse at dusk\"}}'"
        );
        println!();
        Ok(Self { stack, key: key.expose().to_owned(), _runner: runner, _moto: moto })
    }

    async fn wait(self) {
        println!("Running; Ctrl-C stops it.");
        let _ = tokio::signal::ctrl_c().await;
        if let Some(proxy) = self.stack.faults() {
            println!("\nfaults injected:\n{}", proxy.counts());
        }
        self.stack.stop().await;
    }
}

/// The main job, through the HTTP API as a client would use it: an image and a video in each
/// video format from the demo model, a latent-diffusion video from the tiny SD model, followed to the end and downloaded through their presigned URLs.
async fn demo(running: &Running) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let api = &running.stack.api_url;
    let key = &running.key;
    let image = upload_demo_image(&http, api, key).await?;
    let requests = [
        ("lighthouse", json!({"model": "kiln-demo", "prompt": "a lighthouse at dusk, oil painting", "seed": 7})),
        (
            "harbour",
            json!({"model": "kiln-demo", "prompt": "a quiet harbour at night", "seed": 11,
            "width": 320, "height": 240, "num_frames": 16, "fps": 8, "format": "gif"}),
        ),
        (
            "sunrise",
            json!({"model": "kiln-demo", "prompt": "sunrise over a glacier lake", "seed": 3,
            "width": 384, "height": 256, "num_frames": 24, "fps": 12, "format": "mp4"}),
        ),
        (
            "tide",
            json!({"model": "kiln-demo", "prompt": "the tide coming in, watercolour", "seed": 5,
            "width": 384, "height": 256, "num_frames": 24, "fps": 12, "format": "webm"}),
        ),
        (
            // The Stable Diffusion pipeline (tokenizer, text encoder, guided UNet, Euler, VAE) on
            // the tiny random-weight model: patterns, not pictures, but every stage is real.
            "tiny-sd-walk",
            json!({"model": "kiln-tiny-sd", "prompt": "a lighthouse at dusk", "negative_prompt": "blurry",
            "seed": 7, "width": 256, "height": 256, "num_frames": 16, "fps": 8, "steps": 8, "guidance": 7.5,
            "format": "gif"}),
        ),
        (
            // A text-to-video motion model (AnimateDiff-shaped, random weights): all 16 frames
            // denoised together, in two overlapping windows of 8.
            "tiny-motion",
            json!({"model": "kiln-tiny-motion", "prompt": "waves rolling onto a beach", "seed": 9,
            "width": 128, "height": 128, "num_frames": 16, "fps": 8, "steps": 6, "guidance": 7.5,
            "format": "gif"}),
        ),
        (
            // Image to image: the picture uploaded above, its structure 60% replaced.
            "tiny-sd-img2img",
            json!({"model": "kiln-tiny-sd", "prompt": "a yellow sun over fields", "seed": 4,
            "init_image": image, "strength": 0.6, "steps": 8, "guidance": 7.5}),
        ),
    ];
    let mut jobs = Vec::new();
    for (name, request) in &requests {
        let response = http.post(format!("{api}/v1/jobs")).bearer_auth(key).json(request).send().await?;
        let status = response.status();
        let job: Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "submission failed: {status} {job}");
        let id = job["id"].as_str().context("no job id")?.to_owned();
        println!("submitted {name:<15} job {id}: {status}");
        jobs.push((*name, id));
    }
    let again: Value =
        http.post(format!("{api}/v1/jobs")).bearer_auth(key).json(&requests[0].1).send().await?.json().await?;
    println!(
        "the first request again returns job {} (deduplicated: {}, cached: {})",
        again["id"], again["deduplicated"], again["cached"]
    );

    let folder = workspace_root().join(".kiln/demo");
    std::fs::create_dir_all(&folder)?;
    let mut last: Vec<String> = vec![String::new(); jobs.len()];
    let mut finished: Vec<Option<Value>> = vec![None; jobs.len()];
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while finished.iter().any(Option::is_none) {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the jobs did not finish within 5 minutes");
        for (index, (name, id)) in jobs.iter().enumerate() {
            if finished[index].is_some() {
                continue;
            }
            let job: Value = http.get(format!("{api}/v1/jobs/{id}")).bearer_auth(key).send().await?.json().await?;
            let line = format!(
                "{} {:>3.0}%",
                job["status"].as_str().unwrap_or("?"),
                job["progress"].as_f64().unwrap_or(0.0) * 100.0
            );
            if line != last[index] {
                println!("  {name:<15} {line}");
                last[index] = line;
            }
            if !matches!(job["status"].as_str(), Some("queued" | "running")) {
                finished[index] = Some(job);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!();
    for ((name, id), job) in jobs.iter().zip(finished.into_iter().flatten()) {
        let Some(output) = job["outputs"].get(0) else {
            println!("{name:<15} {id} ended {}: {}", job["status"], job["error"]);
            continue;
        };
        let url = output["url"].as_str().context("no presigned url")?;
        let bytes = http.get(url).send().await?.error_for_status()?.bytes().await?;
        let extension = output["key"].as_str().and_then(|k| k.rsplit('.').next()).unwrap_or("bin");
        let path = folder.join(format!("{name}.{extension}"));
        std::fs::write(&path, &bytes)?;
        let t = &job["timings"];
        println!(
            "{name:<15} {:>8} bytes  queue {:>5} ms  render {:>5} ms  encode {:>4} ms  upload {:>4} ms  -> {}",
            bytes.len(),
            t["queue_ms"],
            t["render_ms"],
            t["encode_ms"],
            t["upload_ms"],
            path.display()
        );
    }
    println!("\nartifacts downloaded through their presigned URLs into {}", folder.display());
    inbox_demo(running, &http, &folder).await
}

/// Uploads a drawn 256×256 picture through a link from `POST /v1/uploads`; its image id.
async fn upload_demo_image(http: &reqwest::Client, api: &str, key: &str) -> anyhow::Result<String> {
    let picture = image::RgbImage::from_fn(256, 256, |x, y| {
        let (dx, dy) = (x as f64 - 128.0, y as f64 - 96.0);
        match dx * dx + dy * dy < 40.0 * 40.0 {
            true => image::Rgb([250, 220, 40]),
            false if y > 170 => image::Rgb([60, 140 + (x % 40) as u8, 50]),
            false => image::Rgb([90, 150, 230 - (y / 2) as u8]),
        }
    });
    let mut png = std::io::Cursor::new(Vec::new());
    picture.write_to(&mut png, image::ImageFormat::Png)?;
    let png = png.into_inner();
    let link: Value = http
        .post(format!("{api}/v1/uploads"))
        .bearer_auth(key)
        .json(&json!({"kind": "image", "content_type": "image/png", "size": png.len()}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    http.put(link["url"].as_str().context("no upload link")?)
        .header("content-type", "image/png")
        .header("content-length", png.len().to_string())
        .body(png)
        .send()
        .await?
        .error_for_status()?;
    let image = link["image"].as_str().context("no image id")?.to_owned();
    println!("uploaded a 256x256 picture as {image} (for the image-to-image job)");
    Ok(image)
}

/// A job started by uploading its spec to the S3 inbox, its result read back from the outbox.
async fn inbox_demo(running: &Running, http: &reqwest::Client, folder: &Path) -> anyhow::Result<()> {
    let (api, key) = (&running.stack.api_url, &running.key);
    let spec = json!({"model": "kiln-demo", "prompt": "a red lighthouse from the inbox", "seed": 21, "width": 256, "height": 256})
        .to_string();
    let link: Value = http
        .post(format!("{api}/v1/uploads"))
        .bearer_auth(key)
        .json(&json!({"name": "inbox-demo", "size": spec.len()}))
        .send()
        .await?
        .json()
        .await?;
    let url = link["url"].as_str().context("no upload url")?;
    http.put(url).header("content-type", "application/json").body(spec).send().await?.error_for_status()?;
    println!("\nuploaded a job spec to {}; waiting for {}", link["key"], link["outbox"]);
    let s3 = running.stack.clients.s3();
    let bucket = &running.stack.resources.artifacts_bucket;
    let outbox = link["outbox"].as_str().unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the inbox job did not finish within 2 minutes");
        if let Ok(result) = s3.get_object().bucket(bucket).key(format!("{outbox}result.json")).send().await {
            let result: Value = serde_json::from_slice(&result.body.collect().await?.into_bytes())?;
            let image = s3.get_object().bucket(bucket).key(format!("{outbox}output.png")).send().await?;
            let path = folder.join("inbox-demo.png");
            std::fs::write(&path, image.body.collect().await?.into_bytes())?;
            println!("inbox job {} {} -> {} (and {outbox}result.json)", result["id"], result["status"], path.display());
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `cargo test --workspace` with one moto server for every test process. Ends with one
/// `N passed, N failed` line summing every test binary.
fn test(cargo_args: Vec<String>) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let root = workspace_root();
    let tools = ensure_tools(&root)?;
    ensure_system_libraries()?;
    // Build every test target first; this also builds the runner binary (kiln-runner has
    // integration tests) with the features the tests unify, which the end-to-end tests start.
    let built = kiln_local::cargo_command()
        .current_dir(&root)
        .args(["test", "--workspace", "--lib", "--bins", "--tests", "--no-run"])
        .args(&cargo_args)
        .status()
        .context("running cargo test --no-run")?;
    if !built.success() {
        println!("\n0 passed, 1 failed (the build)");
        std::process::exit(built.code().unwrap_or(1).max(1));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), std::path::PathBuf::from);
    let runner_bin = target.join("debug/kiln-runner");
    anyhow::ensure!(runner_bin.exists(), "{} was not built", runner_bin.display());
    let moto = MotoServer::start(&tools, 0)?;
    let mut child = kiln_local::cargo_command()
        .current_dir(&root)
        .args(["test", "--workspace", "--lib", "--bins", "--tests", "--no-fail-fast"])
        .args(&cargo_args)
        .env("KILN_TEST_MOTO_URL", &moto.url)
        .env(kiln_local::runner::RUNNER_BIN_ENV, &runner_bin)
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
        .find_map(|part| {
            part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(label.trim())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

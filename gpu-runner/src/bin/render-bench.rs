//! `render-bench`: the runner's per-stage times and throughput, with no AWS in the way.
//!
//! It runs the real service (queue loop, session threads, encoders on the blocking pool) on the
//! in-memory ports, feeds it `--jobs` jobs per format, and prints one row per format: the median
//! queue wait, render, encode and upload times, jobs/s, the mean batch, and how busy the render
//! thread was (Σrender: time inside render calls, counted once per batch, from the runner's
//! `render_busy_seconds`). If encoding stalled rendering, wall time would approach Σrender +
//! Σencode; with encoders off the render thread it approaches max(Σrender, Σencode / cores).
//!
//!     cargo run --release -p kiln-runner --bin render-bench -- --ort-dylib <libonnxruntime.so>
//!
//! (`cargo run -p kiln-local -- bench` passes the project's ONNX Runtime.)

use chrono::Utc;
use clap::Parser;
use kiln_app::{
    JobMessage,
    memory::{MemoryArtifacts, MemoryJobStore, MemoryWorkQueue},
    ports::{CacheClaim, JobStore},
};
use kiln_domain::{Job, JobId, JobStatus, ModelSpec, Submission, TenantId, WebhookPolicy};
use kiln_runner::{Metrics, Ports, Runner, RunnerConfig, render::device_memory, start_sessions, warm_up};
use std::{sync::Arc, time::Instant};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    runner: RunnerConfig,
    /// Jobs per format.
    #[arg(long, default_value_t = 8)]
    jobs: usize,
    /// Formats to measure, comma-separated.
    #[arg(long, default_value = "png,gif,mp4,webm", value_delimiter = ',')]
    formats: Vec<String>,
    #[arg(long, default_value_t = 512)]
    width: u32,
    #[arg(long, default_value_t = 512)]
    height: u32,
    /// Frames of each video job (images have one).
    #[arg(long, default_value_t = 16)]
    frames: u32,
    #[arg(long, default_value_t = 4)]
    steps: u32,
    /// Classifier-free guidance of every job (the model's default if not given; 0: one UNet
    /// row per image, as turbo-style models run).
    #[arg(long)]
    guidance: Option<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let metrics = Arc::new(Metrics::default());
    let devices = cli.runner.device.0.clone();
    // Device memory in use (NVML, all processes), in GiB per device: "-" where unknown.
    let used = || -> String {
        let gib = |(free, total): (u64, u64)| format!("{:.2}", (total - free) as f64 / (1u64 << 30) as f64);
        devices.iter().map(|d| device_memory::memory(*d).map_or("-".into(), gib)).collect::<Vec<_>>().join(" / ")
    };
    let used_at_start = used();
    let started = Instant::now();
    let (models, sessions, threads) = start_sessions(&cli.runner, &metrics)?;
    let used_loaded = used();
    let loaded = started.elapsed();
    let model = models.first().ok_or_else(|| anyhow::anyhow!("no models"))?.clone();
    // The runner's own warm-up (one image at the model's defaults), twice: the first render on a
    // fresh session against one that finds the device warm is what the warm-up saves a job.
    let cold = warm_up(&models[..1], &sessions).await?.remove(0);
    let ready = started.elapsed();
    let warm = warm_up(&models[..1], &sessions).await?.remove(0);
    let used_warm = used();
    println!(
        "startup: every package loaded in {} ms, the warm-up rendered in {} ms: ready for jobs {} ms after the start",
        loaded.as_millis(),
        cold.elapsed.as_millis(),
        ready.as_millis()
    );
    println!(
        "warm-up render at the model's defaults ({}x{}, {} steps): first {} ms, second {} ms",
        model.defaults.width,
        model.defaults.height,
        model.defaults.steps,
        cold.render_time.as_millis(),
        warm.render_time.as_millis()
    );
    // And one small job of the service, so the encoders' start-up is not measured either.
    measure(&cli, &model, &sessions, &metrics, "png", 1).await?;

    println!(
        "model {}@{} on {}, {}x{}, {} steps, {} frames per video, {} jobs per format, max_in_flight {}",
        model.name,
        model.version,
        cli.runner.device,
        cli.width,
        cli.height,
        cli.steps,
        cli.frames,
        cli.jobs,
        cli.runner.max_in_flight
    );
    println!(
        "| format | frames | queue wait ms (p50) | batch wait ms (p50) | render ms (p50) | encode ms (p50) | upload ms (p50) | jobs/s | jobs per batch | Σrender s | Σencode s | wall s | render busy | render ms per unit |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for format in &cli.formats {
        measure(&cli, &model, &sessions, &metrics, format, cli.jobs).await?;
    }
    println!(
        "device memory in use, GiB: {used_at_start} at the start, {used_loaded} with the packages loaded, {used_warm} after the warm-up, {} after the jobs; CUDA graph steps: {}",
        used(),
        graph_steps(&metrics)
    );
    // The session threads drop their pipelines (ONNX Runtime sessions, captured CUDA graphs)
    // before the process exits: left to exit, CUDA shuts down under them and the process aborts.
    drop(sessions);
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// Runs `count` jobs of one format through a fresh service and prints their row.
async fn measure(
    cli: &Cli,
    model: &ModelSpec,
    sessions: &[kiln_runner::session::SessionHandle],
    metrics: &Arc<Metrics>,
    format: &str,
    count: usize,
) -> anyhow::Result<()> {
    let store = Arc::new(MemoryJobStore::default());
    let queue = Arc::new(MemoryWorkQueue::default());
    let frames = if format == "png" { 1 } else { cli.frames };
    let tenant = TenantId::parse("bench")?;
    let mut ids = Vec::new();
    for n in 0..count {
        let body = serde_json::json!({
            "model": model.name, "prompt": format!("benchmark scene {n}"), "seed": n,
            "width": cli.width, "height": cli.height, "num_frames": frames, "steps": cli.steps,
            "format": format, "fps": if frames > 1 { Some(8) } else { None },
        });
        let body = match cli.guidance {
            Some(guidance) => serde_json::json!(body.as_object().cloned().map(|mut fields| {
                fields.insert("guidance".into(), guidance.into());
                fields
            })),
            None => body,
        };
        let resolved = Submission::parse(body.to_string().as_bytes())?
            .resolve(model, WebhookPolicy::default(), || 0)
            .map_err(|err| anyhow::anyhow!("{err}"))?;
        let now = Utc::now();
        let job = Job::new(
            JobId::generate(now),
            tenant.clone(),
            model.name.clone(),
            model.version.clone(),
            resolved.params,
            None,
            now,
            chrono::Duration::hours(1),
        );
        store.insert(&job, &CacheClaim { key: job.cache_key.clone(), replaces: None }, None).await?;
        queue.push(serde_json::to_string(&JobMessage::for_job(&job))?);
        ids.push(job.id);
    }
    let mut settings = cli.runner.settings();
    settings.poll_wait = std::time::Duration::from_millis(20);
    let runner = Arc::new(Runner::new(
        Ports {
            store: store.clone(),
            queue: queue.clone(),
            artifacts: Arc::new(MemoryArtifacts::default()),
            objects: Arc::new(MemoryArtifacts::default()),
        },
        sessions.to_vec(),
        settings,
        metrics.clone(),
    ));
    let shutdown = CancellationToken::new();
    let (busy_before, batches_before) = (metrics.render_busy.get(), metrics.batches.get());
    let started = Instant::now();
    let service = tokio::spawn(runner.run(shutdown.clone()));
    while queue.outstanding() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    shutdown.cancel();
    service.await?;
    let busy = metrics.render_busy.get() - busy_before;
    let batches = metrics.batches.get() - batches_before;

    let mut jobs = Vec::new();
    for id in &ids {
        jobs.push(store.get(id).await?.ok_or_else(|| anyhow::anyhow!("job vanished"))?);
    }
    if let Some(bad) = jobs.iter().find(|job| job.status != JobStatus::Succeeded) {
        anyhow::bail!("job {} ended {}: {:?}", bad.id, bad.status, bad.error);
    }
    if count == 1 && format == "png" && cli.jobs > 1 {
        return Ok(()); // the warm-up
    }
    let stage = |pick: fn(&Job) -> Option<u64>| {
        let mut values: Vec<u64> = jobs.iter().filter_map(pick).collect();
        values.sort_unstable();
        let median = values.get(values.len() / 2).copied().unwrap_or(0);
        let sum: u64 = values.iter().sum();
        (median, sum as f64 / 1000.0)
    };
    let (queue_p50, _) = stage(|j| j.timings.queue_ms);
    let (batch_wait_p50, _) = stage(|j| j.timings.batch_wait_ms);
    let (render_p50, _) = stage(|j| j.timings.render_ms);
    let (encode_p50, encode_sum) = stage(|j| j.timings.encode_ms);
    let (upload_p50, _) = stage(|j| j.timings.upload_ms);
    // The device time one GPU-work unit took at this batching: the calibration of the model's
    // `cost.unit_scale` (its figure over the reference model's, measured the same way).
    let units: u64 = jobs.iter().map(|job| model.cost.units(&job.params)).sum();
    println!(
        "| {format} | {frames} | {queue_p50} | {batch_wait_p50} | {render_p50} | {encode_p50} | {upload_p50} | {:.2} | {:.2} | {busy:.2} | {encode_sum:.2} | {wall:.2} | {:.0}% | {:.2} |",
        count as f64 / wall,
        count as f64 / batches.max(1) as f64,
        100.0 * busy / wall,
        busy * 1000.0 / units.max(1) as f64
    );
    Ok(())
}

/// The `kiln_runner_cuda_graph_*` series of the metrics, on one line.
fn graph_steps(metrics: &Metrics) -> String {
    let text = metrics.render_text();
    let lines: Vec<&str> =
        text.lines().filter(|line| line.starts_with("kiln_runner_cuda_graph_") && !line.starts_with('#')).collect();
    if lines.is_empty() { "none".into() } else { lines.join(", ") }
}

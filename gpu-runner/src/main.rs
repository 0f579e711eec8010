//! `kiln-runner`: the gpu-runner service on SQS, DynamoDB and S3.

use anyhow::Context;
use clap::Parser;
use kiln_aws::{AwsPorts, Resources};
use kiln_runner::{Metrics, Ports, Runner, RunnerConfig, fleet, metrics, start_sessions, warm_up};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(about = "Drain the kiln job queue: render, encode, store, record")]
struct Cli {
    #[command(flatten)]
    runner: RunnerConfig,
    #[command(flatten)]
    resources: Resources,
    /// Log as JSON lines (for CloudWatch) instead of text.
    #[arg(long, env = "KILN_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    if cli.log_json {
        logs.json().init()
    } else {
        logs.init()
    }

    let metrics = Arc::new(Metrics::default());
    let (models, sessions, threads) = start_sessions(&cli.runner, &metrics).context("loading model packages")?;
    info!(device = %cli.runner.device, models = ?models.iter().map(|m| format!("{}@{}", m.name, m.version)).collect::<Vec<_>>(), "models loaded");
    for device in &cli.runner.device.0 {
        if let Some((free, total)) = kiln_runner::render::device_memory::memory(*device) {
            info!(device = %device, free_mib = free >> 20, total_mib = total >> 20, "device memory after loading");
        }
    }
    if cli.runner.warm_up {
        for warmed in warm_up(&models, &sessions).await.context("warming up")? {
            info!(model = %warmed.model, version = %warmed.version, device = %warmed.device, render_ms = warmed.render_time.as_millis() as u64, "warm-up render done");
        }
    }

    let aws = AwsPorts::connect(&cli.resources).await;
    // Offered, never overwritten: a new version of a known model joins as a candidate with no
    // traffic until an operator gives it some (`kiln-admin models`).
    let catalog = kiln_app::catalog::Catalog::new(aws.catalog());
    for model in &models {
        let offered =
            catalog.offer(model).await.with_context(|| format!("offering model {} to the catalog", model.name))?;
        match offered {
            kiln_domain::Offered::Retired => {
                tracing::warn!(model = %model.name, version = %model.version, "this version is retired: only jobs already queued for it come here")
            }
            offered => info!(model = %model.name, version = %model.version, ?offered, "model in the catalog"),
        }
    }
    let ports =
        Ports { store: aws.job_store(), queue: aws.work_queue(), artifacts: aws.artifacts(), objects: aws.objects() };

    let shutdown = CancellationToken::new();
    let listener = metrics::bind(cli.runner.metrics_addr).await.context("binding the metrics address")?;
    info!(addr = %listener.local_addr()?, "serving /healthz and /metrics");
    tokio::spawn(metrics::serve(listener, metrics.clone(), shutdown.child_token()));
    tokio::spawn(stop_on_signal(shutdown.clone()));

    let settings = cli.runner.settings();
    let slots = settings.max_in_flight;
    let runner = Arc::new(Runner::new(ports, sessions, settings, metrics.clone()));
    if cli.runner.fleet_report_secs > 0 {
        let every = std::time::Duration::from_secs(cli.runner.fleet_report_secs);
        let report =
            fleet::report(aws.fleet(), runner.speeds(), metrics, runner.models(), slots, every, shutdown.child_token());
        tokio::spawn(report);
    }
    runner.run(shutdown).await;
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// SIGTERM (what systemd sends on `systemctl stop`, which the instance's agent runs when the
/// Auto Scaling group terminates the instance) or Ctrl-C.
async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => info!("Ctrl-C: stopping"),
    }
    shutdown.cancel();
}

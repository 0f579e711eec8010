//! The runner's configuration: flags, or the environment variables named beside each.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::render::{
    diffusion::DiffusionOptions,
    runtime::{ConvSearch, Device, Devices, SessionOptions},
};

/// A setting that is on, off, or decided by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunnerConfig {
    /// Directory of model packages (one sub-directory each, with a manifest.json); the runner
    /// serves every package in it.
    #[arg(long, env = "KILN_MODELS_DIR", default_value = "gpu-runner/models")]
    pub models_dir: PathBuf,

    /// ONNX Runtime's shared library (libonnxruntime.so), loaded at startup.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib: PathBuf,

    /// Where models run: `cpu`, `cuda` / `cuda:<device id>`, a comma-separated list of them, or
    /// `cuda:all` (every GPU of the machine): one render session per model on each, each batch
    /// placed on the least loaded. With CUDA a broken GPU setup stops the runner at startup
    /// rather than falling back to the CPU.
    #[arg(long, env = "KILN_DEVICE", default_value = "cpu")]
    pub device: Devices,

    /// Threads ONNX Runtime uses inside one operator (0: its default, one per core).
    #[arg(long, env = "KILN_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,

    /// Before taking jobs, render one image of each model at its defaults (`false` to skip): a
    /// broken device setup fails at startup, and the first job does not pay for the GPU's
    /// kernel loading and algorithm search.
    #[arg(long, env = "KILN_WARM_UP", default_value_t = true, action = clap::ArgAction::Set)]
    pub warm_up: bool,

    /// Most compatible jobs (same model, version, size and steps, all guided or none) rendered in
    /// one call.
    #[arg(long, env = "KILN_MAX_BATCH", default_value_t = 1)]
    pub max_batch: usize,

    /// Longest the oldest job waiting in a session waits for compatible jobs to fill its batch,
    /// in milliseconds (as Triton's `max_queue_delay`). A batch goes earlier when it is full,
    /// when an incompatible job waits behind it, or when the runner is draining. 0: never wait.
    #[arg(long, env = "KILN_MAX_QUEUE_DELAY_MS", default_value_t = 0)]
    pub max_queue_delay_ms: u64,

    /// Latent diffusion: most UNet rows in one run, counted at 512x512 (smaller images fit
    /// proportionally more; with guidance each image is two rows). Bounds GPU memory whatever
    /// the batch or video length.
    #[arg(long, env = "KILN_MAX_UNET_ROWS", default_value_t = 4)]
    pub max_unet_rows: usize,

    /// Latent diffusion: bind the prompt embeddings to the device once per batch (ONNX Runtime
    /// IO binding) and send only the latents each step. `auto`: on with CUDA.
    #[arg(long, env = "KILN_IO_BINDING", default_value = "auto")]
    pub io_binding: Toggle,

    /// Latent diffusion on CUDA with a package's step graph: most chunk shapes (lanes, UNet rows,
    /// size) per session whose steps are captured as CUDA graphs and replayed. A shape seen when
    /// all are taken pads up to a larger graph of its size, or runs uncaptured; the metric
    /// `kiln_runner_step_runs_total{run}` counts which. 0: no CUDA graphs.
    #[arg(long, env = "KILN_CUDA_GRAPHS", default_value_t = crate::render::diffusion::DEFAULT_CUDA_GRAPHS)]
    pub cuda_graphs: usize,

    /// How cuDNN picks each convolution's algorithm on CUDA: `exhaustive` (time them all once
    /// per input shape), `heuristic` or `default`.
    #[arg(long, env = "KILN_CUDNN_CONV_SEARCH", value_enum, default_value_t = ConvSearch::Exhaustive)]
    pub conv_search: ConvSearch,

    /// Most jobs held at once per device (rendering, waiting to render, encoding or uploading).
    /// The runner takes messages from the queue only while below this times its devices, so
    /// other runners get the rest.
    #[arg(long, env = "KILN_MAX_IN_FLIGHT", default_value_t = 4)]
    pub max_in_flight: usize,

    /// Fair share across tenants at the intake (`gpu-runner/src/fairness.rs`): a received job
    /// whose tenant already has its share of this runner's slots running or held goes back to
    /// the end of the queue, so the runner reads past one tenant's backlog to the others' jobs.
    /// `false`: jobs start in the order received.
    #[arg(long, env = "KILN_FAIR_SHARE", default_value_t = true, action = clap::ArgAction::Set)]
    pub fair_share: bool,

    /// Most messages sent back to the end of the queue per 10 seconds while reading past a
    /// backlog (in batches of up to 10: a batch send and a batch delete each; 400 is at most 8
    /// SQS calls a second).
    #[arg(long, env = "KILN_SCAN_BUDGET", default_value_t = 400)]
    pub scan_budget: usize,

    /// How long a message sent back to the end of the queue stays invisible, in seconds.
    #[arg(long, env = "KILN_DEFER_SECS", default_value_t = 2)]
    pub defer_secs: u64,

    /// A job for a model version this runner does not serve goes back to the queue for the
    /// runners that do (a rollout or a canary); once it has waited this long since it was
    /// accepted, in seconds, with none taking it, it fails `model_version_unavailable`.
    /// The default is the API's queued time to live: a canary's jobs may wait long behind a
    /// backlog while its few runners are busy.
    #[arg(long, env = "KILN_UNSERVED_VERSION_WAIT_SECS", default_value_t = 3600)]
    pub unserved_version_wait_secs: u64,

    /// How often the runner reports its capacity per model (slots, busy, speed) to the fleet
    /// board the API's queue estimates read, in seconds; 0: never.
    #[arg(long, env = "KILN_FLEET_REPORT_SECS", default_value_t = 10)]
    pub fleet_report_secs: u64,

    /// Long-poll wait of one receive, in seconds (SQS allows 0 to 20).
    #[arg(long, env = "KILN_POLL_WAIT_SECS", default_value_t = 20)]
    pub poll_wait_secs: u64,

    /// How long a received message stays hidden from other runners; renewed by the heartbeat.
    /// A runner that dies leaves its job to another runner after this long.
    #[arg(long, env = "KILN_LEASE_SECS", default_value_t = 60)]
    pub lease_secs: u64,

    /// How often a working job renews its message's lease, in seconds (well under the lease).
    #[arg(long, env = "KILN_HEARTBEAT_SECS", default_value_t = 20)]
    pub heartbeat_secs: u64,

    /// Least time between two progress writes of one job, in milliseconds; also how soon a
    /// cancel request is noticed.
    #[arg(long, env = "KILN_PROGRESS_INTERVAL_MS", default_value_t = 1000)]
    pub progress_interval_ms: u64,

    /// After SIGTERM or Ctrl-C, how long in-flight jobs may run on before they are stopped and
    /// handed back to the queue, in seconds.
    #[arg(long, env = "KILN_SHUTDOWN_DEADLINE_SECS", default_value_t = 30)]
    pub shutdown_deadline_secs: u64,

    /// Delay before a transiently failed job is tried again, in seconds; doubles with each
    /// delivery up to `retry_max_secs`.
    #[arg(long, env = "KILN_RETRY_BASE_SECS", default_value_t = 5)]
    pub retry_base_secs: u64,

    /// Longest retry delay, in seconds.
    #[arg(long, env = "KILN_RETRY_MAX_SECS", default_value_t = 300)]
    pub retry_max_secs: u64,

    /// Deliveries after which the queue moves a message to its dead-letter queue (the queue's
    /// maxReceiveCount). On that last delivery a transient failure fails the job instead.
    #[arg(long, env = "KILN_MAX_RECEIVES", default_value_t = 5)]
    pub max_receives: u32,

    /// After a render's budget ran out and it was asked to stop, how long to wait for its
    /// session thread before calling it stuck (the job fails `render_timeout`, `/healthz` turns
    /// 503 and the runner takes no more jobs, so the instance is replaced), in seconds.
    #[arg(long, env = "KILN_STUCK_GRACE_SECS", default_value_t = 30)]
    pub stuck_grace_secs: u64,

    /// Address of `/healthz` and `/metrics`.
    #[arg(long, env = "KILN_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
}

impl RunnerConfig {
    /// How each session fills its batches.
    pub fn fill_policy(&self) -> crate::batching::FillPolicy {
        crate::batching::FillPolicy {
            max_batch: self.max_batch.max(1),
            max_queue_delay: Duration::from_millis(self.max_queue_delay_ms),
        }
    }

    /// How models are loaded on `device` (one of [`RunnerConfig::device`]).
    pub fn session_options(&self, device: Device) -> SessionOptions {
        let io_binding = match self.io_binding {
            Toggle::Auto => matches!(device, Device::Cuda(_)),
            Toggle::On => true,
            Toggle::Off => false,
        };
        SessionOptions {
            dylib: self.ort_dylib.clone(),
            device,
            intra_threads: self.intra_threads,
            diffusion: DiffusionOptions {
                max_unet_rows: self.max_unet_rows.max(1),
                io_binding,
                cuda_graphs: if matches!(device, Device::Cuda(_)) { self.cuda_graphs } else { 0 },
            },
            conv_search: self.conv_search,
        }
    }

    pub fn settings(&self) -> Settings {
        let slots = self.max_in_flight.max(1) * self.device.0.len().max(1);
        Settings {
            max_in_flight: slots,
            intake: crate::fairness::IntakeLimits { slots, hold: 2 * slots, fair: self.fair_share },
            scan_budget: self.scan_budget,
            defer_delay: Duration::from_secs(self.defer_secs),
            poll_wait: Duration::from_secs(self.poll_wait_secs.min(20)),
            lease: Duration::from_secs(self.lease_secs.max(1)),
            heartbeat: Duration::from_secs(self.heartbeat_secs.clamp(1, self.lease_secs.max(2) / 2)),
            progress_interval: Duration::from_millis(self.progress_interval_ms.max(50)),
            shutdown_deadline: Duration::from_secs(self.shutdown_deadline_secs),
            retry_base: Duration::from_secs(self.retry_base_secs),
            retry_max: Duration::from_secs(self.retry_max_secs.max(self.retry_base_secs)),
            max_receives: self.max_receives.max(1),
            stuck_grace: Duration::from_secs(self.stuck_grace_secs),
            unserved_wait: Duration::from_secs(self.unserved_version_wait_secs),
        }
    }
}

/// The service's timing and capacity settings, checked and in their units.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_in_flight: usize,
    /// The fair intake: slots (`max_in_flight`) and how many received messages it holds.
    pub intake: crate::fairness::IntakeLimits,
    /// Most messages sent back to the end of the queue per 10 s while reading past a backlog.
    pub scan_budget: usize,
    /// How long a message sent back stays invisible.
    pub defer_delay: Duration,
    pub poll_wait: Duration,
    pub lease: Duration,
    pub heartbeat: Duration,
    pub progress_interval: Duration,
    pub shutdown_deadline: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub max_receives: u32,
    pub stuck_grace: Duration,
    /// How long a job of a version no runner here serves may wait for one that does.
    pub unserved_wait: Duration,
}

impl Settings {
    /// The delay before delivery `receive_count + 1`: base × 2^(count - 1), capped.
    pub fn retry_delay(&self, receive_count: u32) -> Duration {
        let doublings = receive_count.saturating_sub(1).min(16);
        (self.retry_base * 2u32.pow(doublings)).min(self.retry_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: RunnerConfig,
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let cli =
            Cli::parse_from(["runner", "--ort-dylib", "x.so", "--retry-base-secs", "5", "--retry-max-secs", "60"]);
        let settings = cli.config.settings();
        let delays: Vec<u64> = (1..=6).map(|n| settings.retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
    }

    #[test]
    fn the_heartbeat_stays_well_inside_the_lease() {
        let cli = Cli::parse_from(["runner", "--ort-dylib", "x.so", "--lease-secs", "6", "--heartbeat-secs", "20"]);
        assert_eq!(cli.config.settings().heartbeat, Duration::from_secs(3));
        assert!(Cli::try_parse_from(["runner", "--ort-dylib", "x", "--device", "gpu"]).is_err());
        let cuda = Cli::parse_from(["runner", "--ort-dylib", "x", "--device", "cuda:1"]);
        assert_eq!(cuda.config.device, Devices(vec![Device::Cuda(1)]));
    }
}

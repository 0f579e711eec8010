//! The gpu-runner as a child process of the local stack: built with cargo on first use, started
//! against the stack's resources, stopped (SIGTERM) or killed (SIGKILL) on demand.

use anyhow::{Context, bail};
use kiln_aws::Resources;
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::moto::{Tools, die_with_parent, ensure_system_libraries, wait_for_child};

/// Overrides the runner binary (the test command builds it once and passes its path).
pub const RUNNER_BIN_ENV: &str = "KILN_RUNNER_BIN";

/// The runner binary: `$KILN_RUNNER_BIN`, or built now with cargo (in the profile this program
/// was built with) after installing the system libraries it links against.
pub fn runner_binary(root: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(RUNNER_BIN_ENV) {
        return Ok(PathBuf::from(path));
    }
    ensure_system_libraries()?;
    let release = !cfg!(debug_assertions);
    let mut build = crate::cargo_command();
    build.current_dir(root).args(["build", "--quiet", "-p", "kiln-runner", "--bin", "kiln-runner"]);
    if release {
        build.arg("--release");
    }
    eprintln!("kiln: building the gpu-runner");
    if !build.status().context("running cargo build")?.success() {
        bail!("building kiln-runner failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join(if release { "release" } else { "debug" }).join("kiln-runner"))
}

/// How to start a runner.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    pub models_dir: PathBuf,
    pub lease_secs: u64,
    pub heartbeat_secs: u64,
    pub poll_wait_secs: u64,
    pub progress_interval_ms: u64,
    pub shutdown_deadline_secs: u64,
    pub retry_base_secs: u64,
    /// Further environment variables (any `KILN_*` knob of the runner).
    pub env: Vec<(String, String)>,
    /// Where the runner's log goes (None: inherit this process's stderr).
    pub log_file: Option<PathBuf>,
}

impl RunnerOptions {
    pub fn new(models_dir: PathBuf) -> Self {
        Self {
            models_dir,
            lease_secs: 30,
            heartbeat_secs: 10,
            poll_wait_secs: 1,
            progress_interval_ms: 250,
            shutdown_deadline_secs: 10,
            retry_base_secs: 1,
            env: Vec::new(),
            log_file: None,
        }
    }
}

/// A running runner process; killed when dropped.
pub struct RunnerProcess {
    child: Child,
    /// Base URL of its `/healthz` and `/metrics`.
    pub metrics_url: String,
}

impl RunnerProcess {
    /// Starts the runner and waits until `/healthz` answers (its models are loaded).
    pub fn start(binary: &Path, tools: &Tools, resources: &Resources, options: &RunnerOptions) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = Command::new(binary);
        command
            .envs(resources.to_env())
            .env("ORT_DYLIB_PATH", &tools.ort_dylib)
            .env("KILN_MODELS_DIR", &options.models_dir)
            .env("KILN_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("KILN_LEASE_SECS", options.lease_secs.to_string())
            .env("KILN_HEARTBEAT_SECS", options.heartbeat_secs.to_string())
            .env("KILN_POLL_WAIT_SECS", options.poll_wait_secs.to_string())
            .env("KILN_PROGRESS_INTERVAL_MS", options.progress_interval_ms.to_string())
            .env("KILN_SHUTDOWN_DEADLINE_SECS", options.shutdown_deadline_secs.to_string())
            .env("KILN_RETRY_BASE_SECS", options.retry_base_secs.to_string())
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if std::env::var_os("RUST_LOG").is_none() && !options.env.iter().any(|(k, _)| k == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        if let Some(path) = &options.log_file {
            let log = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            command.stdout(log.try_clone()?).stderr(log);
        }
        die_with_parent(&mut command);
        let child = command.spawn().with_context(|| format!("starting {}", binary.display()))?;
        let mut runner = Self { child, metrics_url: format!("http://127.0.0.1:{port}") };
        runner.wait_healthy(Duration::from_secs(60))?;
        Ok(runner)
    }

    fn wait_healthy(&mut self, limit: Duration) -> anyhow::Result<()> {
        let address = self.metrics_url.trim_start_matches("http://").to_owned();
        let healthy = || {
            use std::io::{Read, Write};
            let Ok(mut stream) = std::net::TcpStream::connect(&address) else { return false };
            let _ = stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200")
        };
        wait_for_child(&mut self.child, limit, "the runner (see its log)", healthy)
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM: the runner stops polling and finishes or hands back its jobs.
    pub fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// SIGKILL: the runner dies mid-job, as on a crash or a lost instance.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit; None if it is still running after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, limit)
    }
}

/// Waits for a child process to exit (and reaps it); None if it still runs after `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

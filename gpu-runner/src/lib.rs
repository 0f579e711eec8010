//! The gpu-runner: drains the job queue, renders each job with its model's ONNX pipeline,
//! encodes the frames, stores the artifact and records the result.
//!
//! - [`service`]: the queue loop and one job's life (start, heartbeat, progress, cancel, end).
//! - [`session`]: one OS thread per loaded model and device; [`batching`] picks what renders
//!   together, [`placement`] which device's session a job goes to.
//! - [`render`]: ONNX Runtime and the pipelines; [`packages`] loads model packages.
//! - [`encode`]: PNG, GIF, MP4 (H.264) and WebM (VP9), on the blocking pool.
//! - [`metrics`]: Prometheus metrics, `/healthz` and `/metrics`.
//! - [`warm_up`]: one render per model before the first job.

pub mod batching;
pub mod config;
pub mod encode;
pub mod fairness;
pub mod fleet;
pub mod metrics;
pub mod packages;
pub mod placement;
pub mod render;
pub mod service;
pub mod session;
pub mod warm_up;

pub use config::{RunnerConfig, Settings};
pub use metrics::Metrics;
pub use service::{Ports, Runner};
pub use warm_up::{WarmedUp, warm_up};

use std::sync::Arc;

/// Loads every model package on every device and starts a session thread for each pair.
pub fn start_sessions(
    config: &RunnerConfig,
    metrics: &Arc<Metrics>,
) -> Result<
    (Vec<kiln_domain::ModelSpec>, Vec<session::SessionHandle>, Vec<std::thread::JoinHandle<()>>),
    packages::PackageError,
> {
    let mut specs = Vec::new();
    let mut handles = Vec::new();
    let mut threads = Vec::new();
    for (index, device) in config.device.0.iter().enumerate() {
        for model in packages::load_all(&config.models_dir, &config.session_options(*device))? {
            let (mut handle, thread) = session::spawn(
                model.spec.name.clone(),
                model.spec.version.clone(),
                *device,
                model.pipeline,
                config.fill_policy(),
                metrics.clone(),
            );
            handle.budget = model.spec.render_budget;
            handle.cost = model.spec.cost;
            if index == 0 {
                specs.push(model.spec);
            }
            handles.push(handle);
            threads.push(thread);
        }
    }
    Ok((specs, handles, threads))
}

//! The local stack: the moto server on 127.0.0.1 standing in for AWS (installed into the
//! project's `.venv` on first use), the data layer terraform creates, the model catalog, a dev
//! tenant, and the API functions served over HTTP by the same handler code Lambda runs.

pub mod faults;
pub mod moto;
pub mod relays;
pub mod runner;
pub mod server;
pub mod stack;

pub use faults::{FaultCounts, FaultKind, FaultPlan, FaultProxy, Service};
pub use moto::{MotoServer, Tools, ensure_browser, ensure_system_libraries, ensure_tools};
pub use runner::{RunnerOptions, RunnerProcess, runner_binary, wait_exit};
pub use stack::{LocalStack, StackOptions, cargo_command, workspace_root};

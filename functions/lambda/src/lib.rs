//! Running kiln's functions on Lambda. Every function binary is a line calling [`serve`] (an
//! event function) or [`serve_http`] (an API function): JSON logs, the typed configuration
//! read from the environment, the state built once, then the runtime loop. SQS-triggered
//! functions hand their event to [`sqs::handle_event`].

pub mod config;
pub mod emf;
pub mod sqs;

pub use config::FunctionConfig;
pub use lambda_runtime::{Error, LambdaEvent};

use serde::{Serialize, de::DeserializeOwned};
use std::{future::Future, sync::Arc};

/// Logs as JSON lines for CloudWatch, each with its span's fields (the job id, the request);
/// `RUST_LOG` picks the levels: `info` (the default), or `warn,kiln_app=debug` and the like.
/// Read as plain `target=level` directives (`Targets`), not `EnvFilter`'s, whose span and
/// field matching needs a regex engine that would double a small function's size.
pub fn init_tracing() {
    use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let logs = tracing_subscriber::fmt::layer().json().with_current_span(true).with_span_list(false).without_time();
    let _ = tracing_subscriber::registry().with(logs).with(filter).try_init();
}

/// The start-up every function shares: logs, then its configuration `C` from the environment
/// (a missing or malformed variable fails the init phase, naming it), then its state.
async fn start<C, S>(name: &'static str, setup: impl AsyncFnOnce(C) -> anyhow::Result<S>) -> Result<Arc<S>, Error>
where
    C: clap::Parser,
{
    init_tracing();
    let config = C::try_parse_from([name])?;
    let state = setup(config).await.map_err(|err| format!("{name}: {err:#}"))?;
    tracing::info!(function = name, "initialized");
    Ok(Arc::new(state))
}

/// The whole `main` of an event function: [`start`], then each event to `handler` with the
/// state. An `Err` from the handler fails the invocation (Lambda retries it as the trigger
/// says); per-record failures are the handler's answer instead (see [`sqs::handle_batch`]).
pub async fn serve<C, S, A, R, Fut>(
    name: &'static str,
    setup: impl AsyncFnOnce(C) -> anyhow::Result<S>,
    handler: impl Fn(Arc<S>, LambdaEvent<A>) -> Fut,
) -> Result<(), Error>
where
    C: clap::Parser,
    A: DeserializeOwned,
    R: Serialize,
    Fut: Future<Output = Result<R, Error>>,
{
    let state = start(name, setup).await?;
    lambda_runtime::run(lambda_runtime::service_fn(move |event| handler(state.clone(), event))).await
}

/// The whole `main` of an API function: [`start`], then each request to `handler` with the
/// state. The handler answers every request (errors are responses), so it cannot fail.
pub async fn serve_http<C, S, Fut>(
    name: &'static str,
    setup: impl AsyncFnOnce(C) -> anyhow::Result<S>,
    handler: impl Fn(Arc<S>, lambda_http::Request) -> Fut,
) -> Result<(), Error>
where
    C: clap::Parser,
    Fut: Future<Output = lambda_http::Response<lambda_http::Body>> + Send,
{
    let state = start(name, setup).await?;
    lambda_http::run(lambda_http::service_fn(move |request| {
        let answer = handler(state.clone(), request);
        async move { Ok::<_, std::convert::Infallible>(answer.await) }
    }))
    .await
}

/// The context of an invocation made outside Lambda (the local stack's relays, tests): a
/// function with `timeout` to answer, starting now.
pub fn local_context(timeout: std::time::Duration) -> lambda_runtime::Context {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut context = lambda_runtime::Context::default();
    context.request_id = format!("local-{now_ms}");
    context.deadline = now_ms + timeout.as_millis() as u64;
    context
}

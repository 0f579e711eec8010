//! Running an API function on Lambda: tracing, configuration, clients, then the runtime loop.

use clap::Parser;
use lambda_http::{Error, service_fn};
use std::{convert::Infallible, sync::Arc};

use crate::{Api, ApiConfig, Function};

/// Logs as JSON lines for CloudWatch; `RUST_LOG` picks the level (default info).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().json().with_env_filter(filter).with_current_span(true).without_time().try_init();
}

/// The whole `main` of an API function.
pub async fn run(function: Function) -> Result<(), Error> {
    init_tracing();
    let config = ApiConfig::try_parse_from(["kiln-api"])?;
    let api = Arc::new(Api::from_config(&config).await);
    lambda_http::run(service_fn(move |request| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(api.handle(function, request).await) }
    }))
    .await
}

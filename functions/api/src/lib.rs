//! The HTTP API as Lambda handlers. Every route is served by the same [`Api::handle`], whether
//! the request came from API Gateway (through `lambda_http`) or from the local HTTP server.
//! Each Lambda function (one binary under `src/bin/`) serves one [`Function`]'s routes.

pub mod config;
pub mod dead_letters;
pub mod error;
pub mod lambda;
pub mod routes;
pub mod sweeper;
pub mod views;

pub use config::ApiConfig;
pub use routes::{Api, Function, Route};

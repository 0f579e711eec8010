//! The HTTP API as Lambda handlers. Every route is served by the same [`Api::handle`], whether
//! the request came from API Gateway (through `lambda_http`) or from the local HTTP server.
//! Each API function (one binary under `src/bin/`) serves one [`Function`]'s routes, on the
//! ports [`wiring`] gives it. The functions that are not HTTP are in `kiln-events`.

pub mod admin;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod wiring;

pub use routes::{Api, Function, Route};

use kiln_app::Ports;
use kiln_aws::AwsPorts;
use kiln_lambda::FunctionConfig;

/// The whole `main` of an API function: the shared start-up, then every request to
/// [`Api::handle`] for `function`'s routes, on the ports `wire` gives it.
pub async fn serve(function: Function, wire: fn(&AwsPorts) -> Ports) -> Result<(), kiln_lambda::Error> {
    let setup = async move |config: FunctionConfig| {
        let aws = AwsPorts::for_lambda(&config.resources);
        Ok(Api::new(&wire(&aws), &config))
    };
    kiln_lambda::serve_http(
        function.name(),
        setup,
        move |api, request| async move { api.handle(function, request).await },
    )
    .await
}

//! Lambda function: the `cancel-job` route of the HTTP API.

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    kiln_api::serve(kiln_api::Function::CancelJob, kiln_api::wiring::cancel_job).await
}

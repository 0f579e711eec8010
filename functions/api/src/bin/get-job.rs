//! Lambda function: the `get-job` route of the HTTP API.

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    kiln_api::serve(kiln_api::Function::GetJob, kiln_api::wiring::get_job).await
}

//! Lambda function: the `submit-job` route of the HTTP API.

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    kiln_api::serve(kiln_api::Function::SubmitJob, kiln_api::wiring::submit_job).await
}

//! Lambda function: the `list-jobs` route of the HTTP API.

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    kiln_api::serve(kiln_api::Function::ListJobs, kiln_api::wiring::list_jobs).await
}

//! Lambda function: the `get-usage` route of the HTTP API.

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    kiln_api::serve(kiln_api::Function::GetUsage, kiln_api::wiring::get_usage).await
}

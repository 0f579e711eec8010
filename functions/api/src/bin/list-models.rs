//! Lambda function: the `list-models` route of the HTTP API.

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    kiln_api::serve(kiln_api::Function::ListModels, kiln_api::wiring::list_models).await
}

//! Lambda function: the `webhook-secret` routes of the HTTP API.

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    kiln_api::serve(kiln_api::Function::WebhookSecret, kiln_api::wiring::webhook_secret).await
}

//! Lambda function: the `webhook-secret` routes of the HTTP API.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    kiln_api::lambda::run(kiln_api::Function::WebhookSecret).await
}

//! Lambda function: the `create-upload` routes of the HTTP API.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    kiln_api::lambda::run(kiln_api::Function::CreateUpload).await
}

//! Lambda function: the `create-upload` routes of the HTTP API.

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    kiln_api::serve(kiln_api::Function::CreateUpload, kiln_api::wiring::create_upload).await
}

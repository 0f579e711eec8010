//! Lambda function: an object created under `inbox/` in the bucket (S3 event) → a job.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kiln_api::inbox::run().await
}

//! Lambda function: deliver the job events waiting on the webhook queue (SQS), signed, with retries.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kiln_api::deliver::run().await
}

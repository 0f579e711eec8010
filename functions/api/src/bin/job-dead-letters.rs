//! Lambda function: fail the jobs whose messages reached the job queue's dead-letter queue (SQS).

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kiln_api::dead_letters::run().await
}

//! Lambda function: the jobs table's DynamoDB stream → webhook events and inbox outboxes.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kiln_api::job_events::run().await
}

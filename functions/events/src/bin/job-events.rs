//! Lambda function: the jobs table's DynamoDB stream → webhook events and inbox outboxes.

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    use kiln_events::job_events::{handle, setup};
    kiln_lambda::serve("job-events", setup, handle).await
}

//! Lambda function: fail the jobs whose messages reached the job queue's dead-letter queue (SQS).

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    use kiln_events::job_dead_letters::{handle, setup};
    kiln_lambda::serve("job-dead-letters", setup, handle).await
}

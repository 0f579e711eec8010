//! Lambda function: deliver the job events waiting on the webhook queue (SQS), signed, with retries.

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    use kiln_events::deliver_webhooks::{handle, setup};
    kiln_lambda::serve("deliver-webhooks", setup, handle).await
}

//! Lambda function: expire queued jobs past their time to live (EventBridge schedule).

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    use kiln_events::expire_jobs::{handle, setup};
    kiln_lambda::serve("expire-jobs", setup, handle).await
}

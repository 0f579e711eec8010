//! Lambda function: expire queued jobs past their time to live (EventBridge schedule).

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kiln_api::sweeper::run().await
}

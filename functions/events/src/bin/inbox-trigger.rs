//! Lambda function: an object created under inbox/ in the bucket (S3 event) → a job.

#[tokio::main]
async fn main() -> Result<(), kiln_lambda::Error> {
    use kiln_events::inbox_trigger::{handle, setup};
    kiln_lambda::serve("inbox-trigger", setup, handle).await
}

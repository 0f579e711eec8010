//! The job queue on SQS.

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use kiln_app::{
    JobMessage,
    ports::{JobQueue, PortError},
};

use crate::unavailable;

#[derive(Clone)]
pub struct SqsJobQueue {
    client: Client,
    queue_url: String,
}

impl SqsJobQueue {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self { client, queue_url: queue_url.into() }
    }
}

#[async_trait]
impl JobQueue for SqsJobQueue {
    async fn enqueue(&self, message: &JobMessage) -> Result<(), PortError> {
        let body = serde_json::to_string(message).map_err(unavailable("sqs"))?;
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .map_err(unavailable("sqs"))?;
        Ok(())
    }
}

//! Writing artifacts to the S3 bucket.

use async_trait::async_trait;
use aws_sdk_s3::{Client, primitives::ByteStream};
use kiln_app::ports::{ArtifactStore, PortError};

use crate::unavailable;

#[derive(Clone)]
pub struct S3ArtifactStore {
    client: Client,
    bucket: String,
}

impl S3ArtifactStore {
    pub fn new(client: Client, bucket: impl Into<String>) -> Self {
        Self { client, bucket: bucket.into() }
    }
}

#[async_trait]
impl ArtifactStore for S3ArtifactStore {
    async fn put(&self, key: &str, content_type: &str, body: bytes::Bytes) -> Result<(), PortError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(unavailable("s3"))?;
        Ok(())
    }
}

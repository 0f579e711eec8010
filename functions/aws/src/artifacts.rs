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

    async fn delete(&self, key: &str) -> Result<(), PortError> {
        self.client.delete_object().bucket(&self.bucket).key(key).send().await.map_err(unavailable("s3"))?;
        Ok(())
    }
}

/// Reading and copying objects in the bucket: the S3 inbox and the outbox.
#[async_trait]
impl kiln_app::ports::ObjectStore for S3ArtifactStore {
    async fn get(
        &self,
        key: &str,
        version: Option<&str>,
        limit: usize,
    ) -> Result<Option<bytes::Bytes>, kiln_app::ports::ObjectError> {
        use kiln_app::ports::ObjectError;
        let result = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .send()
            .await;
        let output = match result {
            Ok(output) => output,
            Err(err) if err.as_service_error().is_some_and(|e| e.is_no_such_key()) => return Ok(None),
            Err(err) => return Err(PortError::unavailable("s3", err).into()),
        };
        if output.content_length.is_some_and(|length| length as usize > limit) {
            return Err(ObjectError::TooLarge { limit });
        }
        let mut body = output.body;
        let mut bytes = Vec::new();
        while let Some(chunk) = body.try_next().await.map_err(|err| PortError::unavailable("s3", err))? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > limit {
                return Err(ObjectError::TooLarge { limit });
            }
        }
        Ok(Some(bytes.into()))
    }

    async fn copy(&self, from: &str, to: &str) -> Result<(), PortError> {
        self.client
            .copy_object()
            .bucket(&self.bucket)
            .copy_source(format!("{}/{}", self.bucket, from))
            .key(to)
            .send()
            .await
            .map_err(unavailable("s3"))?;
        Ok(())
    }
}

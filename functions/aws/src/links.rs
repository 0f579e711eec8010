//! Presigned S3 download links. Signing is local: no call to S3.

use async_trait::async_trait;
use aws_sdk_s3::{Client, presigning::PresigningConfig};
use chrono::Utc;
use kiln_app::ports::{ArtifactLinks, PortError, PresignedUrl};
use std::time::Duration;

use crate::unavailable;

#[derive(Clone)]
pub struct S3ArtifactLinks {
    client: Client,
    bucket: String,
}

impl S3ArtifactLinks {
    pub fn new(client: Client, bucket: impl Into<String>) -> Self {
        Self { client, bucket: bucket.into() }
    }
}

#[async_trait]
impl ArtifactLinks for S3ArtifactLinks {
    async fn presign_get(&self, key: &str, valid_for: Duration) -> Result<PresignedUrl, PortError> {
        let config = PresigningConfig::expires_in(valid_for).map_err(unavailable("s3"))?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(unavailable("s3"))?;
        let expires_at = Utc::now() + chrono::Duration::from_std(valid_for).unwrap_or_default();
        Ok(PresignedUrl { url: request.uri().to_owned(), expires_at })
    }

    /// A presigned PUT for `key` (the S3 inbox: a tenant uploads a job spec to its own prefix
    /// without holding any AWS credentials). `Content-Length` is among the signed headers, so
    /// S3 refuses a body of any other size.
    async fn presign_put(
        &self,
        key: &str,
        content_type: &str,
        content_length: u64,
        valid_for: Duration,
    ) -> Result<PresignedUrl, PortError> {
        let config = PresigningConfig::expires_in(valid_for).map_err(unavailable("s3"))?;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .content_length(i64::try_from(content_length).unwrap_or(i64::MAX))
            .presigned(config)
            .await
            .map_err(unavailable("s3"))?;
        let expires_at = Utc::now() + chrono::Duration::from_std(valid_for).unwrap_or_default();
        Ok(PresignedUrl { url: request.uri().to_owned(), expires_at })
    }
}

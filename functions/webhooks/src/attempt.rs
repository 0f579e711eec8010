//! What one delivery attempt is asked to do and what came of it: the plain data that the
//! sender produces and the retry schedule and the delivery use case read. No I/O here, so
//! code that only decides (kiln-app) can use it without the HTTP client.

use crate::secret::Secret;
use bytes::Bytes;
use std::time::Duration;

/// How long an attempt's error text may be, in characters.
pub const MAX_ERROR_CHARS: usize = 300;

/// One message to deliver (once; retries are the caller's, on the [`RetrySchedule`]).
///
/// There is no timestamp: each attempt is stamped and signed when it is sent, since receivers
/// refuse timestamps older than a few minutes and a retry may come hours later.
///
/// [`RetrySchedule`]: crate::RetrySchedule
#[derive(Debug, Clone)]
pub struct DeliveryRequest {
    /// The tenant's endpoint.
    pub url: String,
    /// The message id (`webhook-id`), the same on every attempt so receivers can deduplicate.
    pub message_id: String,
    /// The JSON body, sent as is.
    pub body: Bytes,
    /// The tenant's active secrets; the message is signed with each.
    pub secrets: Vec<Secret>,
}

/// What one attempt came to, for the caller's schedule and the attempt log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub outcome: Outcome,
    /// The receiver's status code, if it answered.
    pub status: Option<u16>,
    /// What went wrong, if anything.
    pub failure: Option<Failure>,
    /// A short human-readable account of the failure (at most [`MAX_ERROR_CHARS`]
    /// characters); never the URL, which may carry the tenant's tokens.
    pub error: Option<String>,
    /// From the start of the attempt to its end.
    pub duration: Duration,
}

/// How an attempt ended, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Worth trying again: no answer, a timeout, 5xx, 408 or 429. `after` is the receiver's
    /// `Retry-After` (on 429 and 503, in seconds, capped), a lower bound for the next delay.
    Retry { after: Option<Duration> },
    /// Trying again cannot help: 3xx (redirects are not followed), other 4xx, or a URL or
    /// address that is refused.
    GiveUp,
}

/// What went wrong in an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The URL, the message id or the secrets are unusable.
    InvalidRequest,
    /// The host is, or resolves to, an address webhooks may not reach.
    AddressRefused,
    /// The host name did not resolve (in time).
    Lookup,
    /// No connection, or it broke: refused, reset, TLS failure, connect timeout.
    Connection,
    /// No complete answer within the response timeout.
    Timeout,
    /// The receiver answered with a status other than 2xx.
    Status,
}

//! One delivery attempt: vet the URL and its addresses, sign, `POST`, classify the answer.

use crate::{
    attempt::{Attempt, DeliveryRequest, Failure, MAX_ERROR_CHARS, Outcome},
    guard::{AddressGuard, GuardError, Resolver, SystemResolver},
    signature::{SignError, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP, sign, unix_seconds},
};
use http::{HeaderMap, StatusCode, header};
use std::{
    error::Error as _,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};
use tracing::{Span, field};
use url::Url;

/// How much of a refusing receiver's body goes into the error text, in characters.
const BODY_EXCERPT_CHARS: usize = 160;

/// How deliveries are made. The defaults suit production; local mode sets `allow_http` and
/// `allow_loopback`.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Accept `http://` URLs. Local mode only: otherwise `https://` is required.
    pub allow_http: bool,
    /// Connect to loopback addresses (127.0.0.0/8, ::1). Local mode only; every other
    /// non-public address is refused whatever this says.
    pub allow_loopback: bool,
    /// The limit on resolving the host, and separately on the TCP connection and TLS handshake.
    pub connect_timeout: Duration,
    /// The limit on the whole exchange, from connecting to the end of the (capped) body.
    pub response_timeout: Duration,
    /// How much of a response body is read before the connection is dropped.
    pub max_response_bytes: usize,
    /// The most a receiver's `Retry-After` may ask for; longer asks are cut to this.
    pub max_retry_after: Duration,
    /// The `user-agent` header.
    pub user_agent: String,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            allow_http: false,
            allow_loopback: false,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(15),
            max_response_bytes: 64 * 1024,
            max_retry_after: Duration::from_secs(6 * 60 * 60),
            user_agent: concat!("kiln-webhooks/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// Sends webhooks. Cheap to share: it holds its configuration and the address guard; an HTTP
/// client is built per delivery (see [`WebhookSender::deliver`]).
#[derive(Debug, Clone)]
pub struct WebhookSender<R = SystemResolver> {
    config: SenderConfig,
    guard: AddressGuard<R>,
}

impl WebhookSender {
    /// A sender that resolves names with the system resolver.
    pub fn new(config: SenderConfig) -> Self {
        Self::with_resolver(config, SystemResolver)
    }
}

impl<R: Resolver> WebhookSender<R> {
    /// A sender that resolves names with `resolver` (tests use a fake one).
    pub fn with_resolver(config: SenderConfig, resolver: R) -> Self {
        let guard = AddressGuard::with_resolver(config.allow_loopback, resolver);
        Self { config, guard }
    }

    /// Makes one attempt to deliver `request`, and says what came of it. Never fails: every
    /// problem is an [`Attempt`] with a [`Failure`].
    ///
    /// The host is resolved once, every address it resolves to is vetted by the
    /// [`AddressGuard`], and the attempt's HTTP client is built to connect to that one vetted
    /// address only: its resolver answers the URL's host with it and refuses every other name.
    /// A DNS server that answers differently the second time (DNS rebinding) is never asked a
    /// second time. The URL keeps its host name, so TLS still verifies the certificate
    /// against it and the `Host` header is the tenant's. Proxies from the environment are not
    /// used and redirects are not followed.
    #[tracing::instrument(
        name = "webhook_delivery",
        skip_all,
        fields(message_id = %request.message_id, host = field::Empty, status = field::Empty, outcome = field::Empty)
    )]
    pub async fn deliver(&self, request: &DeliveryRequest) -> Attempt {
        let started = Instant::now();
        let result = self.exchange(request).await;
        let attempt = Attempt::from_result(result, self.config.max_retry_after, started.elapsed());
        let span = Span::current();
        if let Some(status) = attempt.status {
            span.record("status", status);
        }
        span.record("outcome", field::debug(attempt.outcome));
        match &attempt.error {
            None => tracing::info!(duration_ms = attempt.duration.as_millis(), "webhook delivered"),
            Some(error) => tracing::warn!(
                duration_ms = attempt.duration.as_millis(),
                failure = ?attempt.failure,
                error = %error,
                "webhook not delivered"
            ),
        }
        attempt
    }

    async fn exchange(&self, request: &DeliveryRequest) -> Result<Answer, DeliveryError> {
        let url = Url::parse(&request.url).map_err(DeliveryError::InvalidUrl)?;
        match url.scheme() {
            "https" => {}
            "http" if self.config.allow_http => {}
            scheme => return Err(DeliveryError::SchemeNotAllowed(scheme.to_owned())),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(DeliveryError::Credentials);
        }
        let host = url.host_str().filter(|host| !host.is_empty()).ok_or(DeliveryError::NoHost)?.to_owned();
        // Both schemes have a known default port, so this is always `Some`.
        let port = url.port_or_known_default().ok_or(DeliveryError::NoHost)?;
        Span::current().record("host", host.as_str());

        let timestamp = unix_seconds(SystemTime::now());
        let signature = sign(&request.message_id, timestamp, &request.body, &request.secrets)?;

        let address = tokio::time::timeout(self.config.connect_timeout, self.guard.resolve(&host, port))
            .await
            .map_err(|_| DeliveryError::LookupTimeout)??;
        let client = self.pinned_client(&host, address)?;
        let post = client
            .post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(WEBHOOK_ID, &request.message_id)
            .header(WEBHOOK_TIMESTAMP, timestamp.to_string())
            .header(WEBHOOK_SIGNATURE, signature)
            .body(request.body.clone())
            .build()
            .map_err(DeliveryError::Request)?;

        let deadline = tokio::time::Instant::now() + self.config.response_timeout;
        let response = match tokio::time::timeout_at(deadline, client.execute(post)).await {
            Err(_) => return Err(DeliveryError::Timeout),
            Ok(result) => result.map_err(DeliveryError::Request)?,
        };
        let status = response.status();
        let headers = response.headers().clone();
        let excerpt = read_capped(response, deadline, self.config.max_response_bytes).await;
        Ok(Answer { status, headers, excerpt })
    }

    /// An HTTP client that can reach `address` under the name `host`, and nothing else.
    fn pinned_client(&self, host: &str, address: SocketAddr) -> Result<reqwest::Client, DeliveryError> {
        reqwest::Client::builder()
            .dns_resolver(Arc::new(PinnedResolver { host: host.to_owned(), address }))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .https_only(!self.config.allow_http)
            .connect_timeout(self.config.connect_timeout)
            .pool_max_idle_per_host(0)
            .user_agent(&self.config.user_agent)
            .build()
            .map_err(DeliveryError::Client)
    }
}

/// The only resolver of a delivery's client: the vetted address for the URL's host, an error
/// for any other name. (An IP-literal URL is connected to directly; the guard vetted the literal.)
struct PinnedResolver {
    host: String,
    address: SocketAddr,
}

impl reqwest::dns::Resolve for PinnedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let answer: reqwest::dns::Addrs = Box::new(std::iter::once(self.address));
        let result = if name.as_str().eq_ignore_ascii_case(&self.host) {
            Ok(answer)
        } else {
            Err(format!("{} is not the vetted host", name.as_str()).into())
        };
        Box::pin(std::future::ready(result))
    }
}

/// A receiver's answer: its status, headers, and the start of its body.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    excerpt: String,
}

/// Why an attempt got no answer, or could not be made.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("the webhook URL is invalid: {0}")]
    InvalidUrl(url::ParseError),
    #[error("{0}:// webhook URLs are not allowed; use https://")]
    SchemeNotAllowed(String),
    #[error("the webhook URL must not carry credentials")]
    Credentials,
    #[error("the webhook URL has no host")]
    NoHost,
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error("resolving the host timed out")]
    LookupTimeout,
    #[error("building the HTTP client failed")]
    Client(#[source] reqwest::Error),
    #[error("the request failed")]
    Request(#[source] reqwest::Error),
    #[error("no complete answer within the response timeout")]
    Timeout,
}

impl DeliveryError {
    fn failure(&self) -> Failure {
        match self {
            Self::InvalidUrl(_) | Self::SchemeNotAllowed(_) | Self::Credentials | Self::NoHost | Self::Sign(_) => {
                Failure::InvalidRequest
            }
            Self::Guard(error) if error.is_refusal() => Failure::AddressRefused,
            Self::Guard(_) | Self::LookupTimeout => Failure::Lookup,
            Self::Request(error) if error.is_builder() => Failure::InvalidRequest,
            Self::Request(error) if error.is_timeout() && !error.is_connect() => Failure::Timeout,
            Self::Client(_) | Self::Request(_) => Failure::Connection,
            Self::Timeout => Failure::Timeout,
        }
    }
}

impl Attempt {
    fn from_result(result: Result<Answer, DeliveryError>, max_retry_after: Duration, duration: Duration) -> Self {
        match result {
            Ok(answer) => {
                let outcome = classify(answer.status, &answer.headers, max_retry_after);
                let error = (!answer.status.is_success()).then(|| {
                    let excerpt: String = answer.excerpt.chars().take(BODY_EXCERPT_CHARS).collect();
                    shorten(format!("HTTP {}: {}", answer.status, excerpt.trim()))
                });
                Self {
                    outcome,
                    status: Some(answer.status.as_u16()),
                    failure: error.is_some().then_some(Failure::Status),
                    error,
                    duration,
                }
            }
            Err(error) => {
                let failure = error.failure();
                let outcome = match failure {
                    Failure::InvalidRequest | Failure::AddressRefused => Outcome::GiveUp,
                    Failure::Lookup | Failure::Connection | Failure::Timeout | Failure::Status => {
                        Outcome::Retry { after: None }
                    }
                };
                Self { outcome, status: None, failure: Some(failure), error: Some(shorten(describe(&error))), duration }
            }
        }
    }
}

/// The outcome of an answer with `status`.
fn classify(status: StatusCode, headers: &HeaderMap, max_retry_after: Duration) -> Outcome {
    match status.as_u16() {
        200..=299 => Outcome::Delivered,
        429 | 503 => Outcome::Retry { after: retry_after(headers).map(|after| after.min(max_retry_after)) },
        408 | 500..=599 => Outcome::Retry { after: None },
        _ => Outcome::GiveUp,
    }
}

/// `Retry-After` in seconds. The HTTP-date form is ignored: the schedule's own delay stands.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    text.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Reads the body until it ends, `limit` bytes have arrived, or `deadline` passes, and returns
/// the start of it as text. The rest is never read: the connection is dropped with the response.
async fn read_capped(mut response: reqwest::Response, deadline: tokio::time::Instant, limit: usize) -> String {
    let mut excerpt = Vec::new();
    let mut received = 0;
    while received < limit {
        let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, response.chunk()).await else {
            break;
        };
        received += chunk.len();
        // Four bytes per character at most, so this is enough for the excerpt.
        let room = (BODY_EXCERPT_CHARS * 4).saturating_sub(excerpt.len());
        excerpt.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    String::from_utf8_lossy(&excerpt).into_owned()
}

/// An error and its causes, `: `-separated, without the URL (reqwest would print it, and it may
/// carry the tenant's tokens).
fn describe(error: &DeliveryError) -> String {
    let mut text = error.to_string();
    let mut source = match error {
        DeliveryError::Client(inner) | DeliveryError::Request(inner) => inner.source(),
        other => other.source(),
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `text` cut to [`MAX_ERROR_CHARS`] characters.
fn shorten(text: String) -> String {
    match text.char_indices().nth(MAX_ERROR_CHARS) {
        None => text,
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(retry_after: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn classifies_statuses() {
        let cap = Duration::from_secs(3600);
        let outcome = |status: u16| classify(StatusCode::from_u16(status).unwrap(), &headers(None), cap);
        for status in [200, 201, 202, 204, 299] {
            assert_eq!(outcome(status), Outcome::Delivered, "{status}");
        }
        for status in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(outcome(status), Outcome::Retry { after: None }, "{status}");
        }
        for status in [100, 101, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 410, 413, 422] {
            assert_eq!(outcome(status), Outcome::GiveUp, "{status}");
        }
    }

    #[test]
    fn honours_retry_after_seconds_on_429_and_503_only_and_caps_them() {
        let cap = Duration::from_secs(3600);
        let outcome =
            |status: u16, value: &str| classify(StatusCode::from_u16(status).unwrap(), &headers(Some(value)), cap);
        let after = |secs| Outcome::Retry { after: Some(Duration::from_secs(secs)) };
        assert_eq!(outcome(429, "120"), after(120));
        assert_eq!(outcome(503, " 7 "), after(7));
        assert_eq!(outcome(503, "999999"), after(3600));
        assert_eq!(outcome(503, "Wed, 21 Oct 2015 07:28:00 GMT"), Outcome::Retry { after: None });
        assert_eq!(outcome(503, "-5"), Outcome::Retry { after: None });
        assert_eq!(outcome(500, "120"), Outcome::Retry { after: None });
        assert_eq!(outcome(200, "120"), Outcome::Delivered);
    }

    #[test]
    fn error_texts_are_short() {
        let long = "é".repeat(MAX_ERROR_CHARS * 2);
        let short = shorten(long);
        assert_eq!(short.chars().count(), MAX_ERROR_CHARS + 1);
        assert!(short.ends_with('…'));
        assert_eq!(shorten("fine".to_owned()), "fine");
    }

    #[test]
    fn refusals_and_bad_requests_give_up_while_lookups_retry() {
        let attempt = |error| Attempt::from_result(Err(error), Duration::ZERO, Duration::ZERO);
        let refused = attempt(DeliveryError::SchemeNotAllowed("ftp".into()));
        assert_eq!((refused.outcome, refused.failure), (Outcome::GiveUp, Some(Failure::InvalidRequest)));
        assert_eq!(refused.error.as_deref(), Some("ftp:// webhook URLs are not allowed; use https://"));
        let lookup = attempt(DeliveryError::LookupTimeout);
        assert_eq!((lookup.outcome, lookup.failure), (Outcome::Retry { after: None }, Some(Failure::Lookup)));
        let unsigned = attempt(DeliveryError::Sign(SignError::NoSecrets));
        assert_eq!((unsigned.outcome, unsigned.failure), (Outcome::GiveUp, Some(Failure::InvalidRequest)));
    }
}

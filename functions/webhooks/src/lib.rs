//! Job webhooks: how one is signed, sent, classified and retried. No AWS: the consumer that
//! drains the webhook queue calls [`WebhookSender::deliver`] once per message and asks the
//! [`RetrySchedule`] what to do next.
//!
//! - [`Secret`]: a tenant's signing secret, `whsec_<base64>`.
//! - [`sign`] / [`verify`]: [Standard Webhooks](https://www.standardwebhooks.com/) signatures.
//! - [`Attempt`], [`DeliveryRequest`]: one attempt's request and result, plain data.
//! - `AddressGuard`: the SSRF guard, applied to what DNS returned.
//! - `WebhookSender` (feature `sender`, on by default): one attempt, pinned to the vetted address → an [`Attempt`].
//! - [`RetrySchedule`]: exponential backoff with jitter, spanning most of a day by default.
//!
//! # What a receiver gets
//!
//! ```text
//! POST /your/endpoint HTTP/1.1
//! content-type: application/json
//! webhook-id: msg_p5jXN8AQM9LWM0D4loKWxJek
//! webhook-timestamp: 1614265330
//! webhook-signature: v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=
//!
//! {"test": 2432232314}
//! ```
//!
//! (The Standard Webhooks test vector: that is the signature for the secret
//! `whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw`, so a receiver can check its code against it.)
//!
//! `webhook-signature` is `v1,` and the base64 of HMAC-SHA256, keyed by the base64-decoded part
//! of the secret after `whsec_`, over `{webhook-id}.{webhook-timestamp}.{raw body}`. While a
//! secret is being rotated the header carries one signature per active secret, separated by
//! spaces; accept the request if any `v1` one matches. `webhook-id` stays the same across
//! retries (deduplicate on it); `webhook-timestamp` is the attempt's, so refuse one more than
//! five minutes from your clock to stop replays. Verify the raw bytes of the body, before any
//! JSON parsing, and compare signatures in constant time. Any Standard Webhooks library does
//! all of this.
//!
//! # Verifying, in Python
//!
//! ```python
//! import base64, hashlib, hmac, time
//!
//! def verify(secret: str, headers, body: bytes, tolerance: int = 300) -> bool:
//!     """True if the request is ours; answer 401 otherwise. `body` is the raw bytes."""
//!     key = base64.b64decode(secret.removeprefix("whsec_"))
//!     msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
//!     if abs(time.time() - int(timestamp)) > tolerance:
//!         return False
//!     signed = f"{msg_id}.{timestamp}.".encode() + body
//!     expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
//!     return any(
//!         version == "v1" and hmac.compare_digest(signature, expected)
//!         for version, _, signature in (entry.partition(",") for entry in headers["webhook-signature"].split())
//!     )
//! ```
//!
//! # Verifying, in Rust
//!
//! With this crate (or the `standardwebhooks` crate, whose `Webhook::verify` does the same):
//!
//! ```
//! use kiln_webhooks::{DEFAULT_TOLERANCE, Secret, verify};
//! use std::time::SystemTime;
//!
//! /// Whether to accept a webhook request; answer 401 when not. `raw_body` is the body's bytes.
//! fn accept(headers: &http::HeaderMap, raw_body: &[u8], secret: &Secret) -> bool {
//!     verify(headers, raw_body, secret, DEFAULT_TOLERANCE, SystemTime::now()).is_ok()
//! }
//! # let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
//! # let body = br#"{"type":"job.completed"}"#;
//! # let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
//! # let mut headers = http::HeaderMap::new();
//! # headers.insert("webhook-id", "msg_1".parse().unwrap());
//! # headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
//! # let signature = kiln_webhooks::sign("msg_1", now, body, &[Secret::generate(), secret.clone()]).unwrap();
//! # headers.insert("webhook-signature", signature.parse().unwrap());
//! # assert!(accept(&headers, body, &secret));
//! # assert!(!accept(&headers, br#"{"type":"job.failed"}"#, &secret));
//! # assert!(!accept(&headers, body, &Secret::generate()));
//! ```

mod attempt;
#[cfg(feature = "sender")]
mod guard;
mod schedule;
mod secret;
#[cfg(feature = "sender")]
mod sender;
mod signature;

pub use attempt::{Attempt, DeliveryRequest, Failure, MAX_ERROR_CHARS, Outcome};
#[cfg(feature = "sender")]
pub use guard::{AddressGuard, GuardError, Refused, Resolver, SystemResolver};
pub use schedule::{Jitter, MAX_DELAY, NextStep, RetrySchedule, ScheduleError, jitter_seed};
pub use secret::{GENERATED_KEY_BYTES, MAX_KEY_BYTES, MIN_KEY_BYTES, SECRET_PREFIX, Secret, SecretError};
#[cfg(feature = "sender")]
pub use sender::{SenderConfig, WebhookSender};
pub use signature::{
    DEFAULT_TOLERANCE, MAX_MESSAGE_ID_BYTES, SignError, VerifyError, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
    sign, verify, verify_parts,
};

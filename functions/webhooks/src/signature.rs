//! Standard Webhooks signatures: HMAC-SHA256 over `{id}.{timestamp}.{body}`, sent as
//! `webhook-signature: v1,<base64>` (one entry per active secret, separated by spaces).

use crate::secret::Secret;
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use hmac::{Hmac, KeyInit, Mac};
use http::HeaderMap;
use sha2::Sha256;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The header carrying the message id; the same on every attempt of one message, so a
/// receiver can drop duplicates.
pub const WEBHOOK_ID: &str = "webhook-id";
/// The header carrying the attempt's time, in unix seconds; signed, so it bounds replays.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// The header carrying the signatures: `v1,<base64>`, space-separated.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// How far a receiver should let a timestamp stray from its clock (the specification's 5 min).
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);
/// The longest message id [`sign`] accepts, in bytes.
pub const MAX_MESSAGE_ID_BYTES: usize = 256;

/// The only scheme we sign with; a receiver skips entries of other versions.
const VERSION: &str = "v1";

/// Why a message cannot be signed.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("there is no secret to sign with")]
    NoSecrets,
    /// The id is empty, too long, or has a character other than printable ASCII. A `.` is
    /// refused too: it separates the id from the timestamp in the signed text, so an id with
    /// one could make two different messages sign the same bytes.
    #[error("a message id is 1 to {MAX_MESSAGE_ID_BYTES} printable ASCII characters other than `.`")]
    InvalidMessageId,
}

/// Why a receiver rejects a request.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("the `{0}` header is missing")]
    MissingHeader(&'static str),
    #[error("the `{0}` header is not ASCII text")]
    UnreadableHeader(&'static str),
    #[error("`{WEBHOOK_TIMESTAMP}` is not a whole number of unix seconds")]
    InvalidTimestamp,
    #[error("the timestamp {timestamp} is more than the tolerance away from now ({now})")]
    OutsideTolerance { timestamp: i64, now: i64 },
    #[error("no `v1` signature matches the secret")]
    NoMatchingSignature,
}

/// The `webhook-signature` header value for one message: `v1,<base64>` for each of `secrets`,
/// in order, separated by spaces. Sign with every active secret while a tenant rotates, so
/// receivers holding either the old or the new one accept the message.
///
/// `timestamp` is the time of this attempt (unix seconds), not of the event: receivers refuse
/// timestamps older than their tolerance, so every retry is signed afresh.
pub fn sign(message_id: &str, timestamp: i64, body: &[u8], secrets: &[Secret]) -> Result<String, SignError> {
    check_message_id(message_id)?;
    if secrets.is_empty() {
        return Err(SignError::NoSecrets);
    }
    let signatures: Vec<String> = secrets
        .iter()
        .map(|secret| {
            let digest = signed_content_mac(secret, message_id, timestamp, body).finalize().into_bytes();
            format!("{VERSION},{}", BASE64.encode(digest))
        })
        .collect();
    Ok(signatures.join(" "))
}

/// Checks a request's Standard Webhooks headers and raw body against `secret`: the timestamp
/// must be within `tolerance` of `now` (either way) and one `v1` signature must match.
/// Signatures are compared in constant time. See the crate documentation for a receiver's
/// side in full.
pub fn verify(
    headers: &HeaderMap,
    body: &[u8],
    secret: &Secret,
    tolerance: Duration,
    now: SystemTime,
) -> Result<(), VerifyError> {
    let header = |name: &'static str| {
        headers
            .get(name)
            .ok_or(VerifyError::MissingHeader(name))?
            .to_str()
            .map_err(|_| VerifyError::UnreadableHeader(name))
    };
    verify_parts(
        header(WEBHOOK_ID)?,
        header(WEBHOOK_TIMESTAMP)?,
        header(WEBHOOK_SIGNATURE)?,
        body,
        secret,
        tolerance,
        now,
    )
}

/// [`verify`] for a receiver that holds the three header values as text.
pub fn verify_parts(
    message_id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    secret: &Secret,
    tolerance: Duration,
    now: SystemTime,
) -> Result<(), VerifyError> {
    let timestamp: i64 = timestamp.trim().parse().map_err(|_| VerifyError::InvalidTimestamp)?;
    let now = unix_seconds(now);
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.abs_diff(timestamp) > tolerance.unsigned_abs() {
        return Err(VerifyError::OutsideTolerance { timestamp, now });
    }
    // The body goes through the MAC once; each candidate only costs the final block.
    let expected = signed_content_mac(secret, message_id, timestamp, body);
    let matches = signatures
        .split_ascii_whitespace()
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == VERSION)
        .filter_map(|(_, encoded)| BASE64.decode(encoded).ok())
        .any(|candidate| expected.clone().verify_slice(&candidate).is_ok());
    if matches { Ok(()) } else { Err(VerifyError::NoMatchingSignature) }
}

/// Seconds since the unix epoch; 0 for a clock set before it.
pub(crate) fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| i64::try_from(since.as_secs()).unwrap_or(i64::MAX))
}

fn check_message_id(message_id: &str) -> Result<(), SignError> {
    let valid = !message_id.is_empty()
        && message_id.len() <= MAX_MESSAGE_ID_BYTES
        && message_id.bytes().all(|byte| byte.is_ascii_graphic() && byte != b'.');
    if valid { Ok(()) } else { Err(SignError::InvalidMessageId) }
}

/// The MAC state after `{id}.{timestamp}.{body}`, ready to finalize or verify.
fn signed_content_mac(secret: &Secret, message_id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.key()).expect("HMAC accepts any key length");
    mac.update(message_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn secret(text: &str) -> Secret {
        Secret::parse(text).unwrap()
    }

    fn at(unix: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    }

    fn headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(WEBHOOK_ID, HeaderValue::from_str(id).unwrap());
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from_str(timestamp).unwrap());
        headers.insert(WEBHOOK_SIGNATURE, HeaderValue::from_str(signature).unwrap());
        headers
    }

    /// The test vector the Standard Webhooks and Svix libraries publish (e.g. svix-webhooks'
    /// PHP `testSignFunctionWorks`). Reproduced independently with:
    /// `python3 -c 'import hmac,hashlib,base64; k=base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    /// print(base64.b64encode(hmac.new(k, b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{\"test\": 2432232314}",
    /// hashlib.sha256).digest()).decode())'` → `g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=`.
    #[test]
    fn signs_the_specification_test_vector() {
        let header = sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY, &[secret(SPEC_SECRET)]).unwrap();
        assert_eq!(header, SPEC_SIGNATURE);
    }

    /// The vector of the reference Rust library (standard-webhooks `libraries/rust`, `test_sign`).
    #[test]
    fn signs_the_reference_library_test_vector() {
        let header = sign(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
            &[secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD")],
        )
        .unwrap();
        assert_eq!(header, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn signs_with_every_secret_in_order() {
        let (old, new) = (Secret::generate(), Secret::generate());
        let both = sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY, &[old.clone(), new.clone()]).unwrap();
        let old_only = sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY, &[old]).unwrap();
        let new_only = sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY, &[new]).unwrap();
        assert_eq!(both, format!("{old_only} {new_only}"));
    }

    #[test]
    fn refuses_to_sign_without_a_secret_or_with_an_ambiguous_id() {
        let secrets = [Secret::generate()];
        assert_eq!(sign(SPEC_ID, 1, b"{}", &[]), Err(SignError::NoSecrets));
        for id in ["", "msg.1", "msg 1", "msg\n1", "ü", &"a".repeat(MAX_MESSAGE_ID_BYTES + 1)] {
            assert_eq!(sign(id, 1, b"{}", &secrets), Err(SignError::InvalidMessageId), "{id:?}");
        }
        assert!(sign(&"a".repeat(MAX_MESSAGE_ID_BYTES), 1, b"{}", &secrets).is_ok());
    }

    #[test]
    fn verifies_the_specification_test_vector() {
        let headers = headers(SPEC_ID, &SPEC_TIMESTAMP.to_string(), SPEC_SIGNATURE);
        let now = at(SPEC_TIMESTAMP + 10);
        assert_eq!(verify(&headers, SPEC_BODY, &secret(SPEC_SECRET), DEFAULT_TOLERANCE, now), Ok(()));
    }

    #[test]
    fn rejects_a_wrong_secret_a_tampered_body_or_a_changed_id() {
        let now = at(SPEC_TIMESTAMP);
        let spec_secret = secret(SPEC_SECRET);
        let timestamp = SPEC_TIMESTAMP.to_string();
        let check = |id: &str, body: &[u8], secret: &Secret| {
            verify_parts(id, &timestamp, SPEC_SIGNATURE, body, secret, DEFAULT_TOLERANCE, now)
        };
        assert_eq!(check(SPEC_ID, SPEC_BODY, &Secret::generate()), Err(VerifyError::NoMatchingSignature));
        assert_eq!(check(SPEC_ID, br#"{"test": 2432232315}"#, &spec_secret), Err(VerifyError::NoMatchingSignature));
        assert_eq!(check("msg_other", SPEC_BODY, &spec_secret), Err(VerifyError::NoMatchingSignature));
        // The timestamp is signed too: moving it (within tolerance) breaks the signature.
        let moved = (SPEC_TIMESTAMP + 1).to_string();
        assert_eq!(
            verify_parts(SPEC_ID, &moved, SPEC_SIGNATURE, SPEC_BODY, &spec_secret, DEFAULT_TOLERANCE, now),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn rejects_timestamps_outside_the_tolerance_either_way() {
        let spec_secret = secret(SPEC_SECRET);
        let timestamp = SPEC_TIMESTAMP.to_string();
        let check_at = |now: i64| {
            verify_parts(SPEC_ID, &timestamp, SPEC_SIGNATURE, SPEC_BODY, &spec_secret, DEFAULT_TOLERANCE, at(now))
        };
        assert_eq!(check_at(SPEC_TIMESTAMP + 300), Ok(()));
        assert_eq!(check_at(SPEC_TIMESTAMP - 300), Ok(()));
        assert_eq!(
            check_at(SPEC_TIMESTAMP + 301),
            Err(VerifyError::OutsideTolerance { timestamp: SPEC_TIMESTAMP, now: SPEC_TIMESTAMP + 301 })
        );
        assert!(matches!(check_at(SPEC_TIMESTAMP - 301), Err(VerifyError::OutsideTolerance { .. })));
        assert_eq!(
            verify_parts(
                SPEC_ID,
                "soon",
                SPEC_SIGNATURE,
                SPEC_BODY,
                &spec_secret,
                DEFAULT_TOLERANCE,
                at(SPEC_TIMESTAMP)
            ),
            Err(VerifyError::InvalidTimestamp)
        );
    }

    #[test]
    fn accepts_any_matching_entry_and_skips_other_versions_and_garbage() {
        let spec_secret = secret(SPEC_SECRET);
        let timestamp = SPEC_TIMESTAMP.to_string();
        let encoded = &SPEC_SIGNATURE[3..];
        let check = |signatures: &str| {
            verify_parts(
                SPEC_ID,
                &timestamp,
                signatures,
                SPEC_BODY,
                &spec_secret,
                DEFAULT_TOLERANCE,
                at(SPEC_TIMESTAMP),
            )
        };
        let other = sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY, &[Secret::generate()]).unwrap();
        assert_eq!(check(&format!("{other} {SPEC_SIGNATURE}")), Ok(()));
        assert_eq!(check(&format!("{SPEC_SIGNATURE} {other}")), Ok(()));
        assert_eq!(check(&format!("garbage v1,!!! {SPEC_SIGNATURE}")), Ok(()));
        assert_eq!(check(&other), Err(VerifyError::NoMatchingSignature));
        // The right bytes under another version tag do not count.
        assert_eq!(check(&format!("v1a,{encoded}")), Err(VerifyError::NoMatchingSignature));
        // Nor does a truncated signature.
        assert_eq!(check(&SPEC_SIGNATURE[..SPEC_SIGNATURE.len() - 8]), Err(VerifyError::NoMatchingSignature));
        assert_eq!(check(""), Err(VerifyError::NoMatchingSignature));
    }

    #[test]
    fn names_the_missing_header() {
        let full = headers(SPEC_ID, &SPEC_TIMESTAMP.to_string(), SPEC_SIGNATURE);
        for name in [WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE] {
            let mut partial = full.clone();
            partial.remove(name);
            assert_eq!(
                verify(&partial, SPEC_BODY, &secret(SPEC_SECRET), DEFAULT_TOLERANCE, at(SPEC_TIMESTAMP)),
                Err(VerifyError::MissingHeader(name))
            );
        }
    }
}

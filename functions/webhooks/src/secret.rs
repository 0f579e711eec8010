//! A tenant's webhook signing secret, in the Standard Webhooks text form `whsec_<base64>`.

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use rand::RngCore;
use std::{fmt, str::FromStr};

/// The text every secret starts with.
pub const SECRET_PREFIX: &str = "whsec_";
/// How many random bytes [`Secret::generate`] draws.
pub const GENERATED_KEY_BYTES: usize = 32;
/// The shortest key accepted, in bytes (the Standard Webhooks minimum).
pub const MIN_KEY_BYTES: usize = 24;
/// The longest key accepted, in bytes (the Standard Webhooks maximum).
pub const MAX_KEY_BYTES: usize = 64;

/// An HMAC-SHA256 key that signs a tenant's webhooks.
///
/// Its text form is `whsec_` followed by the standard (padded) base64 of the key; the key is
/// the decoded bytes, not the text. It is deliberately neither `Display` nor `Serialize`, and
/// its `Debug` is redacted, so it cannot reach a log by accident: [`Secret::reveal`] is the one
/// way to get the text back, for storing it or showing it to the tenant once.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

/// Why a text is not a secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("a webhook secret starts with `{SECRET_PREFIX}`")]
    MissingPrefix,
    #[error("a webhook secret is `{SECRET_PREFIX}` and standard base64: {0}")]
    NotBase64(#[from] base64::DecodeError),
    #[error("a webhook secret's key is {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes (got {0})")]
    WrongLength(usize),
}

impl Secret {
    /// A new secret of [`GENERATED_KEY_BYTES`] bytes from the operating system's CSPRNG
    /// (through `rand`'s thread generator, which is seeded from it).
    pub fn generate() -> Self {
        let mut key = vec![0; GENERATED_KEY_BYTES];
        rand::rng().fill_bytes(&mut key);
        Self { key }
    }

    /// Parses `whsec_<base64>`.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text.strip_prefix(SECRET_PREFIX).ok_or(SecretError::MissingPrefix)?;
        Self::from_key(BASE64.decode(encoded)?)
    }

    /// A secret made of these key bytes.
    pub fn from_key(key: Vec<u8>) -> Result<Self, SecretError> {
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
            return Err(SecretError::WrongLength(key.len()));
        }
        Ok(Self { key })
    }

    /// The text form, `whsec_<base64>`. Treat it like a password.
    pub fn reveal(&self) -> String {
        format!("{SECRET_PREFIX}{}", BASE64.encode(&self.key))
    }

    /// The HMAC key.
    pub(crate) fn key(&self) -> &[u8] {
        &self.key
    }
}

impl FromStr for Secret {
    type Err = SecretError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(whsec_…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_have_32_random_bytes_and_round_trip_through_text() {
        let (a, b) = (Secret::generate(), Secret::generate());
        assert_eq!(a.key().len(), GENERATED_KEY_BYTES);
        assert_ne!(a, b, "two generated secrets are equal");
        let text = a.reveal();
        assert!(text.starts_with("whsec_"), "{text}");
        assert_eq!(Secret::parse(&text), Ok(a));
        assert_eq!(text.parse::<Secret>().map(|s| s.reveal()), Ok(text));
    }

    #[test]
    fn parses_the_specification_example_secret() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(secret.key().len(), 24);
        assert_eq!(secret.reveal(), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    }

    #[test]
    fn refuses_texts_that_are_not_secrets() {
        assert_eq!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), Err(SecretError::MissingPrefix));
        assert!(matches!(Secret::parse("whsec_not base64!"), Err(SecretError::NotBase64(_))));
        // 16 bytes: too short to be a key.
        assert_eq!(Secret::parse("whsec_AAAAAAAAAAAAAAAAAAAAAA=="), Err(SecretError::WrongLength(16)));
        assert_eq!(Secret::from_key(vec![7; 65]), Err(SecretError::WrongLength(65)));
        assert!(Secret::from_key(vec![7; 64]).is_ok());
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let secret = Secret::generate();
        let printed = format!("{secret:?}");
        assert!(!printed.contains(&secret.reveal()[SECRET_PREFIX.len()..]), "{printed}");
    }
}

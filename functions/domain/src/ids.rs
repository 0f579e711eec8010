//! Identifiers. Job ids are ULIDs: time-ordered, so "newest first" is a sort on the id.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use ulid::Ulid;

/// An id that failed to parse; the message says what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(String);

/// A job's id: a ULID in its canonical 26-character upper-case form.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// A new id whose time part is `now`; ids created later sort after it.
    pub fn generate(now: DateTime<Utc>) -> Self {
        Self(Ulid::from_datetime(now.into()).to_string())
    }

    /// Parses a client-supplied id (any case); anything that is not a ULID is rejected.
    pub fn parse(text: &str) -> Result<Self, InvalidId> {
        Ulid::from_string(text).map(|ulid| Self(ulid.to_string())).map_err(|_| {
            InvalidId(format!("`{}` is not a job id (26 characters, Crockford base32)", truncate(text, 40)))
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = InvalidId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> Self {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant's id: 1 to 64 of `a-z 0-9 - _`, so it can stand in S3 prefixes and key names as is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(text: &str) -> Result<Self, InvalidId> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(InvalidId(format!(
                "`{}` is not a tenant id (1 to 64 characters of a-z, 0-9, '-' and '_')",
                truncate(text, 70)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = InvalidId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<TenantId> for String {
    fn from(id: TenantId) -> Self {
        id.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn job_ids_sort_by_creation_time() {
        let earlier = JobId::generate(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
        let later = JobId::generate(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 1).unwrap());
        assert!(earlier < later);
    }

    #[test]
    fn job_id_parse_is_case_insensitive_and_canonical() {
        let id = JobId::generate(Utc::now());
        let lower = id.as_str().to_lowercase();
        assert_eq!(JobId::parse(&lower).unwrap(), id);
        assert!(JobId::parse("not-a-ulid").is_err());
        assert!(JobId::parse("").is_err());
    }

    #[test]
    fn tenant_ids_are_restricted_to_safe_characters() {
        assert!(TenantId::parse("acme-co_1").is_ok());
        for bad in ["", "Acme", "a/b", "a b", "../x", &"x".repeat(65)] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}

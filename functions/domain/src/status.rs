//! Job statuses and the transitions between them.
//!
//! queued → running → succeeded | failed | canceled; queued → canceled | expired | failed.
//! A running job whose worker died is taken again by the next worker (running → running, with
//! the attempt count raised). The store enforces these with conditional writes, so two writers
//! racing on one job can never both win.

use serde::{Deserialize, Serialize};
use std::{fmt, str::FromStr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Accepted and waiting in the job queue.
    Queued,
    /// A runner has taken it.
    Running,
    /// Rendered; outputs are available.
    Succeeded,
    /// Ended with an error (see the job's `error`).
    Failed,
    /// Canceled by the client.
    Canceled,
    /// Not started within its time to live.
    Expired,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] =
        [Self::Queued, Self::Running, Self::Succeeded, Self::Failed, Self::Canceled, Self::Expired];

    /// Terminal statuses never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled | Self::Expired)
    }

    /// Whether a job in `self` may move to `next`.
    pub fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Queued, Running | Canceled | Expired | Failed) | (Running, Running | Succeeded | Failed | Canceled)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Expired => "expired",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was not one of the statuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a status (one of queued, running, succeeded, failed, canceled, expired)")]
pub struct UnknownStatus(pub String);

impl FromStr for JobStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.chars().take(40).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::{self, *};

    #[test]
    fn transition_table() {
        // Every pair, with the ones that are allowed listed explicitly.
        let allowed = [
            (Queued, Running),
            (Queued, Canceled),
            (Queued, Expired),
            (Queued, Failed),
            (Running, Running),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Canceled),
        ];
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                assert_eq!(from.can_become(to), allowed.contains(&(from, to)), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn terminal_statuses_have_no_way_out() {
        for from in JobStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            assert!(JobStatus::ALL.iter().all(|to| !from.can_become(*to)), "{from} can change");
        }
    }

    #[test]
    fn parses_its_own_names() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), status);
        }
        assert!("done".parse::<JobStatus>().is_err());
    }
}

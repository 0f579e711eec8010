//! Webhooks, the parts that are ours to decide: which job changes go out (fanned out to the
//! webhook queue, one message per event), each tenant's signing secrets (shown, rotated, kept
//! valid for a while after a rotation), and the delivery record on the job. The HTTP delivery
//! itself (signing, address guard, retries) is `kiln-webhooks`.

use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use kiln_domain::{Job, JobId, TenantId, WebhookDelivery, webhook_events};
use rand::RngCore;
use std::sync::Arc;
use tracing::info;

use crate::{
    AppError,
    ports::{JobStore, SecretSet, SecretStore, StoredSecret, WebhookQueue},
    revise::{Change, revise_stored},
    wiring::Ports,
};

const MAX_RACES: usize = 8;

/// One HTTP attempt at delivering an event, as recorded on the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub event_id: String,
    pub at: DateTime<Utc>,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub outcome: AttemptOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    /// Will be tried again later.
    Retrying,
    /// No more tries (the receiver refused it, or the schedule ran out).
    Abandoned,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Retrying => "retrying",
            Self::Abandoned => "abandoned",
        }
    }
}

pub struct Webhooks {
    store: Arc<dyn JobStore>,
    queue: Arc<dyn WebhookQueue>,
    secrets: Arc<dyn SecretStore>,
    /// How long a replaced secret still signs after a rotation.
    rotation_overlap: Duration,
}

impl Webhooks {
    /// The webhook use cases on the store, the webhook queue and the secrets of `ports`.
    pub fn new(ports: &Ports) -> Self {
        Self {
            store: ports.store.clone(),
            queue: ports.webhook_queue.clone(),
            secrets: ports.secrets.clone(),
            rotation_overlap: Duration::hours(24),
        }
    }

    /// Queues the events the change from `before` to `after` raises. Returns how many.
    pub async fn fan_out(&self, before: Option<&Job>, after: &Job, now: DateTime<Utc>) -> Result<usize, AppError> {
        let events = webhook_events(before, after, now);
        for event in &events {
            self.queue.send(event).await?;
            info!(job_id = %after.id, event_id = %event.id, kind = event.kind.as_str(), "webhook event queued");
        }
        Ok(events.len())
    }

    /// The secrets to sign with now, newest first; makes the tenant's first one if it has none.
    pub async fn signing_secrets(&self, tenant: &TenantId, now: DateTime<Utc>) -> Result<Vec<String>, AppError> {
        let set = self.secret_set(tenant, now).await?;
        Ok(set.secrets.iter().filter(|s| s.expires_at.is_none_or(|end| end > now)).map(|s| s.value.clone()).collect())
    }

    /// The tenant's current secret (made on first use).
    pub async fn current_secret(&self, tenant: &TenantId, now: DateTime<Utc>) -> Result<StoredSecret, AppError> {
        let set = self.secret_set(tenant, now).await?;
        set.secrets.into_iter().next().ok_or(AppError::Contention)
    }

    /// Makes a new current secret; the previous one keeps signing for the overlap so receivers
    /// can switch without missing an event. Expired ones are dropped.
    pub async fn rotate_secret(&self, tenant: &TenantId, now: DateTime<Utc>) -> Result<StoredSecret, AppError> {
        for _ in 0..MAX_RACES {
            let mut set = self.secrets.secrets(tenant).await?.unwrap_or_default();
            set.secrets.retain(|s| s.expires_at.is_none_or(|end| end > now));
            for old in &mut set.secrets {
                old.expires_at = Some(
                    old.expires_at.map_or(now + self.rotation_overlap, |end| end.min(now + self.rotation_overlap)),
                );
            }
            let fresh = StoredSecret { value: new_secret(), created_at: now, expires_at: None };
            set.secrets.insert(0, fresh.clone());
            set.version += 1;
            if self.secrets.put_secrets(tenant, &set).await? {
                info!(tenant_id = %tenant, "webhook secret rotated");
                return Ok(fresh);
            }
        }
        Err(AppError::Contention)
    }

    async fn secret_set(&self, tenant: &TenantId, now: DateTime<Utc>) -> Result<SecretSet, AppError> {
        for _ in 0..MAX_RACES {
            if let Some(set) = self.secrets.secrets(tenant).await?
                && !set.secrets.is_empty()
            {
                return Ok(set);
            }
            let set = SecretSet {
                version: 1,
                secrets: vec![StoredSecret { value: new_secret(), created_at: now, expires_at: None }],
            };
            if self.secrets.put_secrets(tenant, &set).await? {
                return Ok(set);
            }
        }
        Err(AppError::Contention)
    }

    /// Adds an attempt to the job's delivery record (conditional on the revision; re-reads and
    /// retries when a runner wrote in between). False when the job is gone.
    pub async fn record_attempt(&self, job_id: &JobId, attempt: &AttemptRecord) -> Result<bool, AppError> {
        let recorded = revise_stored(&*self.store, job_id, |job| {
            let mut record = job.webhook_delivery.take().unwrap_or_default();
            apply(&mut record, attempt);
            job.webhook_delivery = Some(record);
            Ok(Change::Write(()))
        })
        .await?;
        Ok(recorded.is_some())
    }
}

fn apply(record: &mut WebhookDelivery, attempt: &AttemptRecord) {
    record.attempts += 1;
    match attempt.outcome {
        AttemptOutcome::Delivered => record.delivered += 1,
        AttemptOutcome::Abandoned => record.abandoned += 1,
        AttemptOutcome::Retrying => {}
    }
    record.last_event_id = Some(attempt.event_id.clone());
    record.last_status = attempt.status;
    record.last_error = attempt.error.clone();
    record.last_attempt_at = Some(attempt.at);
}

/// A Standard Webhooks secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

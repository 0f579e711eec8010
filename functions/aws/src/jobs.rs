//! Jobs in DynamoDB.
//!
//! The jobs table holds one item per job (the serialized [`Job`] plus index attributes); every
//! write after the first is conditional on the revision read, so racing writers cannot both
//! win. The requests table holds the cache pointers (`cache#<tenant>#<key>`) and idempotency
//! records (`idem#<tenant>#<key>`), written in one transaction with the job they point at.

use async_trait::async_trait;
use aws_sdk_dynamodb::{
    Client,
    operation::{put_item::PutItemError, transact_write_items::TransactWriteItemsError},
    types::{AttributeValue, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem},
};
use chrono::{DateTime, Utc};
use kiln_app::{
    limits::{Charge, Charged, Counted, Window},
    ports::{CacheClaim, IdempotencyRecord, InsertOutcome, JobPage, JobStore, PortError, QueuedJob},
};
use kiln_domain::{CacheKey, Job, JobId, JobStatus, TenantId};
use std::collections::HashMap;

use crate::{is_conditional_failure, unavailable, written};

type Item = HashMap<String, AttributeValue>;

/// How long an idempotency record is kept.
const IDEMPOTENCY_RETENTION: chrono::Duration = chrono::Duration::hours(24);
/// Partitions of the sparse index of queued jobs. One partition takes about 1,000 writes a
/// second; every queued job's writes (queued, then leaving the index when it starts) go through
/// it, so one partition would cap the whole platform's job rate there. Sixteen lift that cap
/// sixteen-fold and cost the sweep sixteen small queries a minute.
const QUEUED_SHARDS: u8 = 16;

/// The index partition of a queued job: fixed by its id (every rewrite of the item keeps it),
/// spread by the id's random last character.
fn queued_shard(job: &JobId) -> String {
    let last = job.as_str().as_bytes().last().copied().unwrap_or(0);
    shard_name(last % QUEUED_SHARDS)
}

fn shard_name(shard: u8) -> String {
    format!("queued#{shard:02}")
}

/// The one partition jobs were queued under before the index was sharded: still swept, so jobs
/// queued before an upgrade expire too.
const UNSHARDED: &str = "queued";

/// [`JobStore`] over the jobs and requests tables.
#[derive(Clone)]
pub struct DynamoJobStore {
    client: Client,
    jobs_table: String,
    requests_table: String,
}

impl DynamoJobStore {
    pub fn new(client: Client, jobs_table: impl Into<String>, requests_table: impl Into<String>) -> Self {
        Self { client, jobs_table: jobs_table.into(), requests_table: requests_table.into() }
    }
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn cache_pk(tenant: &TenantId, key: &CacheKey) -> String {
    format!("cache#{tenant}#{key}")
}

fn idempotency_pk(tenant: &TenantId, key: &str) -> String {
    format!("idem#{tenant}#{key}")
}

/// The job as an item: its fields plus the attributes the indexes are built on.
fn job_item(job: &Job) -> Result<Item, PortError> {
    let mut item: Item =
        serde_dynamo::to_item(job).map_err(|e| PortError::Corrupt { what: "job", detail: e.to_string() })?;
    item.insert("tenant_status".into(), s(format!("{}#{}", job.tenant_id, job.status)));
    item.insert("expires_epoch".into(), n(job.expires_at.timestamp()));
    if let Some(purge_at) = job.purge_at() {
        item.insert("purge_at".into(), n(purge_at.timestamp()));
    }
    if job.status == JobStatus::Queued {
        item.insert("queued_shard".into(), s(queued_shard(&job.id)));
    }
    Ok(item)
}

fn job_from_item(item: Item) -> Result<Job, PortError> {
    serde_dynamo::from_item(item).map_err(|e| PortError::Corrupt { what: "job", detail: e.to_string() })
}

/// The attributes of a queued job estimates read, by their expression names.
const PROJECTED: [(&str, &str); 8] = [
    ("#id", "id"),
    ("#tenant", "tenant_id"),
    ("#model", "model"),
    ("#version", "model_version"),
    ("#priority", "priority"),
    ("#created", "created_at"),
    ("#cost", "cost_units"),
    ("#weight", "share_weight"),
];

/// The attributes of a queued job estimates read (absent ones at their defaults).
fn queued_from_item(item: Item) -> Result<QueuedJob, PortError> {
    #[derive(serde::Deserialize)]
    struct Projected {
        id: JobId,
        tenant_id: TenantId,
        model: String,
        model_version: String,
        #[serde(default)]
        priority: kiln_domain::Priority,
        created_at: DateTime<Utc>,
        #[serde(default)]
        cost_units: u64,
        #[serde(default)]
        share_weight: Option<u32>,
    }
    let p: Projected =
        serde_dynamo::from_item(item).map_err(|e| PortError::Corrupt { what: "queued job", detail: e.to_string() })?;
    Ok(QueuedJob {
        id: p.id,
        tenant_id: p.tenant_id,
        model: p.model,
        model_version: p.model_version,
        priority: p.priority,
        created_at: p.created_at,
        cost_units: p.cost_units,
        share_weight: p.share_weight,
    })
}

fn string_attr(item: &Item, name: &str) -> Option<String> {
    item.get(name).and_then(|v| v.as_s().ok()).cloned()
}

#[async_trait]
impl JobStore for DynamoJobStore {
    async fn insert(
        &self,
        job: &Job,
        cache: &CacheClaim,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<InsertOutcome, PortError> {
        let put_job = Put::builder()
            .table_name(&self.jobs_table)
            .set_item(Some(job_item(job)?))
            .condition_expression("attribute_not_exists(id)");
        let cache_put = Put::builder()
            .table_name(&self.requests_table)
            .item("pk", s(cache_pk(&job.tenant_id, &cache.key)))
            .item("job_id", s(job.id.as_str()));
        let cache_put = match job.purge_at() {
            Some(purge_at) => cache_put.item("purge_at", n(purge_at.timestamp())),
            None => cache_put,
        };
        let cache_put = match &cache.replaces {
            None => cache_put.condition_expression("attribute_not_exists(pk)"),
            Some(previous) => cache_put
                .condition_expression("job_id = :previous")
                .expression_attribute_values(":previous", s(previous.as_str())),
        };
        let mut items = vec![
            TransactWriteItem::builder().put(put_job.build().map_err(unavailable("dynamodb"))?).build(),
            TransactWriteItem::builder().put(cache_put.build().map_err(unavailable("dynamodb"))?).build(),
        ];
        if let Some(record) = idempotency {
            let purge_at = (job.created_at + IDEMPOTENCY_RETENTION).timestamp();
            let put = Put::builder()
                .table_name(&self.requests_table)
                .item("pk", s(idempotency_pk(&job.tenant_id, &record.key)))
                .item("job_id", s(record.job_id.as_str()))
                .item("fingerprint", s(&record.fingerprint))
                .item("purge_at", n(purge_at))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(unavailable("dynamodb"))?;
            items.push(TransactWriteItem::builder().put(put).build());
        }
        // The token makes the SDK's retry of a transaction whose answer was lost idempotent in
        // DynamoDB (for ten minutes); the job id is fresh, so it names this insert alone.
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .client_request_token(job.id.as_str())
            .send()
            .await;
        let err = match result {
            Ok(_) => return Ok(InsertOutcome::Inserted),
            Err(err) => err,
        };
        if let Some(TransactWriteItemsError::TransactionCanceledException(canceled)) = err.as_service_error() {
            let failed = |index: usize| {
                canceled.cancellation_reasons().get(index).and_then(|r| r.code()) == Some("ConditionalCheckFailed")
            };
            // The job's id is fresh: no other request writes it. When its put fails its
            // `attribute_not_exists(id)`, the job is there, so this is a retry whose first
            // attempt landed (its answer lost) and failed on its own writes: inserted.
            if failed(0) {
                return Ok(InsertOutcome::Inserted);
            }
            if failed(2) {
                return Ok(InsertOutcome::IdempotencyKeyTaken);
            }
            if failed(1) {
                return Ok(InsertOutcome::CacheKeyTaken);
            }
            if canceled.cancellation_reasons().iter().any(|r| r.code() == Some("TransactionConflict")) {
                return Ok(InsertOutcome::Conflicted);
            }
        }
        Err(PortError::unavailable("dynamodb", err))
    }

    async fn get(&self, id: &JobId) -> Result<Option<Job>, PortError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.jobs_table)
            .key("id", s(id.as_str()))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        output.item.map(job_from_item).transpose()
    }

    async fn update(&self, job: &Job) -> Result<bool, PortError> {
        let previous = job.revision.checked_sub(1).ok_or(PortError::Corrupt {
            what: "job",
            detail: format!("job {} updated without a new revision", job.id),
        })?;
        let result = self
            .client
            .put_item()
            .table_name(&self.jobs_table)
            .set_item(Some(job_item(job)?))
            .condition_expression("revision = :previous")
            .expression_attribute_values(":previous", n(previous))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        let err = match result {
            Ok(_) => return Ok(true),
            Err(err) => err,
        };
        let Some(PutItemError::ConditionalCheckFailedException(failed)) = err.as_service_error() else {
            return Err(PortError::unavailable("dynamodb", err));
        };
        // When a retry's first attempt landed and its answer was lost, the stored job (the
        // failure carries it) is this very write: written, not a race lost to another writer.
        let stored = failed.item.clone().map(job_from_item).transpose()?;
        Ok(stored.is_some_and(|stored| stored == *job))
    }

    async fn list(
        &self,
        tenant: &TenantId,
        status: Option<JobStatus>,
        limit: u32,
        after: Option<&JobId>,
    ) -> Result<JobPage, PortError> {
        let (index, key_name, key_value) = match status {
            None => ("by_tenant", "tenant_id", tenant.to_string()),
            Some(status) => ("by_tenant_status", "tenant_status", format!("{tenant}#{status}")),
        };
        let mut start = after.map(|after| {
            HashMap::from([("id".to_owned(), s(after.as_str())), (key_name.to_owned(), s(key_value.clone()))])
        });
        // One more than asked tells whether there is a next page. DynamoDB answers at most 1 MB
        // a query, so a page of long jobs comes back short with a key to go on from: follow it
        // until the page is full or the index has no more.
        let wanted = limit as usize + 1;
        let mut jobs = Vec::with_capacity(wanted);
        loop {
            let output = self
                .client
                .query()
                .table_name(&self.jobs_table)
                .index_name(index)
                .key_condition_expression("#k = :v")
                .expression_attribute_names("#k", key_name)
                .expression_attribute_values(":v", s(key_value.clone()))
                .scan_index_forward(false)
                .limit(i32::try_from(wanted - jobs.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(unavailable("dynamodb"))?;
            for item in output.items.unwrap_or_default() {
                jobs.push(job_from_item(item)?);
            }
            start = output.last_evaluated_key;
            if jobs.len() >= wanted || start.is_none() {
                break;
            }
        }
        let next = if jobs.len() > limit as usize {
            jobs.truncate(limit as usize);
            jobs.last().map(|job| job.id.clone())
        } else {
            None
        };
        Ok(JobPage { jobs, next })
    }

    async fn cache_entry(&self, tenant: &TenantId, key: &CacheKey) -> Result<Option<JobId>, PortError> {
        let item = self.request_item(cache_pk(tenant, key)).await?;
        item.and_then(|item| string_attr(&item, "job_id"))
            .map(|id| {
                JobId::parse(&id).map_err(|e| PortError::Corrupt { what: "cache pointer", detail: e.to_string() })
            })
            .transpose()
    }

    async fn idempotency_entry(&self, tenant: &TenantId, key: &str) -> Result<Option<IdempotencyRecord>, PortError> {
        let Some(item) = self.request_item(idempotency_pk(tenant, key)).await? else { return Ok(None) };
        let corrupt = |detail: String| PortError::Corrupt { what: "idempotency record", detail };
        let job_id = string_attr(&item, "job_id").ok_or_else(|| corrupt("no job_id".into()))?;
        Ok(Some(IdempotencyRecord {
            key: key.to_owned(),
            fingerprint: string_attr(&item, "fingerprint").ok_or_else(|| corrupt("no fingerprint".into()))?,
            job_id: JobId::parse(&job_id).map_err(|e| corrupt(e.to_string()))?,
        }))
    }

    async fn put_idempotency(&self, tenant: &TenantId, record: &IdempotencyRecord) -> Result<bool, PortError> {
        let purge_at = (Utc::now() + IDEMPOTENCY_RETENTION).timestamp();
        let result = self
            .client
            .put_item()
            .table_name(&self.requests_table)
            .item("pk", s(idempotency_pk(tenant, &record.key)))
            .item("job_id", s(record.job_id.as_str()))
            .item("fingerprint", s(&record.fingerprint))
            .item("purge_at", n(purge_at))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        written(result)
    }

    async fn release_keys(&self, job: &Job, idempotency_key: Option<&str>) -> Result<(), PortError> {
        let mut keys = vec![cache_pk(&job.tenant_id, &job.cache_key)];
        keys.extend(idempotency_key.map(|key| idempotency_pk(&job.tenant_id, key)));
        for pk in keys {
            let result = self
                .client
                .delete_item()
                .table_name(&self.requests_table)
                .key("pk", s(pk))
                .condition_expression("job_id = :job")
                .expression_attribute_values(":job", s(job.id.as_str()))
                .send()
                .await;
            match result {
                Ok(_) => {}
                Err(err) if is_conditional_failure(&err) => {}
                Err(err) => return Err(PortError::unavailable("dynamodb", err)),
            }
        }
        Ok(())
    }

    /// The oldest `limit` of each shard of `queued_by_expiry` (jobs expire a fixed time after
    /// they are accepted, so by expiry is by age), only the attributes estimates read, merged.
    async fn queued_jobs(&self, limit: u32) -> Result<Vec<QueuedJob>, PortError> {
        let mut queued = Vec::new();
        let shards = (0..QUEUED_SHARDS).map(shard_name).chain([UNSHARDED.to_owned()]);
        for shard in shards {
            let mut start = None;
            let mut read = 0;
            loop {
                let output = self
                    .client
                    .query()
                    .table_name(&self.jobs_table)
                    .index_name("queued_by_expiry")
                    .key_condition_expression("queued_shard = :shard")
                    .expression_attribute_values(":shard", s(&shard))
                    // Names, not the words: some attribute names are DynamoDB reserved words.
                    .projection_expression(PROJECTED.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", "))
                    .set_expression_attribute_names(Some(
                        PROJECTED
                            .iter()
                            .map(|(name, attribute)| ((*name).to_owned(), (*attribute).to_owned()))
                            .collect(),
                    ))
                    .limit(i32::try_from(limit - read).unwrap_or(i32::MAX))
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(unavailable("dynamodb"))?;
                for item in output.items.unwrap_or_default() {
                    read += 1;
                    queued.push(queued_from_item(item)?);
                }
                start = output.last_evaluated_key;
                if start.is_none() || read >= limit {
                    break;
                }
            }
        }
        queued.sort_by(|a: &QueuedJob, b: &QueuedJob| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        queued.truncate(limit as usize);
        Ok(queued)
    }

    async fn queued_expired_by(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Job>, PortError> {
        // The oldest `limit` of each shard, merged: the oldest `limit` of all.
        let mut jobs = Vec::new();
        let shards = (0..QUEUED_SHARDS).map(shard_name).chain([UNSHARDED.to_owned()]);
        for shard in shards {
            let output = self
                .client
                .query()
                .table_name(&self.jobs_table)
                .index_name("queued_by_expiry")
                .key_condition_expression("queued_shard = :shard AND expires_epoch < :now")
                .expression_attribute_values(":shard", s(shard))
                .expression_attribute_values(":now", n(now.timestamp()))
                .limit(i32::try_from(limit).unwrap_or(i32::MAX))
                .send()
                .await
                .map_err(unavailable("dynamodb"))?;
            for item in output.items.unwrap_or_default() {
                jobs.push(job_from_item(item)?);
            }
        }
        jobs.sort_by_key(|job: &Job| job.expires_at);
        jobs.truncate(limit as usize);
        Ok(jobs)
    }

    /// Counts on the `by_tenant_status` index (queued, then running), reading index entries only
    /// until `up_to` are seen.
    async fn count_active(&self, tenant: &TenantId, up_to: u32) -> Result<u32, PortError> {
        let mut counted = 0;
        for status in [JobStatus::Queued, JobStatus::Running] {
            let mut start = None;
            while counted < up_to {
                let output = self
                    .client
                    .query()
                    .table_name(&self.jobs_table)
                    .index_name("by_tenant_status")
                    .key_condition_expression("tenant_status = :v")
                    .expression_attribute_values(":v", s(format!("{tenant}#{status}")))
                    .select(aws_sdk_dynamodb::types::Select::Count)
                    .limit(i32::try_from(up_to - counted).unwrap_or(i32::MAX))
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(unavailable("dynamodb"))?;
                counted += u32::try_from(output.count).unwrap_or(0);
                start = output.last_evaluated_key;
                if start.is_none() {
                    break;
                }
            }
        }
        Ok(counted.min(up_to))
    }

    /// One usage item per tenant and UTC day in the requests table (`usage#<tenant>#<day>`):
    /// `units` counts the day's units, `m<minute>` the jobs of each minute. One conditional
    /// update counts both or neither, so the rate limit and the daily units cost one call
    /// together and DynamoDB serializes racing submits on the item. Each update removes the
    /// previous minute's counter, so the item stays small; DynamoDB's TTL removes it a week
    /// after its day.
    async fn charge(&self, tenant: &TenantId, charge: &Charge) -> Result<Charged, PortError> {
        if charge.jobs_per_minute == 0 {
            return Ok(Charged::RateLimited);
        }
        let Some(room) = charge.units_per_day.checked_sub(charge.units) else {
            let used = self.counted(tenant, charge.day, charge.minute).await?.units_today;
            return Ok(Charged::OutOfUnits { used });
        };
        let result = self
            .client
            .update_item()
            .table_name(&self.requests_table)
            .key("pk", s(usage_pk(tenant, charge.day)))
            .update_expression("ADD units :units, #minute :one SET purge_at = if_not_exists(purge_at, :purge) REMOVE #previous")
            .condition_expression(
                "(attribute_not_exists(units) OR units <= :room) AND (attribute_not_exists(#minute) OR #minute < :rate)",
            )
            .expression_attribute_names("#minute", minute_attr(charge.minute.start))
            .expression_attribute_names("#previous", minute_attr(charge.minute.start - charge.minute.length))
            .expression_attribute_values(":units", n(charge.units))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":room", n(room))
            .expression_attribute_values(":rate", n(charge.jobs_per_minute))
            .expression_attribute_values(":purge", n(charge.day.start + charge.day.length + USAGE_RETENTION_SECS))
            .send()
            .await;
        if written(result)? {
            return Ok(Charged::Counted);
        }
        let counted = self.counted(tenant, charge.day, charge.minute).await?;
        Ok(if counted.jobs_this_minute >= charge.jobs_per_minute {
            Charged::RateLimited
        } else {
            Charged::OutOfUnits { used: counted.units_today }
        })
    }

    async fn refund(&self, tenant: &TenantId, charge: &Charge) -> Result<(), PortError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.requests_table)
            .key("pk", s(usage_pk(tenant, charge.day)))
            .update_expression("ADD units :units, #minute :one")
            .condition_expression("attribute_exists(units)")
            .expression_attribute_names("#minute", minute_attr(charge.minute.start))
            .expression_attribute_values(":units", n(-i128::from(charge.units)))
            .expression_attribute_values(":one", n(-1))
            .send()
            .await;
        written(result).map(drop)
    }

    async fn refund_units(&self, tenant: &TenantId, day: Window, units: u64) -> Result<(), PortError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.requests_table)
            .key("pk", s(usage_pk(tenant, day)))
            .update_expression("ADD units :units")
            .condition_expression("attribute_exists(units)")
            .expression_attribute_values(":units", n(-i128::from(units)))
            .send()
            .await;
        written(result).map(drop)
    }

    async fn counted(&self, tenant: &TenantId, day: Window, minute: Window) -> Result<Counted, PortError> {
        let item = self.request_item(usage_pk(tenant, day)).await?.unwrap_or_default();
        let number = |name: &str| item.get(name).and_then(|v| v.as_n().ok()).and_then(|n| n.parse::<i64>().ok());
        Ok(Counted {
            units_today: number("units").unwrap_or(0).max(0) as u64,
            jobs_this_minute: number(&minute_attr(minute.start)).unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32,
        })
    }
}

/// How long a day's usage item is kept after the day.
const USAGE_RETENTION_SECS: i64 = 7 * 24 * 3600;

fn usage_pk(tenant: &TenantId, day: Window) -> String {
    format!("usage#{tenant}#{}", day.start)
}

fn minute_attr(minute_start: i64) -> String {
    format!("m{minute_start}")
}

impl DynamoJobStore {
    async fn request_item(&self, pk: String) -> Result<Option<Item>, PortError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.requests_table)
            .key("pk", s(pk))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable("dynamodb"))?;
        Ok(output.item)
    }
}

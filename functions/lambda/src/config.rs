//! What every function reads from the environment (terraform sets it; `terraform/functions.json`
//! lists it): the resources, and the settings of the job use cases.

use kiln_app::{JobsConfig, TenantLimits};
use kiln_aws::Resources;
use kiln_domain::WebhookPolicy;
use std::time::Duration;

/// The configuration every function shares; functions with settings of their own flatten it.
#[derive(Debug, Clone, clap::Parser)]
#[command(about = "kiln function")]
pub struct FunctionConfig {
    #[command(flatten)]
    pub resources: Resources,
    /// Seconds a queued job may wait for a runner before it expires.
    #[arg(long, env = "KILN_QUEUED_TTL_SECS", default_value_t = 3600)]
    pub queued_ttl_secs: u32,
    /// Seconds a presigned download link stays valid.
    #[arg(long, env = "KILN_LINK_TTL_SECS", default_value_t = 3600)]
    pub link_ttl_secs: u32,
    /// How long outputs are kept after their job ends, in seconds: the artifacts bucket's
    /// lifecycle (terraform sets it from `output_retention_days`). Recorded on each new job.
    #[arg(long, env = "KILN_OUTPUT_RETENTION_SECS", default_value_t = 30 * 24 * 3600)]
    pub output_retention_secs: u64,
    /// How long a function reuses the model catalog it read, in seconds: a change made with
    /// `kiln-admin models` (weights, promotion, retirement) reaches requests within this.
    #[arg(long, env = "KILN_CATALOG_TTL_SECS", default_value_t = 30)]
    pub catalog_ttl_secs: u64,
    /// Jobs waiting per GPU slot of a model version over which requests with `quality: auto`
    /// get the model's fast preset (fewer steps; the job's warnings say so).
    #[arg(long, env = "KILN_DEGRADE_BACKLOG_PER_SLOT", default_value_t = 8.0)]
    pub degrade_backlog_per_slot: f64,
    /// Print each API request's metrics as CloudWatch Embedded Metric Format lines on stdout
    /// (terraform turns it on; the local stack leaves it off).
    #[arg(long, env = "KILN_EMIT_METRICS", default_value_t = false)]
    pub emit_metrics: bool,
    /// Largest accepted request body, in bytes; larger ones get 413.
    #[arg(long, env = "KILN_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Accept http:// and private-address webhook URLs. Local development only.
    #[arg(long, env = "KILN_ALLOW_LOCAL_WEBHOOKS", default_value_t = false)]
    pub allow_local_webhooks: bool,
    /// Jobs a tenant may have queued or running at once, unless its own limits say otherwise
    /// (`kiln-admin tenant-limits`); more are refused with 429 `quota_exceeded`.
    #[arg(long, env = "KILN_DEFAULT_MAX_ACTIVE_JOBS", default_value_t = TenantLimits::default().max_active_jobs)]
    pub default_max_active_jobs: u32,
    /// New jobs a tenant may submit per minute, unless its own limits say otherwise; more are
    /// refused with 429 `rate_limited` and a Retry-After.
    #[arg(long, env = "KILN_DEFAULT_JOBS_PER_MINUTE", default_value_t = TenantLimits::default().jobs_per_minute)]
    pub default_jobs_per_minute: u32,
    /// GPU-work units of new jobs a tenant may submit per UTC day, unless its own limits say
    /// otherwise; more are refused with 429 `units_exhausted` and a Retry-After.
    #[arg(long, env = "KILN_DEFAULT_UNITS_PER_DAY", default_value_t = TenantLimits::default().units_per_day)]
    pub default_units_per_day: u64,
}

impl FunctionConfig {
    pub fn jobs_config(&self) -> JobsConfig {
        JobsConfig {
            queued_ttl: chrono::Duration::seconds(i64::from(self.queued_ttl_secs)),
            link_ttl: Duration::from_secs(u64::from(self.link_ttl_secs)),
            output_retention: Duration::from_secs(self.output_retention_secs),
            webhook_policy: WebhookPolicy { allow_local: self.allow_local_webhooks },
            catalog_ttl: Duration::from_secs(self.catalog_ttl_secs),
            degrade_backlog_per_slot: self.degrade_backlog_per_slot,
            default_limits: TenantLimits {
                max_active_jobs: self.default_max_active_jobs,
                jobs_per_minute: self.default_jobs_per_minute,
                units_per_day: self.default_units_per_day,
            },
        }
    }

    /// A configuration for the given resources with every other setting at its default.
    pub fn for_resources(resources: Resources) -> Self {
        Self {
            resources,
            queued_ttl_secs: 3600,
            link_ttl_secs: 3600,
            output_retention_secs: 30 * 24 * 3600,
            catalog_ttl_secs: 30,
            degrade_backlog_per_slot: 8.0,
            emit_metrics: false,
            max_body_bytes: 64 * 1024,
            allow_local_webhooks: false,
            default_max_active_jobs: TenantLimits::default().max_active_jobs,
            default_jobs_per_minute: TenantLimits::default().jobs_per_minute,
            default_units_per_day: TenantLimits::default().units_per_day,
        }
    }
}

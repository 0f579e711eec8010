//! `kiln-admin`: operator commands against a deployment's tables (set the table names in the
//! environment as terraform outputs them, or point KILN_AWS_ENDPOINT_URL at the local moto).
//!
//!   kiln-admin tenant-create --id acme --name "Acme Inc."   creates a tenant and prints its first key
//!   kiln-admin keys create --tenant acme                    prints a new key for the (existing) tenant
//!   kiln-admin keys list --tenant acme                      lists the tenant's keys: id, last characters, created
//!   kiln-admin keys revoke --tenant acme --id key_0123abcd  revokes one of them (or --key kiln_...)
//!   kiln-admin tenant-limits --tenant acme --max-active-jobs 20 --jobs-per-minute 60 [--units-per-day 50000]
//!                                                           sets the tenant's own limits (--default: back to the deployment's)
//!   kiln-admin models-publish gpu-runner/models             offers model packages to the catalog (new versions: candidates)
//!   kiln-admin models list | add --package DIR [--weight N] | weight|shadow|promote|retire --model M --version V ...
//!   kiln-admin models shadow-report --model M               shadow jobs beside the jobs they shadow

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kiln_app::{
    ApiKey, Tenant, TenantLimits,
    catalog::Catalog,
    keys::{KeyRef, TenantKeys},
    ports::{JobStore, TenantDirectory},
};
use kiln_aws::{AwsClients, DynamoJobStore, DynamoModelCatalog, DynamoTenants};
use kiln_domain::{CatalogModel, Job, ModelSpec, Offered, SHADOW_TENANT, TenantId};
use std::{io::Write, path::PathBuf, sync::Arc};

#[derive(Parser)]
#[command(name = "kiln-admin", about = "Operator commands: tenants, API keys, model catalog")]
pub struct Cli {
    /// DynamoDB table of tenants and API key hashes.
    #[arg(long, env = "KILN_TENANTS_TABLE", global = true, default_value = "kiln-tenants")]
    tenants_table: String,
    /// DynamoDB table of model descriptions.
    #[arg(long, env = "KILN_MODELS_TABLE", global = true, default_value = "kiln-models")]
    models_table: String,
    /// DynamoDB table of jobs (`models shadow-report`).
    #[arg(long, env = "KILN_JOBS_TABLE", global = true, default_value = "kiln-jobs")]
    jobs_table: String,
    /// Send AWS calls here instead of AWS (the local moto server).
    #[arg(long, env = "KILN_AWS_ENDPOINT_URL", global = true)]
    endpoint_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a tenant and print its first API key.
    TenantCreate {
        /// 1 to 64 of a-z, 0-9, '-' and '_'.
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
    },
    /// A tenant's API keys.
    #[command(subcommand)]
    Keys(Keys),
    /// Set a tenant's limits on new jobs (effective within 30 seconds), or with --default go
    /// back to the deployment's (KILN_DEFAULT_MAX_ACTIVE_JOBS, KILN_DEFAULT_JOBS_PER_MINUTE,
    /// KILN_DEFAULT_UNITS_PER_DAY).
    TenantLimits {
        #[arg(long)]
        tenant: String,
        /// Jobs queued or running at once (0: no new jobs).
        #[arg(long, required_unless_present = "default", conflicts_with = "default")]
        max_active_jobs: Option<u32>,
        /// New jobs per minute (0: no new jobs).
        #[arg(long, required_unless_present = "default", conflicts_with = "default")]
        jobs_per_minute: Option<u32>,
        /// GPU-work units of new jobs per UTC day (0: no new jobs); left out: what the tenant
        /// has (2,000,000 if it had no limits of its own).
        #[arg(long, conflicts_with = "default")]
        units_per_day: Option<u64>,
        #[arg(long)]
        default: bool,
    },
    /// Set a tenant's weight in fair share across tenants on the GPUs (a tenant of weight 3 gets
    /// three times the GPU slots of one of weight 1 while both have jobs waiting), or with
    /// --default go back to 1. Applies to jobs submitted from then on (within 30 seconds).
    TenantWeight {
        #[arg(long)]
        tenant: String,
        #[arg(long, required_unless_present = "default", conflicts_with = "default", value_parser = clap::value_parser!(u32).range(1..=1000))]
        weight: Option<u32>,
        #[arg(long)]
        default: bool,
    },
    /// Set the highest `priority` a tenant's jobs get (higher asks are queued at it, with a
    /// warning on the job), or with --default go back to normal.
    TenantPriority {
        #[arg(long)]
        tenant: String,
        #[arg(long, required_unless_present = "default", conflicts_with = "default", value_parser = ["low", "normal", "high"])]
        max: Option<String>,
        #[arg(long)]
        default: bool,
    },
    /// Offer every model package under a directory to the catalog, as a runner's start does: a
    /// new model takes every request, a new version of a known one is a candidate (no traffic).
    ModelsPublish { dir: PathBuf },
    /// The catalog's model versions: list, add, weigh, promote, retire, shadow.
    #[command(subcommand)]
    Models(Models),
}

#[derive(Subcommand)]
enum Models {
    /// Every model's versions: traffic weight, shadow share, retired.
    List,
    /// Add a model package's version with a traffic weight (a new model takes every request).
    Add {
        #[arg(long)]
        package: PathBuf,
        #[arg(long, default_value_t = 0)]
        weight: u32,
    },
    /// Set a version's share of the requests that name no version (e.g. 95 and 5: a canary).
    Weight {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
        #[arg(long)]
        weight: u32,
    },
    /// Render this percent of the requests other versions serve with this version too, as
    /// shadow jobs nobody is answered with (compare with `shadow-report`).
    Shadow {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
        #[arg(long)]
        percent: u32,
    },
    /// Send every request without a version to this version.
    Promote {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
    },
    /// Take a version out of service: it accepts no more requests, pinned or not.
    Retire {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
    },
    /// Recent shadow jobs of a model beside the jobs they shadow: status, render time, output size.
    ShadowReport {
        #[arg(long)]
        model: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum Keys {
    /// Print a new API key for an existing tenant.
    Create {
        #[arg(long)]
        tenant: String,
    },
    /// List the tenant's keys (never the keys themselves: an id, the last characters, when made).
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Revoke one of the tenant's keys (it stops working within 30 seconds).
    Revoke {
        #[arg(long)]
        tenant: String,
        /// The key's id as `keys list` shows it.
        #[arg(long, required_unless_present = "key", conflicts_with = "key")]
        id: Option<String>,
        /// The key itself.
        #[arg(long, env = "KILN_REVOKE_KEY")]
        key: Option<String>,
    },
}

/// Runs one command, writing what it prints to `out`.
pub async fn run(cli: Cli, out: &mut impl Write) -> anyhow::Result<()> {
    let clients = AwsClients::connect(cli.endpoint_url.as_deref()).await;
    let tenants = Arc::new(DynamoTenants::new(clients.dynamodb().clone(), &cli.tenants_table));
    let keys = TenantKeys::new(tenants.clone());
    match cli.command {
        Command::TenantCreate { id, name } => {
            if id == SHADOW_TENANT {
                bail!("`{SHADOW_TENANT}` is kept for shadow jobs");
            }
            let tenant = Tenant::new(TenantId::parse(&id)?, name);
            writeln!(out, "{}", keys.create_tenant(&tenant).await?.expose())?;
        }
        Command::Keys(Keys::Create { tenant }) => {
            writeln!(out, "{}", keys.create(&TenantId::parse(&tenant)?).await?.expose())?;
        }
        Command::Keys(Keys::List { tenant }) => {
            writeln!(out, "{:<18} {:<8} created", "id", "ends in")?;
            for key in keys.list(&TenantId::parse(&tenant)?).await? {
                let hint = if key.hint.is_empty() { "-".to_owned() } else { format!("...{}", key.hint) };
                writeln!(out, "{:<18} {:<8} {}", key.id(), hint, key.created_at.to_rfc3339())?;
            }
        }
        Command::Keys(Keys::Revoke { tenant, id, key }) => {
            let which = match (id, key) {
                (Some(id), _) => KeyRef::Id(id),
                (None, Some(key)) => KeyRef::Secret(ApiKey::from_text(&key)),
                (None, None) => bail!("give --id or --key"),
            };
            let revoked = keys.revoke(&TenantId::parse(&tenant)?, &which).await?;
            writeln!(out, "revoked {revoked}")?;
        }
        Command::TenantLimits { tenant, max_active_jobs, jobs_per_minute, units_per_day, default: _ } => {
            // Left out, the daily units stay what the tenant has (a suspension at 0 included).
            let kept = match units_per_day {
                Some(units) => units,
                None => tenants
                    .tenant(&TenantId::parse(&tenant)?)
                    .await?
                    .and_then(|t| t.limits)
                    .map_or(TenantLimits::default().units_per_day, |l| l.units_per_day),
            };
            let limits = max_active_jobs.zip(jobs_per_minute).map(|(max_active_jobs, jobs_per_minute)| TenantLimits {
                max_active_jobs,
                jobs_per_minute,
                units_per_day: kept,
            });
            if !tenants.set_limits(&TenantId::parse(&tenant)?, limits).await? {
                bail!("no tenant `{tenant}`");
            }
            writeln!(out, "{}", limits.map_or("deployment defaults".to_owned(), |l| format!("{l:?}")))?;
        }
        Command::TenantWeight { tenant, weight, default: _ } => {
            if !tenants.set_share_weight(&TenantId::parse(&tenant)?, weight).await? {
                bail!("no tenant `{tenant}`");
            }
            writeln!(out, "share weight {}", weight.unwrap_or(1))?;
        }
        Command::TenantPriority { tenant, max, default: _ } => {
            let max = max.as_deref().and_then(kiln_domain::Priority::parse);
            if !tenants.set_max_priority(&TenantId::parse(&tenant)?, max).await? {
                bail!("no tenant `{tenant}`");
            }
            writeln!(out, "max priority {}", max.unwrap_or_default().as_str())?;
        }
        Command::ModelsPublish { dir } => {
            let catalog =
                Catalog::new(Arc::new(DynamoModelCatalog::new(clients.dynamodb().clone(), &cli.models_table)));
            for (_, model) in ModelSpec::read_packages(&dir).with_context(|| format!("reading {}", dir.display()))? {
                let offered = catalog.offer(&model).await?;
                writeln!(out, "{}@{}: {}", model.name, model.version, offered_text(offered))?;
            }
        }
        Command::Models(command) => {
            let catalog =
                Catalog::new(Arc::new(DynamoModelCatalog::new(clients.dynamodb().clone(), &cli.models_table)));
            let changed = match command {
                Models::List => {
                    for model in catalog.models().await? {
                        write_versions(out, &model)?;
                    }
                    None
                }
                Models::Add { package, weight } => {
                    let spec =
                        ModelSpec::read_manifest(&package).with_context(|| format!("reading {}", package.display()))?;
                    Some(catalog.add(&spec, weight).await?)
                }
                Models::Weight { model, version, weight } => {
                    Some(catalog.change(&model, |m| m.set_weight(&version, weight)).await?)
                }
                Models::Shadow { model, version, percent } => {
                    Some(catalog.change(&model, |m| m.set_shadow(&version, percent)).await?)
                }
                Models::Promote { model, version } => Some(catalog.change(&model, |m| m.promote(&version)).await?),
                Models::Retire { model, version } => Some(catalog.change(&model, |m| m.retire(&version)).await?),
                Models::ShadowReport { model, limit } => {
                    let store = DynamoJobStore::new(clients.dynamodb().clone(), &cli.jobs_table, "");
                    shadow_report(out, &store, &model, limit).await?;
                    None
                }
            };
            if let Some(model) = changed {
                write_versions(out, &model)?;
            }
        }
    }
    Ok(())
}

fn offered_text(offered: Offered) -> &'static str {
    match offered {
        Offered::NewModel => "new model, taking every request",
        Offered::Candidate => "new version, a candidate: no traffic until `models weight` or `models promote`",
        Offered::AlreadyThere => "already in the catalog (unchanged)",
        Offered::Updated => "in the catalog with another description: updated, its traffic kept",
        Offered::Retired => "retired (stays retired)",
    }
}

fn write_versions(out: &mut impl Write, model: &CatalogModel) -> anyhow::Result<()> {
    for v in &model.versions {
        let state = if v.retired { "retired" } else { "active" };
        writeln!(
            out,
            "{:<24} {:<12} weight {:>3}  shadow {:>3}%  {state:<7}  added {}",
            model.name,
            v.version(),
            v.weight,
            v.shadow_percent,
            v.added_at.format("%Y-%m-%d %H:%M")
        )?;
    }
    Ok(())
}

/// The shadow jobs of `model`, newest first, each beside the job it shadows.
async fn shadow_report(out: &mut impl Write, store: &DynamoJobStore, model: &str, limit: u32) -> anyhow::Result<()> {
    let shadows = store.list(&TenantId::parse(SHADOW_TENANT)?, None, limit, None).await?;
    writeln!(
        out,
        "{:<26} {:<12} {:<10} {:>9} {:>9}   {:<12} {:<10} {:>9} {:>9}",
        "shadow job", "version", "status", "render ms", "bytes", "served by", "status", "render ms", "bytes"
    )?;
    let cell = |job: &Job| {
        let bytes: u64 = job.outputs.iter().map(|o| o.bytes).sum();
        let render = job.timings.render_ms.map_or("-".to_owned(), |ms| ms.to_string());
        (job.model_version.clone(), job.status.to_string(), render, bytes)
    };
    for shadow in shadows.jobs.iter().filter(|job| job.model == model) {
        let Some(primary_id) = &shadow.shadow_of else { continue };
        let (sv, ss, sr, sb) = cell(shadow);
        let (pv, ps, pr, pb) = match store.get(primary_id).await? {
            Some(primary) => cell(&primary),
            None => ("?".into(), "gone".into(), "-".into(), 0),
        };
        writeln!(
            out,
            "{:<26} {sv:<12} {ss:<10} {sr:>9} {sb:>9}   {pv:<12} {ps:<10} {pr:>9} {pb:>9}",
            shadow.id.as_str()
        )?;
    }
    Ok(())
}

//! `kiln-admin`: operator commands against a deployment's tables (set the table names in the
//! environment as terraform outputs them, or point KILN_AWS_ENDPOINT_URL at the local moto).
//!
//!   kiln-admin tenant-create --id acme --name "Acme Inc."   creates a tenant and prints its first key
//!   kiln-admin key-create --tenant acme                     prints a new key for the tenant
//!   kiln-admin key-revoke --key kiln_...                    revokes a key
//!   kiln-admin tenant-limits --tenant acme --max-active-jobs 20 --jobs-per-minute 60
//!                                                           sets the tenant's own limits (--default: back to the deployment's)
//!   kiln-admin models-publish gpu-runner/models             publishes model packages' manifests

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kiln_app::{
    ApiKey, Tenant, TenantLimits,
    ports::{ModelCatalog, TenantDirectory},
};
use kiln_aws::{AwsClients, DynamoModelCatalog, DynamoTenants};
use kiln_domain::{ModelSpec, TenantId};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Operator commands: tenants, API keys, model catalog")]
struct Cli {
    /// DynamoDB table of tenants and API key hashes.
    #[arg(long, env = "KILN_TENANTS_TABLE", global = true, default_value = "kiln-tenants")]
    tenants_table: String,
    /// DynamoDB table of model descriptions.
    #[arg(long, env = "KILN_MODELS_TABLE", global = true, default_value = "kiln-models")]
    models_table: String,
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
    /// Print a new API key for an existing tenant.
    KeyCreate {
        #[arg(long)]
        tenant: String,
    },
    /// Revoke an API key (it stops working within 30 seconds).
    KeyRevoke {
        #[arg(long, env = "KILN_REVOKE_KEY")]
        key: String,
    },
    /// Set a tenant's limits on new jobs (effective within 30 seconds), or with --default go
    /// back to the deployment's (KILN_DEFAULT_MAX_ACTIVE_JOBS, KILN_DEFAULT_JOBS_PER_MINUTE).
    TenantLimits {
        #[arg(long)]
        tenant: String,
        /// Jobs queued or running at once (0: no new jobs).
        #[arg(long, required_unless_present = "default", conflicts_with = "default")]
        max_active_jobs: Option<u32>,
        /// New jobs per minute (0: no new jobs).
        #[arg(long, required_unless_present = "default", conflicts_with = "default")]
        jobs_per_minute: Option<u32>,
        #[arg(long)]
        default: bool,
    },
    /// Publish every model package's manifest under a directory.
    ModelsPublish { dir: PathBuf },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let clients = AwsClients::connect(cli.endpoint_url.as_deref()).await;
    let tenants = DynamoTenants::new(clients.dynamodb().clone(), &cli.tenants_table);
    match cli.command {
        Command::TenantCreate { id, name } => {
            let tenant = Tenant { id: TenantId::parse(&id)?, name, disabled: false, limits: None };
            if !tenants.create_tenant(&tenant).await? {
                bail!("tenant `{id}` already exists; use key-create for another key");
            }
            let key = ApiKey::generate();
            tenants.add_key(&tenant.id, &key.hash()).await?;
            println!("{}", key.expose());
        }
        Command::KeyCreate { tenant } => {
            let tenant = TenantId::parse(&tenant)?;
            let key = ApiKey::generate();
            tenants.add_key(&tenant, &key.hash()).await?;
            println!("{}", key.expose());
        }
        Command::KeyRevoke { key } => {
            if !tenants.revoke_key(&ApiKey::from_text(&key).hash()).await? {
                bail!("no such key");
            }
            println!("revoked");
        }
        Command::TenantLimits { tenant, max_active_jobs, jobs_per_minute, default: _ } => {
            let limits = max_active_jobs
                .zip(jobs_per_minute)
                .map(|(max_active_jobs, jobs_per_minute)| TenantLimits { max_active_jobs, jobs_per_minute });
            if !tenants.set_limits(&TenantId::parse(&tenant)?, limits).await? {
                bail!("no tenant `{tenant}`");
            }
            println!("{}", limits.map_or("deployment defaults".to_owned(), |l| format!("{l:?}")));
        }
        Command::ModelsPublish { dir } => {
            let catalog = DynamoModelCatalog::new(clients.dynamodb().clone(), &cli.models_table);
            for (_, model) in ModelSpec::read_packages(&dir).with_context(|| format!("reading {}", dir.display()))? {
                catalog.publish(&model).await?;
                println!("published {}@{}", model.name, model.version);
            }
        }
    }
    Ok(())
}

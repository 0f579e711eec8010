//! `kiln-burst`: the burst at any size (RELIABILITY.md). Starts its own moto server unless
//! `KILN_TEST_MOTO_URL` names one; prints the report; exits 1 when a job was lost or a limit
//! misapplied.

use clap::Parser;
use kiln_tests::burst::{BurstOptions, run};
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Many clients at once submitting and reading jobs through the local API")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Clients sending at once.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Tenants sharing the jobs.
    #[arg(long, default_value_t = 8)]
    tenants: usize,
    /// Jobs a minute of the one limited tenant.
    #[arg(long, default_value_t = 20)]
    limited_per_minute: u32,
    /// Every this many-th job is the limited tenant's.
    #[arg(long, default_value_t = 20)]
    limited_every: usize,
    #[arg(long, default_value_t = 3)]
    runners: usize,
    /// Seconds the runners may take to drain after the last submit.
    #[arg(long, default_value_t = 3600)]
    deadline_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let options = BurstOptions {
        jobs: args.jobs,
        clients: args.clients,
        tenants: args.tenants.max(1),
        limited_per_minute: args.limited_per_minute,
        limited_every: args.limited_every,
        runners: args.runners,
        deadline: Duration::from_secs(args.deadline_secs),
    };
    let report = run(&kiln_tests::moto_url(), options).await?;
    println!("{report}");
    let broken = report.violations();
    if !broken.is_empty() {
        eprintln!("broken: {broken:?}");
        std::process::exit(1);
    }
    Ok(())
}

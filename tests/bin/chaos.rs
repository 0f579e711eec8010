//! `kiln-chaos`: the chaos run at any size (RELIABILITY.md). Starts its own moto server unless
//! `KILN_TEST_MOTO_URL` names one; prints the report; exits 1 when an invariant was broken.

use clap::Parser;
use kiln_tests::chaos::{ChaosOptions, run};
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Jobs through the local stack under AWS faults and runner kills, then the invariant checker")]
struct Args {
    /// Jobs to ask for.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// Fraction of AWS requests the proxy faults.
    #[arg(long, default_value_t = 0.05)]
    fault_rate: f64,
    /// Runner processes.
    #[arg(long, default_value_t = 3)]
    runners: usize,
    /// Shortest pause between two kills, in seconds.
    #[arg(long, default_value_t = 2)]
    kill_min_secs: u64,
    /// Longest pause between two kills, in seconds.
    #[arg(long, default_value_t = 6)]
    kill_max_secs: u64,
    /// Clients submitting at once.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds the jobs may take to end after the last submit.
    #[arg(long, default_value_t = 900)]
    deadline_secs: u64,
    /// Seed of the job mix.
    #[arg(long, default_value_t = 15)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let options = ChaosOptions {
        jobs: args.jobs,
        fault_rate: args.fault_rate,
        runners: args.runners,
        kill_every: (
            Duration::from_secs(args.kill_min_secs),
            Duration::from_secs(args.kill_max_secs.max(args.kill_min_secs)),
        ),
        clients: args.clients,
        deadline: Duration::from_secs(args.deadline_secs),
        seed: args.seed,
    };
    let report = run(&kiln_tests::moto_url(), options).await?;
    println!("{report}");
    let broken = report.findings.violations().len();
    if broken > 0 {
        eprintln!("{broken} invariant(s) broken");
        std::process::exit(1);
    }
    Ok(())
}

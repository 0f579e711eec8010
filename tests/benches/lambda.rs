//! Each Lambda function as deployed: the size of its zip, which AWS SDKs its binary carries,
//! and its cold start under a local Lambda runtime API.
//!
//!     terraform/package.sh --arch x86_64                 # the release binaries and zips
//!     cargo bench --profile dev -p kiln-tests --bench lambda         # 5 cold starts of each
//!                                                                    # (the bench itself only waits)
//!     cargo bench --profile dev -p kiln-tests --bench lambda -- 20   # more
//!
//! "init" is Lambda's Init Duration: from starting the process (the binary terraform deploys,
//! with the environment `terraform/functions.json` gives it) to its first request for an event
//! (start-up, configuration, clients). "first answer" is the first invocation, from handing it
//! the function's `events/` fixture to its answer: the cold path through the SDK's first
//! connection, here to moto (through the recording proxy of tests/terraform.rs), so its
//! absolute time says little. Medians over the runs. "SDKs" are the AWS service clients whose
//! code is in the binary.

#[path = "../terraform/harness.rs"]
#[allow(dead_code)]
mod harness;

use harness::{Deploy, LambdaProcess, Recorder, resolve_env, root};
use kiln_app::ApiKey;
use kiln_local::StackOptions;
use kiln_tests::{Client, moto_url, stack_with, unique_prefix};
use std::time::{Duration, Instant};

const FIXTURE_KEY: &str = "kiln_fixture00000000000000000000000000000000000";
const FIXTURE_JOB: &str = "01KAQ3Z8X9K2M3N4P5Q6R7S8T9";
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

/// The AWS service clients whose code the binary holds, each found by a name only its client
/// carries (its protocol's target prefix or its endpoint rules').
fn sdks_in(binary: &[u8]) -> String {
    let clients = [
        ("dynamodb", "DynamoDB_20120810"),
        ("sqs", "AmazonSQS"),
        ("s3", "s3express"),
        ("sts", "AWSSecurityTokenServiceV20110615"),
        ("sso", "SWBPortalService"),
        ("sso-oidc", "AWSSSOOIDCService"),
    ];
    let found: Vec<&str> = clients
        .into_iter()
        .filter(|(_, needle)| binary.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .map(|(name, _)| name)
        .collect();
    found.join("+")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(5);
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), std::path::PathBuf::from);
    let deploy = Deploy::load();
    let prefix = unique_prefix();
    let stack = stack_with(StackOptions { prefix: prefix.clone(), ..StackOptions::default() }).await;
    stack.add_tenant_key("fixture-tenant", "Fixture", &ApiKey::from_text(FIXTURE_KEY)).await?;
    let client = Client::new(&stack.api_url, Some(FIXTURE_KEY));
    let job = client.post_json("/v1/jobs", &serde_json::json!({"model": "kiln-demo", "prompt": "bench"})).await;
    let job = job.body["id"].as_str().unwrap_or(FIXTURE_JOB).to_owned();
    let moto = moto_url();

    println!("{runs} cold starts of each function ({TRIPLE}, release, as package.sh builds them)\n");
    println!("| function | zip MB | binary MB | SDKs | init ms (median) | first answer ms (median, moto) |");
    println!("|---|---:|---:|---|---:|---:|");
    for name in deploy.functions().keys() {
        let binary = target.join(TRIPLE).join("release").join(name);
        let zip = target.join("lambda/x86_64").join(format!("{name}.zip"));
        anyhow::ensure!(
            binary.exists() && zip.exists(),
            "no {}: run terraform/package.sh --arch x86_64",
            zip.display()
        );
        let bytes = std::fs::read(&binary)?;
        let mut env = resolve_env(&deploy, name, &prefix, &stack).await;
        env.insert("RUST_LOG".into(), "warn".into());
        let event = deploy.events(name).into_iter().next().unwrap_or_default().replace(FIXTURE_JOB, &job);
        let recorder = Recorder::start(&moto, &prefix).await;
        let (mut inits, mut answers) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let process = LambdaProcess::start(name, &binary, &env, &recorder).await;
            inits.push(process.init_time().await.map_err(anyhow::Error::msg)?);
            let invoked = Instant::now();
            let answer = process.invoke(&event).await;
            answers.push(invoked.elapsed());
            if let Err(err) = answer {
                eprintln!("{name}: {err}");
            }
            process.stop();
        }
        println!(
            "| {name} | {:.2} | {:.2} | {} | {:.1} | {:.0} |",
            std::fs::metadata(&zip)?.len() as f64 / 1e6,
            bytes.len() as f64 / 1e6,
            sdks_in(&bytes),
            median(inits),
            median(answers),
        );
    }
    Ok(())
}

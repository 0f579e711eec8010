//! `kiln-replay`: an operator's command that replays what Lambda gave up on (see
//! [`kiln_events::replay`]). Reads the deployment's resources from the environment as the
//! functions do (or `--endpoint-url` for the local moto).
//!
//!   kiln-replay inbox       --queue-url <inbox-failures URL>
//!   kiln-replay job-events  --queue-url <job-events-failures URL>

use clap::{Parser, ValueEnum};
use kiln_aws::AwsPorts;
use kiln_lambda::FunctionConfig;

#[derive(Clone, Copy, ValueEnum)]
enum What {
    /// S3 inbox events `inbox-trigger` failed.
    Inbox,
    /// Stream batches `job-events` failed.
    JobEvents,
}

#[derive(Parser)]
#[command(name = "kiln-replay", about = "Replay the failures Lambda kept (inbox events, job-event stream batches)")]
struct Cli {
    what: What,
    /// The failures queue (terraform's `queue_urls` output).
    #[arg(long)]
    queue_url: String,
    #[command(flatten)]
    config: FunctionConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    kiln_lambda::init_tracing();
    let endpoint = cli.config.resources.endpoint_url.clone();
    let aws = AwsPorts::connect(&cli.config.resources).await;
    let clients = &aws.clients;
    let replayed = match cli.what {
        What::Inbox => {
            let inbox = kiln_events::inbox_trigger::wire(&aws, &cli.config);
            kiln_events::replay::replay_inbox(clients.sqs(), &cli.queue_url, &inbox).await?
        }
        What::JobEvents => {
            let changes = kiln_events::job_events::wire(&aws);
            let streams = aws_sdk_dynamodbstreams::Client::new(&kiln_aws::load_sdk_config(endpoint.as_deref()).await);
            kiln_events::replay::replay_job_events(clients.sqs(), &streams, &cli.queue_url, &changes).await?
        }
    };
    println!("replayed {}, failed again {}", replayed.replayed, replayed.failed);
    anyhow::ensure!(replayed.failed == 0, "{} failures failed again; they stay on the queue", replayed.failed);
    Ok(())
}

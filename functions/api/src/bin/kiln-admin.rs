//! `kiln-admin`: operator commands (see [`kiln_api::admin`]).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kiln_api::admin::run(kiln_api::admin::Cli::parse(), &mut std::io::stdout()).await
}

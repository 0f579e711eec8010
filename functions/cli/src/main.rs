//! `kiln`: the command line for kiln's API.
//!
//! ```text
//! kiln models
//! kiln run "a lighthouse at dusk" --model kiln-demo --size 512x512 [--frames 16 --format mp4] [--out DIR]
//! kiln jobs [--status running]      kiln get ID      kiln wait ID [--out DIR]      kiln cancel ID
//! kiln upload spec.json [--name N]  kiln webhook-secret [--rotate]
//! ```
//!
//! `run` submits, shows the queue position, then a progress bar by step, then downloads the
//! outputs and prints their paths; Ctrl-C cancels the job (asking first on a terminal).
//! `--json` prints the API's JSON on stdout for scripts. Exit codes: 0 done, 1 the job failed,
//! expired or was canceled, 2 usage, 3 the API refused the request, 4 the API or the network
//! failed, 130 interrupted.

mod api;
mod config;
mod follow;

use api::{Api, CliError};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Run and follow image and video jobs on a kiln API")]
struct Cli {
    /// The API's base URL.
    #[arg(long, env = "KILN_API", global = true)]
    api: Option<String>,
    /// The tenant's API key.
    #[arg(long, env = "KILN_KEY", global = true, hide_env_values = true)]
    key: Option<String>,
    /// Print the API's JSON on stdout (errors too), nothing else.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The models served, with their limits and defaults.
    Models,
    /// Submit a job, follow it, download its outputs.
    Run(Box<RunArgs>),
    /// The tenant's recent jobs.
    Jobs {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One job.
    Get { id: String },
    /// Follow a job until it ends; download its outputs.
    Wait {
        id: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        #[arg(long)]
        no_download: bool,
    },
    /// Cancel a job.
    Cancel { id: String },
    /// Upload a job spec (a JSON file) to the S3 inbox; prints where its result will be.
    Upload {
        file: PathBuf,
        /// The upload's name (default: the file's stem).
        #[arg(long)]
        name: Option<String>,
    },
    /// The tenant's webhook signing secret.
    WebhookSecret {
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    prompt: String,
    #[arg(long)]
    model: Option<String>,
    /// WIDTHxHEIGHT.
    #[arg(long)]
    size: Option<String>,
    #[arg(long)]
    frames: Option<u32>,
    #[arg(long)]
    fps: Option<u32>,
    /// png, gif, mp4 or webm.
    #[arg(long)]
    format: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    guidance: Option<f64>,
    #[arg(long)]
    negative: Option<String>,
    /// high, normal or low.
    #[arg(long)]
    priority: Option<String>,
    /// full or auto.
    #[arg(long)]
    quality: Option<String>,
    /// Also tell this URL when the job completes.
    #[arg(long)]
    webhook: Option<String>,
    /// Start from this PNG or JPEG (uploaded first).
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long)]
    strength: Option<f64>,
    /// Where the outputs go.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    #[arg(long)]
    no_download: bool,
    /// On Ctrl-C, leave the job running instead of canceling it.
    #[arg(long)]
    keep_on_interrupt: bool,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let json_out = cli.json;
    let code = match run(cli).await {
        Ok(()) => 0,
        Err(err) => {
            match json_out {
                true => println!("{}", err.to_json()),
                false => eprintln!("kiln: {err}"),
            }
            err.exit_code()
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let settings = config::resolve(cli.api, cli.key)?;
    let api = Api::new(&settings.api, &settings.key);
    let print = |value: &Value, human: &dyn Fn(&Value)| match cli.json {
        true => println!("{value}"),
        false => human(value),
    };
    match cli.command {
        Command::Models => {
            let models = api.models().await?;
            print(&models, &|models| {
                for model in models["models"].as_array().into_iter().flatten() {
                    let limits = &model["limits"];
                    println!(
                        "{:<20} {:<8} {:>4}–{:<4} x {:>4}–{:<4} frames ≤ {:<3} {}",
                        model["name"].as_str().unwrap_or("?"),
                        model["version"].as_str().unwrap_or("?"),
                        limits["width"]["min"],
                        limits["width"]["max"],
                        limits["height"]["min"],
                        limits["height"]["max"],
                        limits["num_frames"]["max"],
                        model["pipeline"].as_str().unwrap_or(""),
                    );
                }
            });
        }
        Command::Run(args) => {
            // From before the submit: Ctrl-C then cancels the job instead of ending the process.
            let mut interrupts = follow::Interrupts::listen()?;
            let body = submission(&api, &args, settings.model.as_deref()).await?;
            let job = api.submit(&body).await?;
            let id = job["id"].as_str().unwrap_or_default().to_owned();
            if !cli.json {
                let how = match (job["cached"].as_bool(), job["deduplicated"].as_bool()) {
                    (Some(true), _) => " (a cached result)",
                    (_, Some(true)) => " (joined an identical job)",
                    _ => "",
                };
                eprintln!("job {id}{how}");
            }
            let options = follow::Options {
                out: (!args.no_download).then_some(args.out),
                cancel_on_interrupt: !args.keep_on_interrupt,
                quiet: cli.json,
            };
            let (job, files) = follow::follow(&api, &id, &options, &mut interrupts).await?;
            print(&job_with_files(job, &files), &|_| {
                for file in &files {
                    println!("{}", file.display());
                }
            });
        }
        Command::Jobs { status, limit } => {
            let page = api.jobs(status.as_deref(), limit).await?;
            print(&page, &|page| {
                for job in page["jobs"].as_array().into_iter().flatten() {
                    let prompt: String = job["input"]["prompt"].as_str().unwrap_or("").chars().take(48).collect();
                    println!(
                        "{}  {:<9} {:<18} {prompt}",
                        job["id"].as_str().unwrap_or("?"),
                        job["status"].as_str().unwrap_or("?"),
                        job["model"].as_str().unwrap_or("?"),
                    );
                }
            });
        }
        Command::Get { id } => {
            let job = api.job(&id).await?;
            print(&job, &|job| println!("{}", serde_json::to_string_pretty(job).unwrap_or_default()));
        }
        Command::Wait { id, out, no_download } => {
            let mut interrupts = follow::Interrupts::listen()?;
            let options =
                follow::Options { out: (!no_download).then_some(out), cancel_on_interrupt: false, quiet: cli.json };
            let (job, files) = follow::follow(&api, &id, &options, &mut interrupts).await?;
            print(&job_with_files(job, &files), &|_| {
                for file in &files {
                    println!("{}", file.display());
                }
            });
        }
        Command::Cancel { id } => {
            let answer = api.cancel(&id).await?;
            print(&answer, &|job| {
                let state = if job["cancel_requested"] == true { "cancel requested" } else { "canceled" };
                println!("{id} {state}");
            });
        }
        Command::Upload { file, name } => {
            let bytes = std::fs::read(&file)?;
            let name = name
                .or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .ok_or_else(|| CliError::Usage("name the upload with --name".into()))?;
            let link = api.upload(&json!({"name": name, "size": bytes.len()}), bytes).await?;
            print(&link, &|link| {
                println!("uploaded {} as {}", file.display(), link["key"].as_str().unwrap_or("?"));
                println!("its result will be under {}", link["outbox"].as_str().unwrap_or("?"));
            });
        }
        Command::WebhookSecret { rotate } => {
            let secret = api.webhook_secret(rotate).await?;
            print(&secret, &|secret| println!("{}", secret["secret"].as_str().unwrap_or("?")));
        }
    }
    Ok(())
}

/// The body of `POST /v1/jobs` for `kiln run` (uploading `--image` first).
async fn submission(api: &Api, args: &RunArgs, default_model: Option<&str>) -> Result<Value, CliError> {
    let model = args.model.as_deref().or(default_model).ok_or_else(|| {
        CliError::Usage("name a model with --model (`kiln models` lists them) or `model = …` in the config".into())
    })?;
    let mut body = json!({"model": model, "prompt": args.prompt});
    if let Some(size) = &args.size {
        let (width, height) = size
            .split_once(['x', 'X'])
            .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
            .ok_or_else(|| CliError::Usage(format!("--size {size}: expected WIDTHxHEIGHT, e.g. 512x512")))?;
        body["width"] = width.into();
        body["height"] = height.into();
    }
    let optional: [(&str, Option<Value>); 11] = [
        ("num_frames", args.frames.map(Value::from)),
        ("fps", args.fps.map(Value::from)),
        ("format", args.format.clone().map(Value::from)),
        ("seed", args.seed.map(Value::from)),
        ("steps", args.steps.map(Value::from)),
        ("guidance", args.guidance.map(Value::from)),
        ("negative_prompt", args.negative.clone().map(Value::from)),
        ("priority", args.priority.clone().map(Value::from)),
        ("quality", args.quality.clone().map(Value::from)),
        ("webhook", args.webhook.clone().map(|url| json!({"url": url}))),
        ("strength", args.strength.map(Value::from)),
    ];
    for (field, value) in optional {
        if let Some(value) = value {
            body[field] = value;
        }
    }
    if let Some(path) = &args.image {
        let bytes = std::fs::read(path)?;
        let content_type = match bytes.get(..4) {
            Some([0x89, b'P', b'N', b'G']) => "image/png",
            Some([0xFF, 0xD8, 0xFF, _]) => "image/jpeg",
            _ => return Err(CliError::Usage(format!("--image {}: not a PNG or JPEG file", path.display()))),
        };
        let request = json!({"kind": "image", "content_type": content_type, "size": bytes.len()});
        let link = api.upload(&request, bytes).await?;
        body["init_image"] = link["image"].clone();
    }
    Ok(body)
}

/// The job as the API shows it, with the paths its outputs were written to.
fn job_with_files(mut job: Value, files: &[PathBuf]) -> Value {
    job["downloaded"] = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().into();
    job
}

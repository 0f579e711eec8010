//! `diffusion-bench`: how close the latent-diffusion pipeline comes to what its UNet allows.
//!
//! `speed` measures, for one package on one device:
//! 1. raw ONNX Runtime: the UNet the device is served (a prepared package's CUDA graph on CUDA)
//!    alone, `session.run` with host inputs, at `--rows` (an image with guidance is two rows):
//!    median ms per run;
//! 2. the pipeline (tokenizer, text encoder, every scheduler step, VAE decode, conversion to
//!    RGB) rendering 4 and 25 steps, with and without guidance, one image or a full UNet batch
//!    of them, with IO binding on and off: images/s, and that as a share of the images/s the raw
//!    step times allow (images per UNet run / (steps × raw ms per run)), which leaves out only
//!    the text encoder, VAE and our own work.
//!
//! `render` renders one job and writes its frames as raw RGB (for comparing a CUDA render with
//! `gpu-runner/sd/reference.py`).
//!
//!     diffusion-bench --ort-dylib <libonnxruntime.so> --device cuda speed --package <dir>
//!
//! The commands that produced BENCHMARKS.md's figures are written there.

use clap::{Parser, Subcommand};
use kiln_domain::{ModelSpec, Submission, WebhookPolicy};
use kiln_runner::render::{
    Pipeline, RenderControl, RenderRequest,
    diffusion::{DiffusionOptions, LatentDiffusion, float_tensor, graphs::GraphFiles},
    runtime::{self, Device, SessionOptions},
};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

#[derive(Parser)]
struct Cli {
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_dylib: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: Device,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Speed {
        #[arg(long)]
        package: PathBuf,
        #[arg(long, default_value_t = 512)]
        size: u32,
        /// Timed runs per raw measurement (after 3 warm-up runs).
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Timed renders per pipeline case (after one warm-up).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long, default_value = "4,25", value_delimiter = ',')]
        steps: Vec<u32>,
        /// UNet rows per raw run.
        #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
        rows: Vec<usize>,
        /// Most UNet rows per pipeline run (`KILN_MAX_UNET_ROWS`); the full-batch cases fill it.
        #[arg(long, default_value_t = 4)]
        max_rows: usize,
        /// IO binding in the pipeline cases: on, off, or both.
        #[arg(long, default_value = "both")]
        io_binding: String,
    },
    Render {
        #[arg(long)]
        package: PathBuf,
        /// The job, as the body of POST /v1/jobs.
        #[arg(long)]
        job: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let max_rows = match &cli.command {
        Command::Speed { max_rows, .. } => *max_rows,
        Command::Render { .. } => 4,
    };
    let options = |io_binding: bool| SessionOptions {
        dylib: cli.ort_dylib.clone(),
        device: cli.device,
        intra_threads: 0,
        diffusion: DiffusionOptions { max_unet_rows: max_rows, io_binding },
    };
    match &cli.command {
        Command::Render { package, job, out } => {
            let mut pipeline = LatentDiffusion::load(package, &options(matches!(cli.device, Device::Cuda(_))))?;
            let frames = pipeline.render(&request(package, job)?)?;
            std::fs::write(out, frames.frames.concat())?;
            eprintln!(
                "wrote {} frames of {}x{} to {}",
                frames.frames.len(),
                frames.width,
                frames.height,
                out.display()
            );
        }
        Command::Speed { package, size, runs, repeats, steps, rows, max_rows, io_binding } => {
            let spec = ModelSpec::read_manifest(package)?;
            let unet = GraphFiles::read(package)?.path(package, "unet", cli.device);
            println!(
                "package {} ({}), device {}, {size}x{size}, UNet graph {}",
                spec.name,
                package.display(),
                cli.device,
                unet.strip_prefix(package).unwrap_or(&unet).display()
            );
            let raw = raw_unet(&unet, &options(false), *size, *runs, rows)?;
            println!("\n| UNet rows per run | raw ms per run (median of {runs}) | ms per row |");
            println!("|---:|---:|---:|");
            for (rows, ms) in &raw {
                println!("| {rows} | {ms:.2} | {:.2} |", ms / *rows as f64);
            }
            let raw_ms = |rows: usize| raw.iter().find(|(r, _)| *r == rows).map(|(_, ms)| *ms).unwrap_or(f64::NAN);
            println!(
                "\n| guidance | images per batch | UNet rows per run | steps | IO binding | s per batch (median of {repeats}) | images/s | raw-step bound images/s | share of bound |"
            );
            println!("|---|---:|---:|---:|---|---:|---:|---:|---:|");
            let bindings = match io_binding.as_str() {
                "on" => vec![true],
                "off" => vec![false],
                _ => vec![true, false],
            };
            for io_binding in bindings {
                let mut pipeline = LatentDiffusion::load(package, &options(io_binding))?;
                for &steps in steps {
                    for (guidance, images) in [(7.5, 1), (7.5, max_rows / 2), (0.0, 1), (0.0, *max_rows)] {
                        let rows = if guidance > 1.0 { images * 2 } else { images };
                        let jobs: Vec<String> = (0..images)
                            .map(|n| {
                                serde_json::json!({
                                    "model": spec.name, "prompt": format!("a lighthouse on a cliff, scene {n}"),
                                    "width": size, "height": size, "steps": steps, "guidance": guidance, "seed": n,
                                })
                                .to_string()
                            })
                            .collect();
                        let batch = || -> anyhow::Result<Vec<RenderRequest>> {
                            jobs.iter().map(|j| request(package, j)).collect()
                        };
                        pipeline.render_batch(&batch()?).into_iter().collect::<Result<Vec<_>, _>>()?; // warm-up
                        let mut times = Vec::new();
                        for _ in 0..*repeats {
                            let batch = batch()?;
                            let started = Instant::now();
                            pipeline.render_batch(&batch).into_iter().collect::<Result<Vec<_>, _>>()?;
                            times.push(started.elapsed().as_secs_f64());
                        }
                        times.sort_by(f64::total_cmp);
                        let seconds = times[times.len() / 2];
                        let rate = images as f64 / seconds;
                        let bound = images as f64 / (steps as f64 * raw_ms(rows) / 1000.0);
                        println!(
                            "| {guidance} | {images} | {rows} | {steps} | {} | {seconds:.3} | {rate:.2} | {bound:.2} | {:.0}% |",
                            if io_binding { "on" } else { "off" },
                            100.0 * rate / bound
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn request(package: &Path, body: &str) -> anyhow::Result<RenderRequest> {
    let model = ModelSpec::read_manifest(package)?;
    let params = Submission::parse(body.as_bytes())
        .map_err(|err| anyhow::anyhow!("{err}"))?
        .resolve(&model, WebhookPolicy::default(), || 0)
        .map_err(|err| anyhow::anyhow!("{err}"))?
        .params;
    Ok(RenderRequest { params, control: Arc::new(RenderControl::default()) })
}

/// The UNet graph `unet` alone at each of `row_counts`: median milliseconds of one `session.run`.
fn raw_unet(
    unet: &Path,
    options: &SessionOptions,
    size: u32,
    runs: usize,
    row_counts: &[usize],
) -> anyhow::Result<Vec<(usize, f64)>> {
    let mut session = runtime::load(unet, options)?;
    let inputs: Vec<(String, TensorElementType, Vec<i64>)> = session
        .inputs()
        .iter()
        .filter_map(|input| match input.dtype() {
            ValueType::Tensor { ty, shape, .. } => Some((input.name().to_owned(), *ty, shape.to_vec())),
            _ => None,
        })
        .collect();
    let latent = (size / 8) as i64;
    let mut results = Vec::new();
    for &rows in row_counts {
        let make = |name: &str, ty: TensorElementType, declared: &[i64]| -> anyhow::Result<DynValue> {
            let shape: Vec<i64> = match name {
                "sample" => vec![rows as i64, 4, latent, latent],
                "timestep" if declared.first() == Some(&1) => vec![1],
                "timestep" => vec![rows as i64],
                _ => declared.iter().enumerate().map(|(i, d)| if i == 0 { rows as i64 } else { *d }).collect(),
            };
            let count = shape.iter().product::<i64>() as usize;
            let values: Vec<f32> = (0..count).map(|i| ((i % 97) as f32 / 97.0) - 0.5).collect();
            Ok(match ty {
                TensorElementType::Int64 => Tensor::from_array((shape, vec![500i64; count]))?.into_dyn(),
                other => float_tensor(other, shape, &values).map_err(|err| anyhow::anyhow!("input {name}: {err}"))?,
            })
        };
        let mut times = Vec::new();
        for run in 0..runs + 3 {
            let values: Vec<(String, DynValue)> = inputs
                .iter()
                .map(|(name, ty, shape)| Ok((name.clone(), make(name, *ty, shape)?)))
                .collect::<anyhow::Result<_>>()?;
            let started = Instant::now();
            let outputs = session.run(values)?;
            let first = outputs.values().next().ok_or_else(|| anyhow::anyhow!("no output"))?;
            // Reading the output back to the host is part of a step.
            match first.dtype().tensor_type() {
                Some(TensorElementType::Float16) => drop(first.try_extract_tensor::<half::f16>()?),
                _ => drop(first.try_extract_tensor::<f32>()?),
            }
            if run >= 3 {
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        times.sort_by(f64::total_cmp);
        results.push((rows, times[times.len() / 2]));
    }
    Ok(results)
}

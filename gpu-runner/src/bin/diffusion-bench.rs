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
//! `gpu-runner/sd/reference.py`). `video` times whole renders of one job on any pipeline (a
//! motion model's video) and `decode` a VAE decode of one large frame, whole or in tiles
//! (`gpu-runner/sd/motion-bench.sh` runs both).
//!
//!     diffusion-bench --ort-dylib <libonnxruntime.so> --device cuda speed --package <dir>
//!
//! The commands that produced BENCHMARKS.md's figures are written there.

use clap::{Parser, Subcommand};
use kiln_domain::{ModelSpec, Submission, WebhookPolicy};
use kiln_runner::render::{
    Pipeline, RenderControl, RenderRequest,
    diffusion::{DiffusionOptions, LatentDiffusion, float_tensor, graphs::GraphFiles},
    runtime::{self, ConvSearch, Device, SessionOptions},
};
use ort::{
    memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType},
    session::RunOptions,
    value::{DynTensor, DynValue, Tensor, TensorElementType, ValueType},
};
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
    /// cuDNN's convolution algorithm search (`KILN_CUDNN_CONV_SEARCH`).
    #[arg(long, value_enum, default_value_t = ConvSearch::Exhaustive)]
    conv_search: ConvSearch,
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
        /// CUDA graph shapes per step graph session in the pipeline cases (`KILN_CUDA_GRAPHS`),
        /// one pipeline per value: e.g. `8,0` for with and without.
        #[arg(long, default_value = "8", value_delimiter = ',')]
        cuda_graphs: Vec<usize>,
    },
    /// Renders one job (any pipeline: a motion model's video, say) `--repeats` times after a
    /// warm-up and prints the median seconds per render.
    Video {
        #[arg(long)]
        package: PathBuf,
        /// The job, as the body of POST /v1/jobs.
        #[arg(long)]
        job: String,
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Write the last render's frames here, as raw RGB.
        #[arg(long)]
        out: Option<PathBuf>,
        /// A PNG or JPEG the job starts from (image-to-image, image-to-video): the job names it
        /// as `"init_image": "img_01KBWJ5N0000000000000000AA.png"`.
        #[arg(long)]
        init_image: Option<PathBuf>,
    },
    /// Decodes seeded latents of one frame of `--width`×`--height` with the package's VAE
    /// decoder, whole or in tiles, and prints the median seconds (after a warm-up).
    Decode {
        #[arg(long)]
        package: PathBuf,
        #[arg(long, default_value_t = 1920)]
        width: u32,
        #[arg(long, default_value_t = 1080)]
        height: u32,
        /// `tiled` (the package's tiles, 64 latents by default) or `whole`.
        #[arg(long, default_value = "tiled")]
        mode: String,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    Render {
        #[arg(long)]
        package: PathBuf,
        /// The job, as the body of POST /v1/jobs.
        #[arg(long)]
        job: String,
        #[arg(long)]
        out: PathBuf,
        /// CUDA graph shapes (`KILN_CUDA_GRAPHS`); 0: none.
        #[arg(long, default_value_t = kiln_runner::render::diffusion::DEFAULT_CUDA_GRAPHS)]
        cuda_graphs: usize,
        /// Render the job this many times in one pipeline (a CUDA graph is captured on its
        /// shape's second run: the third replays it); the frames written are the last render's,
        /// and each render's are compared with the first's.
        #[arg(long, default_value_t = 1)]
        times: usize,
        /// Render the job beside a companion (the same job, seed + 1) that is canceled once it
        /// has done this share of its steps (0 to 1), so the job leaves a chunk of two lanes
        /// midway and goes on alone: its frames should be those it renders alone.
        #[arg(long)]
        companion_leaves_at: Option<f32>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let max_rows = match &cli.command {
        Command::Speed { max_rows, .. } => *max_rows,
        _ => 4,
    };
    let options = |io_binding: bool, cuda_graphs: usize| SessionOptions {
        dylib: cli.ort_dylib.clone(),
        device: cli.device,
        intra_threads: 0,
        diffusion: DiffusionOptions { max_unet_rows: max_rows, io_binding, cuda_graphs },
        conv_search: cli.conv_search,
    };
    match &cli.command {
        Command::Video { package, job, repeats, out, init_image } => {
            let image = init_image.as_deref().map(std::fs::read).transpose()?;
            let spec = ModelSpec::read_manifest(package)?;
            let mut pipeline = kiln_runner::packages::load(package, spec.clone(), &options(false, 0))?.pipeline;
            let mut times = Vec::new();
            for run in 0..=*repeats {
                let started = Instant::now();
                let frames = pipeline.render(&request_with_image(package, job, image.as_deref())?)?;
                let seconds = started.elapsed().as_secs_f64();
                eprintln!(
                    "render {run}: {seconds:.3} s, {} frames of {}x{}",
                    frames.frames.len(),
                    frames.width,
                    frames.height
                );
                if run > 0 {
                    times.push(seconds);
                }
                if let (Some(out), true) = (out, run == *repeats) {
                    std::fs::write(out, frames.frames.concat())?;
                }
            }
            times.sort_by(f64::total_cmp);
            println!("| {} | {} | {} | {:.3} |", spec.name, cli.device, job, times[times.len() / 2]);
        }
        Command::Decode { package, width, height, mode, repeats } => {
            use kiln_runner::render::{diffusion::VaeDecoder, noise::gaussian};
            let mut decoder = VaeDecoder::load(package, &options(false, 0))?;
            if mode == "whole" {
                decoder.set_tiling(None);
            }
            let (h, w) = ((*height / 8) as usize, (*width / 8) as usize);
            let latent: Vec<f32> = gaussian(1, 0, 4 * h * w).iter().map(|v| v * 0.18215 * 4.0).collect();
            let mut times = Vec::new();
            for run in 0..=*repeats {
                let started = Instant::now();
                let frames = decoder.decode(&[&latent], h, w)?;
                let seconds = started.elapsed().as_secs_f64();
                eprintln!("decode {run}: {seconds:.3} s, {} bytes", frames[0].len());
                if run > 0 {
                    times.push(seconds);
                }
            }
            times.sort_by(f64::total_cmp);
            println!("| {width}x{height} | {mode} | {} | {:.3} |", cli.device, times[times.len() / 2]);
        }
        Command::Render { package, job, out, cuda_graphs, times, companion_leaves_at } => {
            let mut pipeline =
                LatentDiffusion::load(package, &options(matches!(cli.device, Device::Cuda(_)), *cuda_graphs))?;
            let mut first: Option<Vec<u8>> = None;
            let mut frames = None;
            for time in 0..(*times).max(1) {
                let rendered = match companion_leaves_at {
                    None => pipeline.render(&request(package, job)?)?,
                    Some(share) => render_beside_a_leaver(&mut pipeline, package, job, *share)?,
                };
                let bytes = rendered.frames.concat();
                match &first {
                    None => first = Some(bytes),
                    Some(first) => {
                        let differ = first.iter().zip(&bytes).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
                        eprintln!("render {}: max |diff| from the first render {differ} of 255", time + 1);
                    }
                }
                frames = Some(rendered);
            }
            let frames = frames.expect("rendered at least once");
            eprintln!("CUDA graph runs: {:?}", pipeline.take_graph_runs());
            std::fs::write(out, frames.frames.concat())?;
            eprintln!(
                "wrote {} frames of {}x{} to {}",
                frames.frames.len(),
                frames.width,
                frames.height,
                out.display()
            );
        }
        Command::Speed { package, size, runs, repeats, steps, rows, max_rows, io_binding, cuda_graphs } => {
            let spec = ModelSpec::read_manifest(package)?;
            let unet = GraphFiles::read(package)?.path(package, "unet", cli.device);
            println!(
                "package {} ({}), device {}, {size}x{size}, UNet graph {}",
                spec.name,
                package.display(),
                cli.device,
                unet.strip_prefix(package).unwrap_or(&unet).display()
            );
            let raw = raw_unet(&unet, &options(false, 0), *size, *runs, rows)?;
            // A graph ONNX Runtime cannot capture (CPU nodes between CUDA ones) says why in its column.
            let bound = |graph: bool| -> Vec<String> {
                match raw_unet_bound(&unet, &options(false, 0), *size, *runs, rows, graph) {
                    Ok(times) => times.iter().map(|(_, ms)| format!("{ms:.2}")).collect(),
                    Err(err) => {
                        eprintln!("raw UNet with device inputs (CUDA graph: {graph}): {err:#}");
                        vec!["failed (bench.log)".into(); rows.len()]
                    }
                }
            };
            let device_inputs = match cli.device {
                Device::Cuda(_) => Some((bound(false), bound(true))),
                Device::Cpu => None,
            };
            println!(
                "\n| UNet rows per run | raw ms per run (median of {runs}) | ms per row | inputs on the device | + CUDA graph |"
            );
            println!("|---:|---:|---:|---:|---:|");
            for (index, (rows, ms)) in raw.iter().enumerate() {
                let (bound, graph) = match &device_inputs {
                    Some((bound, graph)) => (bound[index].clone(), graph[index].clone()),
                    None => ("-".into(), "-".into()),
                };
                println!("| {rows} | {ms:.2} | {:.2} | {bound} | {graph} |", ms / *rows as f64);
            }
            let raw_ms = |rows: usize| raw.iter().find(|(r, _)| *r == rows).map(|(_, ms)| *ms).unwrap_or(f64::NAN);
            println!(
                "\n| guidance | images per batch | UNet rows per run | steps | IO binding | CUDA graphs | s per batch (median of {repeats}) | images/s | raw-step bound images/s | share of bound |"
            );
            println!("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|");
            let bindings = match io_binding.as_str() {
                "on" => vec![true],
                "off" => vec![false],
                _ => vec![true, false],
            };
            let cases = bindings.iter().flat_map(|binding| cuda_graphs.iter().map(move |graphs| (*binding, *graphs)));
            for (io_binding, graphs) in cases {
                let mut pipeline = LatentDiffusion::load(package, &options(io_binding, graphs))?;
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
                        // Warm-up: two renders, so a CUDA graph is captured before the timed ones.
                        for _ in 0..2 {
                            pipeline.render_batch(&batch()?).into_iter().collect::<Result<Vec<_>, _>>()?;
                        }
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
                            "| {guidance} | {images} | {rows} | {steps} | {} | {graphs} | {seconds:.3} | {rate:.2} | {bound:.2} | {:.0}% |",
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

/// `job` rendered in one batch with a companion (seed + 1) canceled once it has done `share` of
/// its steps; `job`'s frames.
fn render_beside_a_leaver(
    pipeline: &mut LatentDiffusion,
    package: &Path,
    job: &str,
    share: f32,
) -> anyhow::Result<kiln_runner::render::Frames> {
    let main = request(package, job)?;
    let mut companion = request(package, job)?;
    companion.params.seed = companion.params.seed.wrapping_add(1);
    let control = companion.control.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = done.clone();
    let watcher = std::thread::spawn(move || {
        while !watching.load(std::sync::atomic::Ordering::Relaxed) {
            if control.progress() >= share {
                control.stop(kiln_runner::render::StopReason::Canceled);
                return true;
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        false
    });
    let mut results = pipeline.render_batch(&[main, companion]);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let canceled = watcher.join().expect("the watcher thread");
    let companion = results.pop().expect("two results");
    let main = results.pop().expect("two results")?;
    eprintln!(
        "the companion was canceled at {:.0}% of its steps: {}",
        100.0 * share,
        match (canceled, companion) {
            (true, Err(err)) => format!("it stopped ({err}); the job went on alone"),
            (_, Ok(_)) => "it finished anyway (the job never rendered alone)".into(),
            (false, Err(err)) => format!("it failed: {err}"),
        }
    );
    Ok(main)
}

fn request(package: &Path, body: &str) -> anyhow::Result<RenderRequest> {
    request_with_image(package, body, None)
}

/// The job `body` on `package`'s model, starting from `image` (the bytes of the file its
/// `init_image` names) when there is one.
fn request_with_image(package: &Path, body: &str, image: Option<&[u8]>) -> anyhow::Result<RenderRequest> {
    let model = ModelSpec::read_manifest(package)?;
    let inspected = image
        .map(|bytes| kiln_domain::image::inspect("images/bench/img_01KBWJ5N0000000000000000AA.png", bytes))
        .transpose()
        .map_err(|err| anyhow::anyhow!("{err}"))?;
    let params = Submission::parse(body.as_bytes())
        .map_err(|err| anyhow::anyhow!("{err}"))?
        .resolve_with_image(&model, WebhookPolicy::default(), || 0, inspected)
        .map_err(|err| anyhow::anyhow!("{err}"))?
        .params;
    let init_image =
        image.map(|bytes| kiln_runner::render::input::fit(bytes, params.width, params.height)).transpose()?;
    Ok(RenderRequest { params, control: Arc::new(RenderControl::default()), init_image })
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
    let inputs = tensor_inputs(&session);
    let latent = (size / 8) as i64;
    let mut results = Vec::new();
    for &rows in row_counts {
        let make = |name: &str, ty: TensorElementType, declared: &[i64]| raw_input(name, ty, declared, rows, latent);
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

/// The UNet graph `unet` alone with every input and the output in device buffers bound once (no
/// copies between runs), at each of `row_counts`: median milliseconds of one run; with `graph`,
/// on a session that captures each row count as a CUDA graph and replays it.
fn raw_unet_bound(
    unet: &Path,
    options: &SessionOptions,
    size: u32,
    runs: usize,
    row_counts: &[usize],
    graph: bool,
) -> anyhow::Result<Vec<(usize, f64)>> {
    let mut session = match graph {
        true => runtime::load_for_cuda_graphs(unet, options)?,
        false => runtime::load(unet, options)?,
    };
    let Device::Cuda(id) = options.device else { anyhow::bail!("device buffers need a CUDA device") };
    let memory = MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)?;
    let allocator = Allocator::new(&session, memory)?;
    let inputs = tensor_inputs(&session);
    let (output_name, output_ty) = match session.outputs().first().map(|o| (o.name().to_owned(), o.dtype().clone())) {
        Some((name, ValueType::Tensor { ty, .. })) => (name, ty),
        _ => anyhow::bail!("the UNet has no tensor output"),
    };
    let latent = (size / 8) as i64;
    let mut results = Vec::new();
    // Buffers of every row count stay alive: a replayed graph reads the addresses it captured.
    let mut kept = Vec::new();
    for (index, &rows) in row_counts.iter().enumerate() {
        let mut binding = session.create_binding()?;
        for (name, ty, declared) in &inputs {
            let host = raw_input(name, *ty, declared, rows, latent)?;
            let shape = match host.dtype() {
                ValueType::Tensor { shape, .. } => shape.to_vec(),
                _ => unreachable!("raw_input makes tensors"),
            };
            let mut buffer = DynTensor::new(&allocator, *ty, shape)?;
            host.downcast::<ort::value::DynTensorValueType>()?.copy_into(&mut buffer)?;
            binding.bind_input(name.as_str(), &buffer)?;
            kept.push(buffer);
        }
        let mut output = DynTensor::new(&allocator, output_ty, vec![rows as i64, 4, latent, latent])?;
        binding.bind_output(output_name.as_str(), &mut output)?;
        let mut run_options = RunOptions::new()?;
        if graph {
            run_options.set("gpu_graph_id", (index + 1).to_string())?;
        }
        let mut times = Vec::new();
        for run in 0..runs + 3 {
            let started = Instant::now();
            session.run_binding_with_options(&binding, &run_options)?;
            if run >= 3 {
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        kept.push(output);
        times.sort_by(f64::total_cmp);
        results.push((rows, times[times.len() / 2]));
    }
    Ok(results)
}

/// A session's tensor inputs: name, element type, declared shape.
fn tensor_inputs(session: &ort::session::Session) -> Vec<(String, TensorElementType, Vec<i64>)> {
    session
        .inputs()
        .iter()
        .filter_map(|input| match input.dtype() {
            ValueType::Tensor { ty, shape, .. } => Some((input.name().to_owned(), *ty, shape.to_vec())),
            _ => None,
        })
        .collect()
}

/// A UNet input of `rows` rows at `latent`² latents, filled with a fixed pattern.
fn raw_input(
    name: &str,
    ty: TensorElementType,
    declared: &[i64],
    rows: usize,
    latent: i64,
) -> anyhow::Result<DynValue> {
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
}

//! The `latent-diffusion` pipeline: Stable Diffusion family models (SD 1.5, SD 2.x, SD-Turbo,
//! LCM) exported to ONNX in the layout Hugging Face optimum writes:
//!
//! ```text
//! <package>/manifest.json               kiln's description (limits, defaults; `graphs`: which
//!                                       graph serves which device, see [`graphs`])
//!           model_index.json            optimum's
//!           tokenizer/                  vocab.json + merges.txt, or tokenizer.json
//!           text_encoder/model.onnx     input_ids -> last_hidden_state
//!           unet/model.onnx             sample, timestep, encoder_hidden_states [, timestep_cond] -> out_sample
//!           vae_decoder/model.onnx      latent_sample -> sample   (+ config.json: scaling_factor)
//!           scheduler/scheduler_config.json
//! ```
//!
//! One render: tokenize (77 tokens, truncation reported), encode the prompt (and the negative
//! prompt when guidance > 1), start from seeded Gaussian latents, run the scheduler's steps with
//! the conditional and unconditional UNet passes in one batch, decode with the VAE. Graphs may be
//! fp32 or fp16: inputs are converted to what each graph declares. A video is `num_frames` images
//! along a seeded latent walk (spherical interpolation between keyframe noises, one every
//! [`FRAMES_PER_KEY`] frames), rendered as a batch. Jobs of one batch share UNet runs too.
//!
//! `gpu-runner/sd/reference.py` is the same algorithm in numpy; a test holds the two together.

pub mod graphs;
pub mod motion;
pub mod plan;
pub mod scheduler;
mod stepped;
pub mod tiling;
pub mod tokenizer;

use half::f16;
use ort::{
    memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType},
    session::{Session, SessionInputValue},
    value::{DynValue, Tensor, TensorElementType, ValueType},
};
use std::{borrow::Cow, collections::HashMap, path::Path};

use super::{
    Frames, Pipeline, RenderError, RenderRequest,
    noise::{gaussian, slerp},
    runtime::{self, ConvSearch, Device, RuntimeError, SessionOptions},
};
use graphs::GraphFiles;
use plan::{JobShape, Lane, Row, UnetGuidance, plan};
use scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use stepped::{CapturedGraphs, StepCall};
use tiling::TilePolicy;
use tokenizer::{PromptTokenizer, TokenizerError};

/// Latent channels and the VAE's downsampling, as in every Stable Diffusion 1.x/2.x model.
const LATENT_CHANNELS: usize = 4;
const VAE_FACTOR: u32 = 8;
/// Keyframe noises of a video's latent walk are this many frames apart.
pub const FRAMES_PER_KEY: usize = 8;
/// Noise streams (per job seed): keyframe `k` uses stream `k`; step `i`'s fresh noise (Euler-a,
/// LCM) uses `STEP_STREAM + i`, the same for every frame so a video stays coherent.
const STEP_STREAM: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum DiffusionLoadError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: {message}")]
    Invalid { path: std::path::PathBuf, message: String },
}

/// How the pipeline runs its UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffusionOptions {
    /// Most UNet rows per run, counted at 512×512 (smaller images fit proportionally more).
    /// With guidance each image is two rows. Bounds GPU memory whatever the batch or video.
    pub max_unet_rows: usize,
    /// Bind the prompt embeddings to the device once per batch and rebind only the latents each
    /// step (ONNX Runtime IO binding), instead of copying every input every step.
    pub io_binding: bool,
    /// With a package's step graph: most chunk shapes (lanes × rows × size) whose steps are
    /// captured as CUDA graphs and replayed ([`stepped::CapturedGraphs`]); 0 captures none. On
    /// the CPU nothing is captured but the graphs' fixed buffers are used (for tests).
    pub cuda_graphs: usize,
}

/// Chunk shapes captured per step graph session by default: every lane count of the default
/// `max_unet_rows` at one size, guided and not, and a few more sizes.
pub const DEFAULT_CUDA_GRAPHS: usize = 8;

impl DiffusionOptions {
    pub fn for_device(device: Device) -> Self {
        let cuda = matches!(device, Device::Cuda(_));
        Self { max_unet_rows: 4, io_binding: cuda, cuda_graphs: if cuda { DEFAULT_CUDA_GRAPHS } else { 0 } }
    }
}

/// What a package's `manifest.json` says of how its pipeline runs, beyond its graphs.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct PipelineSettings {
    /// When and how the decoder works in tiles (defaults: tiles of 64 latents, a quarter
    /// overlapping).
    #[serde(default)]
    pub vae_tiling: TilePolicy,
    /// A motion model's context window (`motion-diffusion` packages).
    #[serde(default)]
    pub motion: Option<motion::MotionContext>,
}

impl PipelineSettings {
    pub fn read(package: &Path) -> Result<Self, DiffusionLoadError> {
        let path = package.join("manifest.json");
        let invalid = |message: String| DiffusionLoadError::Invalid { path: path.clone(), message };
        let text = std::fs::read_to_string(&path).map_err(|err| invalid(err.to_string()))?;
        serde_json::from_str(&text).map_err(|err| invalid(err.to_string()))
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, DiffusionLoadError> {
    let invalid = |message: String| DiffusionLoadError::Invalid { path: path.to_owned(), message };
    let text = std::fs::read_to_string(path).map_err(|err| invalid(err.to_string()))?;
    serde_json::from_str(&text).map_err(|err| invalid(err.to_string()))
}

/// The package's scheduler (`scheduler/scheduler_config.json`); one kiln does not implement runs
/// as Euler on its noise schedule.
fn load_scheduler(package: &Path) -> Result<(SchedulerConfig, SchedulerKind), DiffusionLoadError> {
    let path = package.join("scheduler/scheduler_config.json");
    let invalid = |message: String| DiffusionLoadError::Invalid { path: path.clone(), message };
    let scheduler: SchedulerConfig =
        serde_json::from_value(read_json(&path)?).map_err(|err| invalid(err.to_string()))?;
    let kind = SchedulerKind::of(&scheduler.class_name).unwrap_or_else(|| {
        tracing::warn!(class = %scheduler.class_name, "scheduler not implemented; using Euler on its noise schedule");
        SchedulerKind::Euler
    });
    Scheduler::new(kind, &scheduler, 1).map_err(|err| invalid(err.to_string()))?;
    Ok((scheduler, kind))
}

/// The VAE's latent scaling (`vae_decoder/config.json`; SD's 0.18215 when it does not say).
fn load_scaling_factor(package: &Path) -> Result<f64, DiffusionLoadError> {
    let path = package.join("vae_decoder/config.json");
    Ok(match path.exists() {
        true => read_json(&path)?["scaling_factor"].as_f64().unwrap_or(0.18215),
        false => 0.18215,
    })
}

/// The VAE encoder, for jobs that start from an image: a package without one
/// (`vae_encoder/model.onnx`) renders only from noise.
struct Encoder {
    graph: Option<Graph>,
    scaling_factor: f64,
}

impl Encoder {
    fn load(
        package: &Path,
        files: &GraphFiles,
        options: &SessionOptions,
        scaling_factor: f64,
    ) -> Result<Self, DiffusionLoadError> {
        let path = files.path(package, "vae_encoder", options.device);
        let graph = match path.is_file() {
            true => {
                let graph = Graph::load(&path, options, "latent_sample")?;
                graph.input("sample", &path)?;
                Some(graph)
            }
            false => None,
        };
        Ok(Self { graph, scaling_factor })
    }

    /// The image's latents (`[4, h/8, w/8]`, scaled as the UNet sees them).
    fn encode(&mut self, image: &crate::render::input::InputImage) -> Result<Vec<f32>, RenderError> {
        let graph = self.graph.as_mut().ok_or_else(|| {
            RenderError::Invalid("init_image: this model has no VAE encoder, so it renders from noise only".into())
        })?;
        let (width, height) = (image.width as usize, image.height as usize);
        let plane = width * height;
        let mut data = vec![0f32; 3 * plane];
        for (pixel, rgb) in image.rgb.chunks_exact(3).enumerate() {
            for channel in 0..3 {
                data[channel * plane + pixel] = f32::from(rgb[channel]) / 127.5 - 1.0;
            }
        }
        let (ty, _) = graph.inputs["sample"].clone();
        let input = float_tensor(ty, vec![1, 3, height as i64, width as i64], &data)?;
        let outputs = graph.session.run(ort::inputs!["sample" => input])?;
        let (_, latents) = extract_floats(&outputs[graph.output.as_str()])?;
        Ok(latents.iter().map(|v| (f64::from(*v) * self.scaling_factor) as f32).collect())
    }
}

/// A package's VAE decoder on its own (for benchmarks): latents to RGB bytes, in tiles above
/// the package's tile size unless told otherwise.
pub struct VaeDecoder(Decoder);

impl VaeDecoder {
    pub fn load(package: &Path, options: &SessionOptions) -> Result<Self, DiffusionLoadError> {
        let files = GraphFiles::read(package)?;
        let tiling = PipelineSettings::read(package)?.vae_tiling;
        Ok(Self(Decoder::plain(package, &files, options, load_scaling_factor(package)?, tiling)?))
    }

    /// `None`: never tile.
    pub fn set_tiling(&mut self, tiling: Option<TilePolicy>) {
        self.0.tiling = tiling.unwrap_or(TilePolicy { tile: usize::MAX, ..TilePolicy::default() });
    }

    pub fn decode(
        &mut self,
        latents: &[&[f32]],
        latent_height: usize,
        latent_width: usize,
    ) -> Result<Vec<Vec<u8>>, RenderError> {
        self.0.decode(latents, latent_height, latent_width)
    }
}

/// A graph and what its inputs want.
struct Graph {
    session: Session,
    inputs: HashMap<String, (TensorElementType, Vec<i64>)>,
    output: String,
}

impl Graph {
    fn load(path: &Path, options: &SessionOptions, output: &str) -> Result<Self, DiffusionLoadError> {
        Self::from_session(runtime::load(path, options)?, output)
    }

    fn from_session(session: Session, output: &str) -> Result<Self, DiffusionLoadError> {
        let inputs = session
            .inputs()
            .iter()
            .filter_map(|input| match input.dtype() {
                ValueType::Tensor { ty, shape, .. } => Some((input.name().to_owned(), (*ty, shape.to_vec()))),
                _ => None,
            })
            .collect();
        let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let output = if names.contains(&output) { output } else { names.first().copied().unwrap_or(output) }.to_owned();
        Ok(Self { session, inputs, output })
    }

    fn input(&self, name: &str, path: &Path) -> Result<(TensorElementType, Vec<i64>), DiffusionLoadError> {
        self.inputs.get(name).cloned().ok_or_else(|| DiffusionLoadError::Invalid {
            path: path.to_owned(),
            message: format!("the graph has no input `{name}`"),
        })
    }
}

pub struct LatentDiffusion {
    prompts: PromptEncoder,
    /// The UNet, or (`stepped`) the package's step graph for this device around it.
    unet: Graph,
    stepped: bool,
    /// The step graph's CUDA graphs, when its session captures them.
    captured: Option<CapturedGraphs>,
    decoder: Decoder,
    encoder: Encoder,
    scheduler: SchedulerConfig,
    kind: SchedulerKind,
    options: DiffusionOptions,
    device: Device,
}

/// The tokenizer and the text encoder: prompts to hidden states.
struct PromptEncoder {
    tokenizer: PromptTokenizer,
    text_encoder: Graph,
}

impl PromptEncoder {
    fn load(package: &Path, path: &Path, options: &SessionOptions) -> Result<Self, DiffusionLoadError> {
        let text_encoder = Graph::load(path, options, "last_hidden_state")?;
        text_encoder.input("input_ids", path)?;
        Ok(Self { tokenizer: PromptTokenizer::load(&package.join("tokenizer"))?, text_encoder })
    }

    /// Hidden states for each prompt, `[CONTEXT × width]` each, and how many tokens each lost.
    fn encode(&mut self, prompts: &[&str]) -> Result<(Vec<Vec<f32>>, Vec<usize>), RenderError> {
        let mut ids = Vec::with_capacity(prompts.len() * tokenizer::CONTEXT);
        let mut truncated = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let tokens = self.tokenizer.encode(prompt).map_err(|err| RenderError::Invalid(err.to_string()))?;
            ids.extend(tokens.ids);
            truncated.push(tokens.truncated);
        }
        let shape = vec![prompts.len() as i64, tokenizer::CONTEXT as i64];
        let (ty, _) = self.text_encoder.inputs["input_ids"].clone();
        let input: DynValue = match ty {
            TensorElementType::Int64 => {
                Tensor::from_array((shape, ids.iter().map(|id| i64::from(*id)).collect::<Vec<_>>()))?.into_dyn()
            }
            _ => Tensor::from_array((shape, ids.iter().map(|id| *id as i32).collect::<Vec<_>>()))?.into_dyn(),
        };
        let outputs = self.text_encoder.session.run(ort::inputs!["input_ids" => input])?;
        let (_, hidden) = extract_floats(&outputs[self.text_encoder.output.as_str()])?;
        let per_prompt = hidden.len() / prompts.len();
        Ok((hidden.chunks_exact(per_prompt).map(<[f32]>::to_vec).collect(), truncated))
    }
}

/// The VAE decoder: latents to RGB bytes, in tiles when the frame is large ([`TilePolicy`]).
struct Decoder {
    /// The VAE decoder, or (`rgb`) the package's decoder graph that ends in RGB bytes.
    graph: Graph,
    rgb: bool,
    scaling_factor: f64,
    tiling: TilePolicy,
}

impl Decoder {
    /// The package's plain VAE decoder graph for the device (`latent_sample` → `sample`).
    fn plain(
        package: &Path,
        files: &GraphFiles,
        options: &SessionOptions,
        scaling_factor: f64,
        tiling: TilePolicy,
    ) -> Result<Self, DiffusionLoadError> {
        let path = files.path(package, "vae_decoder", options.device);
        let graph = Graph::load(&path, &Self::session_options(options), "sample")?;
        graph.input("latent_sample", &path)?;
        Ok(Self { graph, rgb: false, scaling_factor, tiling })
    }

    /// How the decoder's session is loaded: as `options` say, but with cuDNN's heuristic choice
    /// of convolution algorithms. A tiled decode runs several input shapes in turn, and the
    /// exhaustive search ran again at each: on an H100 a 1920×1080 frame in tiles took 4.663 s
    /// with it and 0.761 s without (whole: 0.190 and 0.186 s; BENCHMARKS.md).
    fn session_options(options: &SessionOptions) -> SessionOptions {
        SessionOptions { conv_search: ConvSearch::Heuristic, ..options.clone() }
    }

    /// Host latents (each `[4, h, w]`, as the scheduler leaves them) to RGB bytes.
    fn decode(
        &mut self,
        latents: &[&[f32]],
        latent_height: usize,
        latent_width: usize,
    ) -> Result<Vec<Vec<u8>>, RenderError> {
        if self.tiling.applies(latent_height, latent_width) {
            let tiling = self.tiling;
            return tiling.decode(latents, (latent_height, latent_width), VAE_FACTOR as usize, |tile, (th, tw)| {
                let views: Vec<&[f32]> = tile.iter().map(Vec::as_slice).collect();
                self.decode_unrounded(&views, th, tw)
            });
        }
        match self.rgb {
            true => self.decode_rgb_host(latents, latent_height, latent_width),
            false => {
                let (height, width, pixels) = self.run_plain(latents, latent_height, latent_width)?;
                Ok(pixels.chunks_exact(3 * height * width).map(|image| to_rgb8(image, height, width)).collect())
            }
        }
    }

    /// Each image as `[h, w, 3]` on a 0..255 scale, not rounded (for blending tiles).
    fn decode_unrounded(
        &mut self,
        latents: &[&[f32]],
        latent_height: usize,
        latent_width: usize,
    ) -> Result<Vec<Vec<f32>>, RenderError> {
        if self.rgb {
            let images = self.decode_rgb_host(latents, latent_height, latent_width)?;
            return Ok(images.into_iter().map(|image| image.into_iter().map(f32::from).collect()).collect());
        }
        let (height, width, pixels) = self.run_plain(latents, latent_height, latent_width)?;
        let plane = height * width;
        Ok(pixels
            .chunks_exact(3 * plane)
            .map(|image| {
                let mut out = Vec::with_capacity(3 * plane);
                for pixel in 0..plane {
                    for channel in 0..3 {
                        out.push((image[channel * plane + pixel] / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0);
                    }
                }
                out
            })
            .collect())
    }

    /// The plain decoder's output: height, width and `[n, 3, h, w]` in -1..1.
    fn run_plain(
        &mut self,
        latents: &[&[f32]],
        latent_height: usize,
        latent_width: usize,
    ) -> Result<(usize, usize, Vec<f32>), RenderError> {
        let (ty, _) = self.graph.inputs["latent_sample"].clone();
        let scale = 1.0 / self.scaling_factor;
        let data: Vec<f32> = latents.iter().flat_map(|l| l.iter().map(|v| (f64::from(*v) * scale) as f32)).collect();
        let shape = vec![latents.len() as i64, LATENT_CHANNELS as i64, latent_height as i64, latent_width as i64];
        let input = float_tensor(ty, shape, &data)?;
        let outputs = self.graph.session.run(ort::inputs!["latent_sample" => input])?;
        let (shape, pixels) = extract_floats(&outputs[self.graph.output.as_str()])?;
        Ok((shape[2] as usize, shape[3] as usize, pixels))
    }

    /// Host latents through the decoder graph that ends in RGB bytes.
    fn decode_rgb_host(
        &mut self,
        latents: &[&[f32]],
        latent_height: usize,
        latent_width: usize,
    ) -> Result<Vec<Vec<u8>>, RenderError> {
        let shape = vec![latents.len() as i64, LATENT_CHANNELS as i64, latent_height as i64, latent_width as i64];
        let data: Vec<f32> = latents.iter().flat_map(|latent| latent.iter().copied()).collect();
        stepped::decode_rgb(&mut self.graph, &Tensor::from_array((shape, data))?)
    }
}

impl LatentDiffusion {
    pub fn load(package: &Path, options: &SessionOptions) -> Result<Self, DiffusionLoadError> {
        let invalid = |path: &Path, message: String| DiffusionLoadError::Invalid { path: path.to_owned(), message };
        let (scheduler, kind) = load_scheduler(package)?;
        let scaling_factor = load_scaling_factor(package)?;
        let files = GraphFiles::read(package)?;
        let manifest = PipelineSettings::read(package)?;
        let device = options.device;
        // A step graph and an RGB decoder graph, where the package has them for this device,
        // serve in place of the UNet and the decoder.
        let step = files.extra(package, "unet_step", device);
        let rgb = files.extra(package, "vae_decoder_rgb", device);
        let unet_path = step.clone().unwrap_or_else(|| files.path(package, "unet", device));
        let decoder_path = rgb.clone().unwrap_or_else(|| files.path(package, "vae_decoder", device));
        let text_path = files.path(package, "text_encoder", device);
        // On the CPU nothing is captured, but the same fixed buffers run when asked: the tests
        // hold that path to the bound one there.
        // A step graph ONNX Runtime refuses to capture (a node only the CPU runs, so a copy
        // between devices) is served uncaptured, with a warning.
        let captured_session = match step.is_some() && options.diffusion.cuda_graphs > 0 {
            true => runtime::load_for_cuda_graphs(&unet_path, options)
                .inspect_err(|err| tracing::warn!(error = %err, "the step graph cannot be captured as CUDA graphs; running it without"))
                .ok(),
            false => None,
        };
        let (unet, captured) = match captured_session {
            Some(session) => {
                let graphs = CapturedGraphs::new(options.diffusion.cuda_graphs)
                    .map_err(|err| invalid(&unet_path, err.to_string()))?;
                (Graph::from_session(session, "latents_next")?, Some(graphs))
            }
            None => {
                (Graph::load(&unet_path, options, if step.is_some() { "latents_next" } else { "out_sample" })?, None)
            }
        };
        let decoder = Decoder {
            graph: Graph::load(
                &decoder_path,
                &Decoder::session_options(options),
                if rgb.is_some() { "rgb" } else { "sample" },
            )?,
            rgb: rgb.is_some(),
            scaling_factor,
            tiling: manifest.vae_tiling,
        };
        decoder.graph.input(if decoder.rgb { "latents" } else { "latent_sample" }, &decoder_path)?;
        let pipeline = Self {
            prompts: PromptEncoder::load(package, &text_path, options)?,
            unet,
            stepped: step.is_some(),
            captured,
            decoder,
            encoder: Encoder::load(package, &files, options, scaling_factor)?,
            scheduler,
            kind,
            options: options.diffusion,
            device,
        };
        let unet_inputs: &[&str] = match pipeline.stepped {
            true => &["latents", "timestep", "hidden", "scale", "guidance", "coefficients", "noise"],
            false => &["sample", "timestep", "encoder_hidden_states"],
        };
        for input in unet_inputs {
            pipeline.unet.input(input, &unet_path)?;
        }
        if pipeline.stepped {
            tracing::info!(
                device = %device,
                cuda_graphs = pipeline.captured.as_ref().map_or(0, |_| options.diffusion.cuda_graphs),
                "denoising with the package's step graph: latents stay on the device"
            );
        }
        if files.prepared_for(options.device) {
            tracing::info!(device = %options.device, "serving the package's prepared graphs");
        }
        Ok(pipeline)
    }
}

impl Pipeline for LatentDiffusion {
    fn render(&mut self, request: &RenderRequest) -> Result<Frames, RenderError> {
        self.render_batch(std::slice::from_ref(request))
            .pop()
            .unwrap_or(Err(RenderError::Invalid("empty batch".into())))
    }

    fn render_batch(&mut self, batch: &[RenderRequest]) -> Vec<Result<Frames, RenderError>> {
        match self.render_together(batch) {
            Ok(results) => results,
            Err(err) => batch.iter().map(|_| Err(err.clone())).collect(),
        }
    }

    fn take_graph_runs(&mut self) -> super::GraphRuns {
        self.captured.as_mut().map(CapturedGraphs::take_runs).unwrap_or_default()
    }
}

impl LatentDiffusion {
    /// Renders jobs of one size and step count together, as [`plan()`] lays them out; a job
    /// stopped midway leaves the batch and the rest go on.
    fn render_together(&mut self, batch: &[RenderRequest]) -> Result<Vec<Result<Frames, RenderError>>, RenderError> {
        let Some(first) = batch.first().map(|r| &r.params) else { return Ok(Vec::new()) };
        let (width, height, steps) = (first.width, first.height, first.steps);
        if width % VAE_FACTOR != 0 || height % VAE_FACTOR != 0 || width == 0 || height == 0 {
            return Err(RenderError::Invalid(format!("width and height must be positive multiples of {VAE_FACTOR}")));
        }
        if batch.iter().any(|r| (r.params.width, r.params.height, r.params.steps) != (width, height, steps)) {
            return Err(RenderError::Invalid("a batch must share width, height and steps".into()));
        }
        let scheduler =
            Scheduler::new(self.kind, &self.scheduler, steps).map_err(|err| RenderError::Invalid(err.to_string()))?;
        let timestep_cond =
            self.unet.inputs.get("timestep_cond").map(|(_, shape)| shape.get(1).copied().unwrap_or(256));
        let (latent_height, latent_width) = ((height / VAE_FACTOR) as usize, (width / VAE_FACTOR) as usize);
        let latent_len = LATENT_CHANNELS * latent_height * latent_width;
        let shapes: Vec<JobShape> = batch
            .iter()
            .map(|r| JobShape { frames: r.params.num_frames.max(1) as usize, guidance: r.params.guidance })
            .collect();
        let unet_guidance = match timestep_cond {
            Some(_) => UnetGuidance::Embedded,
            None => UnetGuidance::SecondPass,
        };
        // Image-to-image: the batch shares its first step (the batch key holds it); each job with
        // an image starts from its latents noised to that step.
        let start = crate::render::input::first_step(first) as usize;
        if batch.iter().any(|r| crate::render::input::first_step(&r.params) as usize != start) {
            return Err(RenderError::Invalid("a batch must share its first step".into()));
        }
        let image_latents: Vec<Option<Vec<f32>>> = batch
            .iter()
            .map(|r| r.init_image.as_deref().map(|image| self.encoder.encode(image)).transpose())
            .collect::<Result<_, _>>()?;
        let plan = plan(
            &shapes,
            steps - start as u32,
            latent_height * latent_width,
            self.options.max_unet_rows,
            unet_guidance,
        );

        let (cond, truncated) =
            self.prompts.encode(&batch.iter().map(|r| r.params.prompt.as_str()).collect::<Vec<_>>())?;
        let uncond = match plan.guided {
            true => {
                self.prompts.encode(&batch.iter().map(|r| r.params.negative_prompt.as_str()).collect::<Vec<_>>())?.0
            }
            false => Vec::new(),
        };

        for (request, total) in batch.iter().zip(&plan.totals) {
            request.control.report(0, *total);
        }
        let mut done = vec![0u32; batch.len()];
        let mut stopped: Vec<Option<RenderError>> = vec![None; batch.len()];
        let mut frames: Vec<Vec<Vec<u8>>> = shapes.iter().map(|shape| vec![Vec::new(); shape.frames]).collect();
        let sigma = scheduler.init_noise_sigma();

        for (chunk, lanes) in plan.chunks.iter().enumerate() {
            let lanes = lanes.iter().copied().filter(|lane| stopped[lane.job].is_none()).collect();
            let mut live = LiveLanes::start(lanes, |lane| {
                let params = &batch[lane.job].params;
                let noise = walk_noise(u64::from(params.seed), lane.frame, params.num_frames as usize, latent_len);
                match &image_latents[lane.job] {
                    Some(x0) => scheduler.noised(start, x0, &noise),
                    None => noise.iter().map(|v| (f64::from(*v) * sigma) as f32).collect(),
                }
            });
            for step in start..steps as usize {
                // Every job is checked, also one whose lanes are all rendered: a stop still ends it.
                for (job, request) in batch.iter().enumerate() {
                    if let (None, Err(err)) = (&stopped[job], request.control.check()) {
                        stopped[job] = Some(err);
                    }
                }
                let rendering: Vec<bool> = stopped.iter().map(Option::is_none).collect();
                let Some(run) = plan.run(chunk, &rendering) else {
                    live = LiveLanes::default();
                    break;
                };
                live.narrow(&run.lanes, self.captured.as_ref())?;
                let rows = || -> Vec<&[f32]> {
                    run.rows
                        .iter()
                        .map(|row| match *row {
                            Row::Unconditional(job) => &uncond[job][..],
                            Row::Conditional(job) => &cond[job][..],
                        })
                        .collect()
                };
                // Euler-a and LCM add fresh noise each step: one draw per job, the same for all
                // its frames so a video stays coherent.
                let step_noise: HashMap<usize, Vec<f32>> = match scheduler.needs_noise(step) {
                    true => run
                        .jobs
                        .iter()
                        .map(|&job| {
                            let seed = u64::from(batch[job].params.seed);
                            (job, gaussian(seed, STEP_STREAM + step as u64, latent_len))
                        })
                        .collect(),
                    false => HashMap::new(),
                };
                if self.stepped {
                    if live.stepping.is_none() {
                        let guidance: Vec<f64> = run.lanes.iter().map(|l| plan.scales[l.job].unwrap_or(1.0)).collect();
                        let embedding = timestep_cond
                            .map(|dim| (dim, run.lanes.iter().map(|l| batch[l.job].params.guidance).collect()));
                        live.stepping = Some(StepCall::new(
                            &self.unet,
                            self.captured.as_mut(),
                            &rows(),
                            &live.latents,
                            &guidance,
                            embedding,
                            (latent_height, latent_width),
                            self.device,
                        )?);
                    }
                    let noise = (!step_noise.is_empty())
                        .then(|| run.lanes.iter().flat_map(|lane| step_noise[&lane.job].iter().copied()).collect());
                    let call = live.stepping.as_mut().expect("bound above");
                    call.run(
                        &mut self.unet,
                        self.captured.as_mut(),
                        scheduler.input_scale(step),
                        scheduler.timesteps()[step],
                        scheduler.coefficients(step),
                        noise,
                    )?;
                } else {
                    let call = match &mut live.call {
                        Some(call) => call,
                        None => {
                            let guidance: Vec<f64> = run.lanes.iter().map(|l| batch[l.job].params.guidance).collect();
                            let embedding = timestep_cond.map(|dim| (dim, guidance));
                            live.call.insert(UnetCall::new(&self.unet, &rows(), embedding, self.options)?)
                        }
                    };
                    let scale = scheduler.input_scale(step);
                    let mut sample = Vec::with_capacity(run.rows.len() * latent_len);
                    for _ in 0..plan.rows_per_lane() {
                        for latent in &live.latents {
                            sample.extend(latent.iter().map(|v| (f64::from(*v) * scale) as f32));
                        }
                    }
                    let shape =
                        [run.rows.len() as i64, LATENT_CHANNELS as i64, latent_height as i64, latent_width as i64];
                    let output = call.run(&mut self.unet, &sample, shape, scheduler.timesteps()[step])?;
                    for (k, lane) in run.lanes.iter().enumerate() {
                        let (cond_row, uncond_row) = plan.prediction_rows(k, run.lanes.len());
                        let cond_row = &output[cond_row * latent_len..][..latent_len];
                        let eps: Cow<[f32]> = match (plan.scales[lane.job], uncond_row) {
                            (Some(g), Some(uncond_row)) => {
                                let uncond_row = &output[uncond_row * latent_len..][..latent_len];
                                Cow::Owned(
                                    uncond_row
                                        .iter()
                                        .zip(cond_row)
                                        .map(|(u, c)| (f64::from(*u) + g * (f64::from(*c) - f64::from(*u))) as f32)
                                        .collect(),
                                )
                            }
                            _ => Cow::Borrowed(cond_row),
                        };
                        let noise = step_noise.get(&lane.job).map(Vec::as_slice);
                        scheduler.step(step, &eps, &mut live.latents[k], noise);
                    }
                }
                for &job in &run.jobs {
                    done[job] += 1;
                    batch[job].control.report(done[job], plan.totals[job]);
                }
            }
            if live.lanes.is_empty() {
                continue;
            }
            let on_device = self.decoder.rgb && !self.decoder.tiling.applies(latent_height, latent_width);
            let images = match live.stepping.take() {
                Some(call) if on_device => match call.latents(self.captured.as_ref()) {
                    Some(latents) => stepped::decode_rgb(&mut self.decoder.graph, latents)?,
                    None => self.decoder.decode(&views(&live.latents), latent_height, latent_width)?,
                },
                Some(call) => {
                    live.latents = call.download(self.captured.as_ref(), std::mem::take(&mut live.latents))?;
                    self.decoder.decode(&views(&live.latents), latent_height, latent_width)?
                }
                None => self.decoder.decode(&views(&live.latents), latent_height, latent_width)?,
            };
            for (lane, image) in live.lanes.iter().zip(images) {
                frames[lane.job][lane.frame] = image;
            }
        }

        Ok(batch
            .iter()
            .enumerate()
            .map(|(job, request)| {
                if let Some(err) = stopped[job].take() {
                    return Err(err);
                }
                let mut notes = Vec::new();
                if truncated[job] > 0 {
                    notes.push(format!(
                        "prompt truncated: the text encoder reads {} tokens; {} were dropped",
                        tokenizer::CONTEXT - 2,
                        truncated[job]
                    ));
                }
                Ok(Frames {
                    width: request.params.width,
                    height: request.params.height,
                    frames: std::mem::take(&mut frames[job]),
                    notes,
                })
            })
            .collect())
    }
}

/// The lanes of one chunk still rendering, their latents, and the UNet inputs bound for them:
/// what changes from step to step while the [`plan::BatchPlan`] stays as it was planned.
#[derive(Default)]
struct LiveLanes {
    lanes: Vec<Lane>,
    latents: Vec<Vec<f32>>,
    /// Bound for exactly `lanes`; dropped when a lane leaves.
    call: Option<UnetCall>,
    /// With a step graph: the lanes' latents on the device (`latents` is then where they
    /// started); brought back to the host when a lane leaves.
    stepping: Option<StepCall>,
}

impl LiveLanes {
    /// `lanes`, each starting from the latent `start` draws for it.
    fn start(lanes: Vec<Lane>, start: impl Fn(Lane) -> Vec<f32>) -> Self {
        let latents = lanes.iter().map(|lane| start(*lane)).collect();
        Self { lanes, latents, call: None, stepping: None }
    }

    /// Keeps only `lanes` (some of the live lanes, in their order) and their latents.
    fn narrow(&mut self, lanes: &[Lane], captured: Option<&CapturedGraphs>) -> Result<(), RenderError> {
        if self.lanes == lanes {
            return Ok(());
        }
        if let Some(stepping) = self.stepping.take() {
            self.latents = stepping.download(captured, std::mem::take(&mut self.latents))?;
        }
        let mut kept = lanes.iter().peekable();
        let mut latents = std::mem::take(&mut self.latents).into_iter();
        self.latents = self
            .lanes
            .iter()
            .filter_map(|lane| {
                let latent = latents.next();
                kept.next_if_eq(&lane).and(latent)
            })
            .collect();
        self.lanes = lanes.to_vec();
        self.call = None;
        Ok(())
    }
}

fn views(latents: &[Vec<f32>]) -> Vec<&[f32]> {
    latents.iter().map(Vec::as_slice).collect()
}

/// Frame `frame` of `frames` on the seed's latent walk: keyframe noises every
/// [`FRAMES_PER_KEY`] frames, spherical interpolation between them. An image is keyframe 0.
pub fn walk_noise(seed: u64, frame: usize, frames: usize, len: usize) -> Vec<f32> {
    let key = frame / FRAMES_PER_KEY;
    let offset = frame % FRAMES_PER_KEY;
    let from = gaussian(seed, key as u64, len);
    if offset == 0 || frames <= 1 {
        return from;
    }
    let to = gaussian(seed, key as u64 + 1, len);
    slerp(&from, &to, offset as f64 / FRAMES_PER_KEY as f64)
}

/// The UNet inputs that stay the same through a chunk's steps, bound once.
enum UnetCall {
    Plain { hidden: DynValue, cond: Option<DynValue> },
    Bound(ort::session::IoBinding),
}

impl UnetCall {
    fn new(
        unet: &Graph,
        rows: &[&[f32]],
        guidance_embedding: Option<(i64, Vec<f64>)>,
        options: DiffusionOptions,
    ) -> Result<Self, RenderError> {
        let (ty, _) = unet.inputs["encoder_hidden_states"].clone();
        let width = rows.first().map_or(0, |row| row.len() / tokenizer::CONTEXT);
        let data: Vec<f32> = rows.iter().flat_map(|row| row.iter().copied()).collect();
        let hidden = float_tensor(ty, vec![rows.len() as i64, tokenizer::CONTEXT as i64, width as i64], &data)?;
        let cond = match guidance_embedding {
            Some((dim, guidance)) => {
                let (ty, _) = unet.inputs["timestep_cond"].clone();
                let data: Vec<f32> =
                    guidance.iter().flat_map(|g| guidance_scale_embedding(*g - 1.0, dim as usize)).collect();
                Some(float_tensor(ty, vec![guidance.len() as i64, dim], &data)?)
            }
            None => None,
        };
        if !options.io_binding {
            return Ok(Self::Plain { hidden, cond });
        }
        let mut binding = unet.session.create_binding()?;
        binding.bind_input("encoder_hidden_states", &hidden)?;
        if let Some(cond) = &cond {
            binding.bind_input("timestep_cond", cond)?;
        }
        let host = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::CPUOutput)?;
        binding.bind_output_to_device(unet.output.as_str(), &host)?;
        Ok(Self::Bound(binding))
    }

    /// One UNet run: the noise prediction for every row, as f32.
    fn run(
        &mut self,
        unet: &mut Graph,
        sample: &[f32],
        shape: [i64; 4],
        timestep: f64,
    ) -> Result<Vec<f32>, RenderError> {
        let (sample_ty, _) = unet.inputs["sample"].clone();
        let sample = float_tensor(sample_ty, shape.to_vec(), sample)?;
        let timestep = timestep_input(unet, shape[0] as usize, timestep)?;
        let output = unet.output.clone();
        match self {
            Self::Plain { hidden, cond } => {
                let mut inputs: Vec<(Cow<str>, SessionInputValue)> = vec![
                    ("sample".into(), sample.into()),
                    ("timestep".into(), timestep.into()),
                    ("encoder_hidden_states".into(), hidden.view().into()),
                ];
                if let Some(cond) = cond {
                    inputs.push(("timestep_cond".into(), cond.view().into()));
                }
                let outputs = unet.session.run(inputs)?;
                Ok(extract_floats(&outputs[output.as_str()])?.1)
            }
            Self::Bound(binding) => {
                binding.bind_input("sample", &sample)?;
                binding.bind_input("timestep", &timestep)?;
                let outputs = unet.session.run_binding(binding)?;
                Ok(extract_floats(&outputs[output.as_str()])?.1)
            }
        }
    }
}

/// The guidance embedding LCM-distilled UNets take (`get_guidance_scale_embedding` in diffusers).
fn guidance_scale_embedding(w: f64, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let step = (10000f64).ln() / (half.saturating_sub(1).max(1)) as f64;
    let w = w * 1000.0;
    let angles: Vec<f64> = (0..half).map(|i| w * (-(i as f64) * step).exp()).collect();
    let mut out: Vec<f32> =
        angles.iter().map(|a| a.sin() as f32).chain(angles.iter().map(|a| a.cos() as f32)).collect();
    out.resize(dim, 0.0);
    out
}

/// The UNet's `timestep` input for a run of `rows` rows, shaped as the graph declares it (one
/// per row, one for all, or a scalar).
fn timestep_input(unet: &Graph, rows: usize, timestep: f64) -> Result<DynValue, RenderError> {
    let (ty, shape) = unet.inputs["timestep"].clone();
    let count = match shape.first() {
        Some(1) => 1,
        Some(_) => rows,
        None => 0, // a scalar
    };
    timestep_tensor(ty, count, timestep)
}

fn timestep_tensor(ty: TensorElementType, count: usize, timestep: f64) -> Result<DynValue, RenderError> {
    let shape: Vec<i64> = if count == 0 { Vec::new() } else { vec![count as i64] };
    let count = count.max(1);
    Ok(match ty {
        TensorElementType::Int64 => Tensor::from_array((shape, vec![timestep as i64; count]))?.into_dyn(),
        TensorElementType::Int32 => Tensor::from_array((shape, vec![timestep as i32; count]))?.into_dyn(),
        TensorElementType::Float64 => Tensor::from_array((shape, vec![timestep; count]))?.into_dyn(),
        other => float_tensor(other, shape, &vec![timestep as f32; count])?,
    })
}

/// A float tensor of the element type a graph declares (f32 or f16).
pub fn float_tensor(ty: TensorElementType, shape: Vec<i64>, data: &[f32]) -> Result<DynValue, RenderError> {
    Ok(match ty {
        TensorElementType::Float16 => {
            Tensor::from_array((shape, data.iter().map(|v| f16::from_f32(*v)).collect::<Vec<_>>()))?.into_dyn()
        }
        TensorElementType::Float32 => Tensor::from_array((shape, data.to_vec()))?.into_dyn(),
        other => return Err(RenderError::Invalid(format!("a float input of type {other:?} is not supported"))),
    })
}

/// A float output (f32 or f16) as f32, with its shape.
fn extract_floats(value: &DynValue) -> Result<(Vec<i64>, Vec<f32>), RenderError> {
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float16) => {
            let (shape, data) = value.try_extract_tensor::<f16>()?;
            Ok((shape.to_vec(), data.iter().map(|v| v.to_f32()).collect()))
        }
        _ => {
            let (shape, data) = value.try_extract_tensor::<f32>()?;
            Ok((shape.to_vec(), data.to_vec()))
        }
    }
}

/// `[3, H, W]` in -1..1 to row-major RGB bytes.
fn to_rgb8(image: &[f32], height: usize, width: usize) -> Vec<u8> {
    let plane = height * width;
    let mut out = Vec::with_capacity(plane * 3);
    for pixel in 0..plane {
        for channel in 0..3 {
            let value = (image[channel * plane + pixel] / 2.0 + 0.5).clamp(0.0, 1.0);
            out.push((value * 255.0 + 0.5) as u8);
        }
    }
    out
}

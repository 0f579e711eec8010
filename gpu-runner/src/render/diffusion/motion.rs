//! The `motion-diffusion` pipeline: AnimateDiff-style video models, a Stable Diffusion UNet with
//! motion modules (temporal attention across frames) whose `sample` carries a frames axis:
//!
//! ```text
//! unet/model.onnx   sample [batch, 4, frames, h/8, w/8], timestep [batch],
//!                   encoder_hidden_states [batch, 77, width] -> out_sample (as sample)
//! ```
//!
//! The rest of the package is a `latent-diffusion` one (tokenizer, text encoder, VAE decoder,
//! scheduler; `gpu-runner/sd/build_motion.py` makes one). All frames of a video are denoised
//! together: one UNet run per step sees every frame (with guidance, the unconditional and the
//! conditional rows in one batch, as diffusers' `AnimateDiffPipeline` does). Frame `f` starts
//! from the seed's noise stream `f`.
//!
//! A video longer than the motion module's context (`motion.context_frames` in the manifest) is
//! denoised in overlapping windows of that length, each step: windows start every
//! `context_frames − context_overlap` frames, the last one flush with the end, and each frame's
//! noise prediction is the average of its windows' weighted by the pyramid diffusers' FreeNoise
//! uses (1, 2, …, 2, 1), so a window's edge frames count least and no border shows as a seam.
//!
//! `gpu-runner/sd/reference_motion.py` renders the same cases with diffusers; a test holds the
//! two together.

use ort::{session::SessionInputValue, value::DynValue};
use serde::Deserialize;
use std::{borrow::Cow, path::Path};

use super::{
    Decoder, DiffusionLoadError, Encoder, Graph, LATENT_CHANNELS, PipelineSettings, PromptEncoder, STEP_STREAM,
    VAE_FACTOR, extract_floats, float_tensor, graphs::GraphFiles, load_scaling_factor, load_scheduler, timestep_input,
    tokenizer,
};
use crate::render::{
    Frames, Pipeline, RenderError, RenderRequest,
    diffusion::scheduler::{Scheduler, SchedulerConfig, SchedulerKind},
    noise::gaussian,
    runtime::SessionOptions,
};

/// A motion model's context: how many frames its temporal layers see at once, and how many
/// frames neighbouring windows share when a video is longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MotionContext {
    pub context_frames: usize,
    #[serde(default = "default_overlap")]
    pub context_overlap: usize,
    /// Frames decoded per VAE run.
    #[serde(default = "default_decode_chunk")]
    pub decode_chunk: usize,
}

fn default_overlap() -> usize {
    4
}

fn default_decode_chunk() -> usize {
    8
}

impl Default for MotionContext {
    /// AnimateDiff's: motion modules trained on 16 frames.
    fn default() -> Self {
        Self { context_frames: 16, context_overlap: default_overlap(), decode_chunk: default_decode_chunk() }
    }
}

impl MotionContext {
    /// The first frame of each window over `frames` frames.
    pub fn windows(&self, frames: usize) -> Vec<usize> {
        let context = self.context_frames.max(1);
        if frames <= context {
            return vec![0];
        }
        let stride = context.saturating_sub(self.context_overlap).max(1);
        let mut starts: Vec<usize> = (0..frames - context).step_by(stride).collect();
        starts.push(frames - context);
        starts.dedup();
        starts
    }

    /// How much each frame of a window of `length` counts (diffusers' FreeNoise `pyramid`).
    pub fn weights(length: usize) -> Vec<f32> {
        let half = length.div_ceil(2);
        (0..length).map(|i| (i.min(length - 1 - i) + 1).min(half) as f32).collect()
    }
}

pub struct MotionDiffusion {
    prompts: PromptEncoder,
    unet: Graph,
    decoder: Decoder,
    encoder: Encoder,
    scheduler: SchedulerConfig,
    kind: SchedulerKind,
    context: MotionContext,
}

impl MotionDiffusion {
    pub fn load(package: &Path, options: &SessionOptions) -> Result<Self, DiffusionLoadError> {
        let (scheduler, kind) = load_scheduler(package)?;
        let settings = PipelineSettings::read(package)?;
        let files = GraphFiles::read(package)?;
        let device = options.device;
        let unet_path = files.path(package, "unet", device);
        let unet = Graph::load(&unet_path, options, "out_sample")?;
        for input in ["sample", "timestep", "encoder_hidden_states"] {
            unet.input(input, &unet_path)?;
        }
        match unet.inputs["sample"].1.len() {
            5 => {}
            rank => {
                return Err(DiffusionLoadError::Invalid {
                    path: unet_path,
                    message: format!("a motion UNet's `sample` is [batch, 4, frames, h, w]; this one has {rank} axes"),
                });
            }
        }
        let scaling_factor = load_scaling_factor(package)?;
        let decoder = Decoder::plain(package, &files, options, scaling_factor, settings.vae_tiling)?;
        Ok(Self {
            prompts: PromptEncoder::load(package, &files.path(package, "text_encoder", device), options)?,
            unet,
            decoder,
            encoder: Encoder::load(package, &files, options, scaling_factor)?,
            scheduler,
            kind,
            context: settings.motion.unwrap_or_default(),
        })
    }
}

impl Pipeline for MotionDiffusion {
    fn render(&mut self, request: &RenderRequest) -> Result<Frames, RenderError> {
        let params = &request.params;
        let (width, height, steps) = (params.width, params.height, params.steps);
        if width % VAE_FACTOR != 0 || height % VAE_FACTOR != 0 || width == 0 || height == 0 {
            return Err(RenderError::Invalid(format!("width and height must be positive multiples of {VAE_FACTOR}")));
        }
        let frames = params.num_frames.max(1) as usize;
        let (h, w) = ((height / VAE_FACTOR) as usize, (width / VAE_FACTOR) as usize);
        let plane = h * w;
        let scheduler =
            Scheduler::new(self.kind, &self.scheduler, steps).map_err(|err| RenderError::Invalid(err.to_string()))?;
        let guided = params.guidance > 1.0;
        let prompts: Vec<&str> = match guided {
            true => vec![params.negative_prompt.as_str(), params.prompt.as_str()],
            false => vec![params.prompt.as_str()],
        };
        let (hidden, truncated) = self.prompts.encode(&prompts)?;
        let rows = hidden.len();
        let hidden_width = hidden[0].len() / tokenizer::CONTEXT;
        let (hidden_ty, _) = self.unet.inputs["encoder_hidden_states"].clone();
        let hidden_data: Vec<f32> = hidden.concat();
        let hidden =
            float_tensor(hidden_ty, vec![rows as i64, tokenizer::CONTEXT as i64, hidden_width as i64], &hidden_data)?;

        // [4, frames, h, w]: frame f from the seed's stream f. From an image (image-to-video):
        // every frame starts from the image's latents noised to the first step strength leaves,
        // and frame 0 is held to the image (see below).
        let seed = u64::from(params.seed);
        let sigma = scheduler.init_noise_sigma();
        let start = crate::render::input::first_step(params) as usize;
        let image = request.init_image.as_deref().map(|image| self.encoder.encode(image)).transpose()?;
        let mut latents = vec![0f32; LATENT_CHANNELS * frames * plane];
        let mut first_noise = Vec::new();
        for frame in 0..frames {
            let noise = gaussian(seed, frame as u64, LATENT_CHANNELS * plane);
            let start_latents: Vec<f32> = match &image {
                Some(x0) => scheduler.noised(start, x0, &noise),
                None => noise.iter().map(|n| (f64::from(*n) * sigma) as f32).collect(),
            };
            for c in 0..LATENT_CHANNELS {
                let to = (c * frames + frame) * plane;
                latents[to..to + plane].copy_from_slice(&start_latents[c * plane..(c + 1) * plane]);
            }
            if frame == 0 {
                first_noise = noise;
            }
        }
        // Frame 0 of an image-to-video job after step `i`: the image's latents noised to where
        // step `i + 1` starts (the clean latents after the last), so the motion model animates
        // away from a first frame that is the image.
        let hold_first = |latents: &mut [f32], next: usize| {
            let Some(x0) = &image else { return };
            let held = match next < steps as usize {
                true => scheduler.noised(next, x0, &first_noise),
                false => x0.clone(),
            };
            for c in 0..LATENT_CHANNELS {
                let to = c * frames * plane;
                latents[to..to + plane].copy_from_slice(&held[c * plane..(c + 1) * plane]);
            }
        };

        let windows = self.context.windows(frames);
        let length = frames.min(self.context.context_frames.max(1));
        let weights = MotionContext::weights(length);
        let total_steps = steps - start as u32;
        request.control.report(0, total_steps);
        for step in start..steps as usize {
            request.control.check()?;
            let scale = scheduler.input_scale(step);
            let timestep = scheduler.timesteps()[step];
            // Per row (unconditional first), [4, frames, h, w]: the weighted sum of the windows'
            // predictions, and each frame's total weight.
            let mut sum = vec![0f32; rows * latents.len()];
            let mut weight = vec![0f32; frames];
            for &start in &windows {
                let window = start..start + length;
                let mut sample = Vec::with_capacity(rows * LATENT_CHANNELS * length * plane);
                for _ in 0..rows {
                    for c in 0..LATENT_CHANNELS {
                        let from = (c * frames + start) * plane;
                        sample.extend(
                            latents[from..from + length * plane].iter().map(|v| (f64::from(*v) * scale) as f32),
                        );
                    }
                }
                let shape = [rows as i64, LATENT_CHANNELS as i64, length as i64, h as i64, w as i64];
                let output = self.run_unet(&sample, shape, &hidden, timestep)?;
                for row in 0..rows {
                    for c in 0..LATENT_CHANNELS {
                        for (k, frame) in window.clone().enumerate() {
                            let from = ((row * LATENT_CHANNELS + c) * length + k) * plane;
                            let to = row * latents.len() + (c * frames + frame) * plane;
                            for (acc, e) in sum[to..to + plane].iter_mut().zip(&output[from..from + plane]) {
                                *acc += weights[k] * e;
                            }
                        }
                    }
                }
                for (k, frame) in window.enumerate() {
                    weight[frame] += weights[k];
                }
            }
            let per_row = latents.len();
            let average = |row: usize, index: usize| -> f64 {
                let frame = (index / plane) % frames;
                f64::from(sum[row * per_row + index]) / f64::from(weight[frame])
            };
            let eps: Vec<f32> = (0..per_row)
                .map(|i| match guided {
                    true => {
                        let (u, c) = (average(0, i), average(1, i));
                        (u + params.guidance * (c - u)) as f32
                    }
                    false => average(0, i) as f32,
                })
                .collect();
            let noise: Option<Cow<[f32]>> =
                scheduler.needs_noise(step).then(|| Cow::Owned(gaussian(seed, STEP_STREAM + step as u64, per_row)));
            scheduler.step(step, &eps, &mut latents, noise.as_deref());
            hold_first(&mut latents, step + 1);
            request.control.report((step + 1 - start) as u32, total_steps);
        }
        request.control.check()?;

        // Frames back out of [4, frames, h, w], decoded a chunk at a time.
        let per_frame: Vec<Vec<f32>> = (0..frames)
            .map(|frame| {
                (0..LATENT_CHANNELS)
                    .flat_map(|c| latents[(c * frames + frame) * plane..][..plane].iter().copied())
                    .collect()
            })
            .collect();
        let mut images = Vec::with_capacity(frames);
        for chunk in per_frame.chunks(self.context.decode_chunk.max(1)) {
            let views: Vec<&[f32]> = chunk.iter().map(Vec::as_slice).collect();
            images.extend(self.decoder.decode(&views, h, w)?);
        }
        let mut notes = Vec::new();
        if let Some(&lost) = truncated.last().filter(|lost| **lost > 0) {
            notes.push(format!(
                "prompt truncated: the text encoder reads {} tokens; {lost} were dropped",
                tokenizer::CONTEXT - 2
            ));
        }
        Ok(Frames { width, height, frames: images, notes })
    }
}

impl MotionDiffusion {
    fn run_unet(
        &mut self,
        sample: &[f32],
        shape: [i64; 5],
        hidden: &DynValue,
        timestep: f64,
    ) -> Result<Vec<f32>, RenderError> {
        let (sample_ty, _) = self.unet.inputs["sample"].clone();
        let sample = float_tensor(sample_ty, shape.to_vec(), sample)?;
        let timestep = timestep_input(&self.unet, shape[0] as usize, timestep)?;
        let inputs: Vec<(Cow<str>, SessionInputValue)> = vec![
            ("sample".into(), sample.into()),
            ("timestep".into(), timestep.into()),
            ("encoder_hidden_states".into(), hidden.view().into()),
        ];
        let output = self.unet.output.clone();
        let outputs = self.unet.session.run(inputs)?;
        Ok(extract_floats(&outputs[output.as_str()])?.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_frame_and_the_last_is_flush_with_the_end() {
        let context = MotionContext { context_frames: 8, context_overlap: 4, decode_chunk: 8 };
        assert_eq!(context.windows(8), [0]);
        assert_eq!(context.windows(5), [0]);
        assert_eq!(context.windows(14), [0, 4, 6]);
        assert_eq!(context.windows(16), [0, 4, 8]);
        assert_eq!(context.windows(17), [0, 4, 8, 9]);
        let no_overlap = MotionContext { context_overlap: 0, ..context };
        assert_eq!(no_overlap.windows(16), [0, 8]);
    }

    #[test]
    fn window_weights_are_diffusers_pyramid() {
        assert_eq!(MotionContext::weights(8), [1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0]);
        assert_eq!(MotionContext::weights(5), [1.0, 2.0, 3.0, 2.0, 1.0]);
        assert_eq!(MotionContext::weights(1), [1.0]);
    }
}

//! Noise schedulers, as diffusers defines them and `scheduler/scheduler_config.json` configures
//! them: Euler, Euler-ancestral and LCM. Pure arithmetic on the CPU, in f64; tested against the
//! values diffusers itself gives (`gpu-runner/sd/schedulers.json`).

use serde::Deserialize;

/// `scheduler/scheduler_config.json`, the fields these schedulers read (defaults as diffusers').
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default = "defaults::train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "defaults::beta_start")]
    pub beta_start: f64,
    #[serde(default = "defaults::beta_end")]
    pub beta_end: f64,
    #[serde(default = "defaults::beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "defaults::prediction_type")]
    pub prediction_type: String,
    #[serde(default = "defaults::timestep_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: usize,
    /// LCM: the schedule its distillation used, which inference steps are picked from.
    #[serde(default = "defaults::original_inference_steps")]
    pub original_inference_steps: usize,
    /// LCM: scales the timestep in the consistency boundary condition.
    #[serde(default = "defaults::timestep_scaling")]
    pub timestep_scaling: f64,
    /// LCM: whether the step after the last one has alpha 1.
    #[serde(default = "defaults::set_alpha_to_one")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

mod defaults {
    pub fn train_timesteps() -> usize {
        1000
    }
    pub fn beta_start() -> f64 {
        0.0001
    }
    pub fn beta_end() -> f64 {
        0.02
    }
    pub fn beta_schedule() -> String {
        "linear".into()
    }
    pub fn prediction_type() -> String {
        "epsilon".into()
    }
    pub fn timestep_spacing() -> String {
        "linspace".into()
    }
    pub fn original_inference_steps() -> usize {
        50
    }
    pub fn timestep_scaling() -> f64 {
        10.0
    }
    pub fn set_alpha_to_one() -> bool {
        true
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("scheduler config: {0}")]
    Unsupported(String),
    #[error("{steps} steps: {reason}")]
    Steps { steps: u32, reason: String },
}

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Euler,
    EulerAncestral,
    Lcm,
}

impl SchedulerKind {
    /// The kind a diffusers class name asks for. Other classes (PNDM, DDIM, DPM-Solver, which SD
    /// 1.5 exports name) are served with Euler on the same noise schedule, as diffusers users
    /// commonly swap them; `None` says so.
    pub fn of(class_name: &str) -> Option<Self> {
        match class_name {
            "EulerDiscreteScheduler" => Some(Self::Euler),
            "EulerAncestralDiscreteScheduler" => Some(Self::EulerAncestral),
            "LCMScheduler" => Some(Self::Lcm),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// A scheduler set up for one number of steps.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SchedulerKind,
    prediction: Prediction,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    /// Euler kinds: one per timestep, then 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    final_alpha_cumprod: f64,
    timestep_scaling: f64,
}

impl Scheduler {
    pub fn new(kind: SchedulerKind, config: &SchedulerConfig, steps: u32) -> Result<Self, SchedulerError> {
        let unsupported = |what: &str| Err(SchedulerError::Unsupported(what.to_owned()));
        if config.use_karras_sigmas {
            return unsupported("use_karras_sigmas is not supported");
        }
        if config.rescale_betas_zero_snr {
            return unsupported("rescale_betas_zero_snr is not supported");
        }
        let prediction = match config.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => return unsupported(&format!("prediction_type `{other}`")),
        };
        let alphas_cumprod = alphas_cumprod(config)?;
        let train = config.num_train_timesteps;
        let n = steps as usize;
        if n == 0 || n > train {
            return Err(SchedulerError::Steps { steps, reason: format!("must be 1 to {train}") });
        }
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let mut scheduler = Self {
            kind,
            prediction,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            init_noise_sigma: 1.0,
            final_alpha_cumprod,
            timestep_scaling: config.timestep_scaling,
            alphas_cumprod,
        };
        match kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                scheduler.timesteps = spaced_timesteps(&config.timestep_spacing, train, n, config.steps_offset)?;
                let full: Vec<f64> = scheduler.alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
                scheduler.sigmas = scheduler.timesteps.iter().map(|t| interpolate(&full, *t)).collect();
                scheduler.sigmas.push(0.0);
                let max = scheduler.sigmas.iter().copied().fold(0.0, f64::max);
                scheduler.init_noise_sigma = match config.timestep_spacing.as_str() {
                    "linspace" | "trailing" => max,
                    _ => (max * max + 1.0).sqrt(),
                };
            }
            SchedulerKind::Lcm => {
                let original = config.original_inference_steps;
                let k = train / original;
                let origin: Vec<usize> = (1..=original).map(|i| i * k - 1).rev().collect();
                if origin.len() / n < 1 {
                    return Err(SchedulerError::Steps {
                        steps,
                        reason: format!("LCM takes at most original_inference_steps ({original})"),
                    });
                }
                scheduler.timesteps = (0..n)
                    .map(|i| origin[(i as f64 * origin.len() as f64 / n as f64).floor() as usize] as f64)
                    .collect();
            }
        }
        Ok(scheduler)
    }

    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The timestep the model is told at each step.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// Starting latents are standard noise times this.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// Clean latents `x0` noised to where step `i` starts (diffusers' `add_noise` at the step's
    /// timestep): `x0 + σ·noise` for the Euler kinds, `√ᾱ·x0 + √(1−ᾱ)·noise` for LCM. Image-to-
    /// image starts here and runs the steps from `i` on.
    pub fn noised(&self, i: usize, x0: &[f32], noise: &[f32]) -> Vec<f32> {
        let (a, b) = match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => (1.0, self.sigmas[i]),
            SchedulerKind::Lcm => {
                let alpha = self.alphas_cumprod[self.timesteps[i] as usize];
                (alpha.sqrt(), (1.0 - alpha).sqrt())
            }
        };
        x0.iter().zip(noise).map(|(x, n)| (a * f64::from(*x) + b * f64::from(*n)) as f32).collect()
    }

    /// What the model input is multiplied by at step `i` (`scale_model_input`).
    pub fn input_scale(&self, i: usize) -> f64 {
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => 1.0 / (self.sigmas[i].powi(2) + 1.0).sqrt(),
            SchedulerKind::Lcm => 1.0,
        }
    }

    /// Whether step `i` adds fresh noise (and so needs `noise` in [`Scheduler::step`]).
    pub fn needs_noise(&self, i: usize) -> bool {
        match self.kind {
            SchedulerKind::Euler => false,
            SchedulerKind::EulerAncestral => true,
            SchedulerKind::Lcm => i + 1 < self.timesteps.len(),
        }
    }

    /// One step: `sample` becomes the latents for step `i + 1` given the model's `output` at
    /// step `i`. `noise` (standard normal, as long as `sample`) is used where
    /// [`Scheduler::needs_noise`] says so.
    pub fn step(&self, i: usize, output: &[f32], sample: &mut [f32], noise: Option<&[f32]>) {
        let StepCoefficients { latents: a, prediction: b, noise: c } = self.coefficients(i);
        for (index, (x, e)) in sample.iter_mut().zip(output).enumerate() {
            let mut value = a * f64::from(*x) + b * f64::from(*e);
            if let Some(noise) = noise {
                value += c * f64::from(noise[index]);
            }
            *x = value as f32;
        }
    }

    /// Step `i` as one linear update, `next = A·latents + B·prediction + C·noise`, which every
    /// scheduler here is: what a step graph on the device applies with the host's A, B, C
    /// ([`Scheduler::step`] applies it on the host).
    pub fn coefficients(&self, i: usize) -> StepCoefficients {
        // The prediction's estimate of the clean latents, `p·x + q·prediction`, in the
        // parameterisation of the sample (Euler's sigma, LCM's alphas).
        let clean = |sigma: f64, alpha: f64| -> (f64, f64) {
            match (self.kind, self.prediction) {
                (SchedulerKind::Lcm, Prediction::Epsilon) => (1.0 / alpha.sqrt(), -(1.0 - alpha).sqrt() / alpha.sqrt()),
                (SchedulerKind::Lcm, Prediction::VPrediction) => (alpha.sqrt(), -(1.0 - alpha).sqrt()),
                (_, Prediction::Epsilon) => (1.0, -sigma),
                (_, Prediction::VPrediction) => (1.0 / (sigma * sigma + 1.0), -sigma / (sigma * sigma + 1.0).sqrt()),
                (_, Prediction::Sample) => (0.0, 1.0),
            }
        };
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let sigma = self.sigmas[i];
                let next = self.sigmas[i + 1];
                let (sigma_down, sigma_up) = if self.kind == SchedulerKind::EulerAncestral {
                    let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).max(0.0).sqrt();
                    ((next * next - up * up).max(0.0).sqrt(), up)
                } else {
                    (next, 0.0)
                };
                // derivative = (x - denoised) / sigma; next = x + derivative · (sigma_down - sigma).
                let (p, q) = clean(sigma, 0.0);
                let dt = sigma_down - sigma;
                StepCoefficients { latents: 1.0 + dt * (1.0 - p) / sigma, prediction: -dt * q / sigma, noise: sigma_up }
            }
            SchedulerKind::Lcm => {
                let t = self.timesteps[i];
                let alpha = self.alphas_cumprod[t as usize];
                let alpha_prev = match self.timesteps.get(i + 1) {
                    Some(prev) => self.alphas_cumprod[*prev as usize],
                    None => self.final_alpha_cumprod,
                };
                let scaled = t * self.timestep_scaling;
                let sigma_data2 = 0.25; // sigma_data = 0.5
                let c_skip = sigma_data2 / (scaled * scaled + sigma_data2);
                let c_out = scaled / (scaled * scaled + sigma_data2).sqrt();
                // denoised = c_out · clean + c_skip · x; then, but on the last step, re-noised.
                let (p, q) = clean(0.0, alpha);
                let (a, b) = (c_out * p + c_skip, c_out * q);
                match i + 1 == self.timesteps.len() {
                    true => StepCoefficients { latents: a, prediction: b, noise: 0.0 },
                    false => {
                        let keep = alpha_prev.sqrt();
                        StepCoefficients { latents: keep * a, prediction: keep * b, noise: (1.0 - alpha_prev).sqrt() }
                    }
                }
            }
        }
    }
}

/// One scheduler step as `next = latents·x + prediction·model output + noise·fresh noise`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoefficients {
    pub latents: f64,
    pub prediction: f64,
    pub noise: f64,
}

fn alphas_cumprod(config: &SchedulerConfig) -> Result<Vec<f64>, SchedulerError> {
    let n = config.num_train_timesteps;
    if n < 2 {
        return Err(SchedulerError::Unsupported("num_train_timesteps must be at least 2".into()));
    }
    let line = |start: f64, end: f64| (0..n).map(move |i| start + (end - start) * i as f64 / (n - 1) as f64);
    let betas: Vec<f64> = match (&config.trained_betas, config.beta_schedule.as_str()) {
        (Some(betas), _) if betas.len() == n => betas.clone(),
        (Some(_), _) => {
            return Err(SchedulerError::Unsupported("trained_betas must have num_train_timesteps values".into()));
        }
        (None, "linear") => line(config.beta_start, config.beta_end).collect(),
        (None, "scaled_linear") => line(config.beta_start.sqrt(), config.beta_end.sqrt()).map(|b| b * b).collect(),
        (None, other) => return Err(SchedulerError::Unsupported(format!("beta_schedule `{other}`"))),
    };
    let mut product = 1.0;
    Ok(betas
        .iter()
        .map(|beta| {
            product *= 1.0 - beta;
            product
        })
        .collect())
}

/// The timesteps `n` inference steps visit, from noisiest down, per diffusers' `timestep_spacing`.
fn spaced_timesteps(spacing: &str, train: usize, n: usize, offset: usize) -> Result<Vec<f64>, SchedulerError> {
    Ok(match spacing {
        "linspace" if n == 1 => vec![0.0],
        "linspace" => (0..n).rev().map(|i| i as f64 * (train - 1) as f64 / (n - 1) as f64).collect(),
        "leading" => {
            let ratio = train / n;
            (0..n).rev().map(|i| (i * ratio + offset) as f64).collect()
        }
        "trailing" => {
            let ratio = train as f64 / n as f64;
            (0..n).map(|i| (train as f64 - i as f64 * ratio).round() - 1.0).collect()
        }
        other => return Err(SchedulerError::Unsupported(format!("timestep_spacing `{other}`"))),
    })
}

/// `values` read at fractional index `x` by straight lines between neighbours (numpy's `interp`).
fn interpolate(values: &[f64], x: f64) -> f64 {
    let last = values.len() - 1;
    if x <= 0.0 {
        return values[0];
    }
    if x >= last as f64 {
        return values[last];
    }
    let low = x.floor() as usize;
    let frac = x - low as f64;
    values[low] + (values[low + 1] - values[low]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// What `build_sd.py --schedulers` wrote from diffusers' own schedulers.
    #[derive(Deserialize)]
    struct Case {
        config: serde_json::Value,
        steps: u32,
        timesteps: Vec<f64>,
        init_noise_sigma: f64,
        sigmas: Option<Vec<f64>>,
        scaled_input: Option<Vec<f32>>,
        step_index: Option<usize>,
        step_sample: Option<Vec<f32>>,
        step_output: Option<Vec<f32>>,
        step_result: Option<Vec<f32>>,
    }

    fn close(ours: &[f64], theirs: &[f64], what: &str) {
        assert_eq!(ours.len(), theirs.len(), "{what}: {ours:?} vs {theirs:?}");
        for (a, b) in ours.iter().zip(theirs) {
            // diffusers computes in f32.
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{what}: {ours:?} vs diffusers {theirs:?}");
        }
    }

    #[test]
    fn the_schedules_match_diffusers() {
        let text = include_str!("../../../sd/schedulers.json");
        let cases: Vec<Case> = serde_json::from_str(text).unwrap();
        assert!(cases.len() >= 20);
        for case in cases {
            let config: SchedulerConfig = serde_json::from_value(case.config.clone()).unwrap();
            let kind = SchedulerKind::of(&config.class_name).unwrap();
            let what = format!("{} {} {} steps", config.class_name, config.timestep_spacing, case.steps);
            let scheduler = Scheduler::new(kind, &config, case.steps).unwrap();
            close(scheduler.timesteps(), &case.timesteps, &format!("{what}: timesteps"));
            close(&[scheduler.init_noise_sigma()], &[case.init_noise_sigma], &format!("{what}: init sigma"));
            if kind != SchedulerKind::Lcm {
                close(scheduler.sigmas(), case.sigmas.as_ref().unwrap(), &format!("{what}: sigmas"));
            }
            let Some(index) = case.step_index else { continue };
            if let Some(scaled) = &case.scaled_input {
                let ours: Vec<f64> = case
                    .step_sample
                    .as_ref()
                    .unwrap()
                    .iter()
                    .map(|x| f64::from(*x) * scheduler.input_scale(index))
                    .collect();
                close(
                    &ours,
                    &scaled.iter().map(|x| f64::from(*x)).collect::<Vec<_>>(),
                    &format!("{what}: scaled input"),
                );
            }
            let mut sample = case.step_sample.clone().unwrap();
            scheduler.step(index, case.step_output.as_ref().unwrap(), &mut sample, None);
            let ours: Vec<f64> = sample.iter().map(|x| f64::from(*x)).collect();
            let theirs: Vec<f64> = case.step_result.unwrap().iter().map(|x| f64::from(*x)).collect();
            close(&ours, &theirs, &format!("{what}: step {index}"));
        }
    }

    #[test]
    fn other_classes_and_bad_settings_are_refused_or_mapped() {
        assert_eq!(SchedulerKind::of("PNDMScheduler"), None);
        let config: SchedulerConfig =
            serde_json::from_str(r#"{"_class_name":"EulerDiscreteScheduler","beta_schedule":"squaredcos_cap_v2"}"#)
                .unwrap();
        assert!(matches!(Scheduler::new(SchedulerKind::Euler, &config, 4), Err(SchedulerError::Unsupported(_))));
        let config: SchedulerConfig = serde_json::from_str(r#"{"_class_name":"LCMScheduler"}"#).unwrap();
        assert!(matches!(Scheduler::new(SchedulerKind::Lcm, &config, 51), Err(SchedulerError::Steps { .. })));
        assert!(Scheduler::new(SchedulerKind::Lcm, &config, 8).is_ok());
    }
}

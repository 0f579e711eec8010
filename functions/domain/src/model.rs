//! A model's description: its name and version, the pipeline that runs it, and every limit and
//! default a request is checked against. The same JSON is a model package's `manifest.json`
//! (the runner serves it) and an entry of `GET /v1/models`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An inclusive range of allowed values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Range<T> {
    pub min: T,
    pub max: T,
}

impl<T: PartialOrd + Copy> Range<T> {
    pub fn contains(&self, value: T) -> bool {
        self.min <= value && value <= self.max
    }
}

/// Output encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Png,
    Gif,
    Mp4,
    Webm,
}

impl OutputFormat {
    pub const ALL: [OutputFormat; 4] = [Self::Png, Self::Gif, Self::Mp4, Self::Webm];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Gif => "gif",
            Self::Mp4 => "mp4",
            Self::Webm => "webm",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Gif => "image/gif",
            Self::Mp4 => "video/mp4",
            Self::Webm => "video/webm",
        }
    }

    /// Whether the format holds one frame (an image) rather than many.
    pub fn is_image(self) -> bool {
        matches!(self, Self::Png)
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == text)
    }
}

impl fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request may ask of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Limits {
    pub width: Range<u32>,
    pub height: Range<u32>,
    /// Width and height must be multiples of this (latent models need 8).
    pub size_multiple: u32,
    /// 1 is an image; more is a video.
    pub num_frames: Range<u32>,
    pub fps: Range<u32>,
    pub steps: Range<u32>,
    pub guidance: Range<f64>,
    /// Cap on width × height × num_frames, which bounds render memory and time.
    pub max_total_pixels: u64,
    pub image_formats: Vec<OutputFormat>,
    pub video_formats: Vec<OutputFormat>,
}

/// Values used when a request leaves a field out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Defaults {
    pub width: u32,
    pub height: u32,
    pub num_frames: u32,
    pub fps: u32,
    pub steps: u32,
    pub guidance: f64,
    pub image_format: OutputFormat,
    pub video_format: OutputFormat,
}

/// A served model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelSpec {
    /// What clients put in `model`.
    pub name: String,
    /// The version a job records; part of the cache key, so a new version never serves old results.
    pub version: String,
    /// Which pipeline the runner uses for the package (for example `procedural`, `latent-diffusion`).
    pub pipeline: String,
    #[serde(default)]
    pub description: String,
    pub limits: Limits,
    pub defaults: Defaults,
    /// How long a render may take before the runner's watchdog stops it.
    #[serde(default)]
    pub render_budget: RenderBudget,
    /// What a job of this model costs in GPU-work units (the tenants' daily quota counts them).
    #[serde(default)]
    pub cost: CostModel,
    /// The settings `quality: auto` falls back to under load (absent: such requests render as
    /// asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast: Option<FastPreset>,
}

/// A model's quicker settings: fewer denoising steps (a few-step sampler's count, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FastPreset {
    pub steps: u32,
}

/// A job's cost in GPU-work units. One unit is one megapixel-step: a million pixels of one
/// frame through one denoising pass of the reference model (SD-1.5 on the deployment's GPU).
/// A job costs width × height × frames × steps × (2 when guided: classifier-free guidance
/// runs the UNet twice) ÷ 10⁶ × `unit_scale`, rounded up, at least 1: a guided 25-step 512²
/// image costs 14 units, a 1-step 256² image 1, a guided 50-step 16-frame 1024² video 1,678.
///
/// `unit_scale` is the model's measured GPU time per megapixel-step over the reference model's
/// (render-bench prints the time per unit; BENCHMARKS.md "Cost units" holds the calibration):
/// a model twice as slow per pixel-step costs twice the units, so a quota of units is a quota
/// of GPU time whatever the mix of models and sizes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CostModel {
    pub unit_scale: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self { unit_scale: 1.0 }
    }
}

impl CostModel {
    /// What rendering `params` costs.
    pub fn units(&self, params: &crate::JobParams) -> u64 {
        let passes = if params.guidance > 1.0 { 2.0 } else { 1.0 };
        let megapixel_steps = f64::from(params.width) * f64::from(params.height) / 1e6
            * f64::from(params.num_frames.max(1))
            * f64::from(params.steps.max(1))
            * passes;
        // Rounded to 1e-9 first, so a product that should be whole is not pushed over by float error.
        let units = ((megapixel_steps * self.unit_scale.max(0.0)) * 1e9).round() / 1e9;
        (units.ceil() as u64).max(1)
    }
}

/// How long one job's render may take on this model: `base_secs`, plus `per_megapixel_step_secs`
/// for every million pixels of every frame at every step. Past it the runner stops the render
/// and fails the job (`render_timeout`); a render that does not stop marks the runner unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RenderBudget {
    pub base_secs: f64,
    pub per_megapixel_step_secs: f64,
}

impl Default for RenderBudget {
    /// Generous enough for the CPU: the demo's largest job (12 frames of 1024², 50 steps) gets
    /// 120 s + 1,258 s.
    fn default() -> Self {
        Self { base_secs: 120.0, per_megapixel_step_secs: 2.0 }
    }
}

impl RenderBudget {
    /// The time a render of `params` may take.
    pub fn for_job(&self, params: &crate::JobParams) -> std::time::Duration {
        let megapixel_steps = f64::from(params.width) * f64::from(params.height) / 1e6
            * f64::from(params.num_frames.max(1))
            * f64::from(params.steps.max(1));
        let secs = self.base_secs + self.per_megapixel_step_secs * megapixel_steps;
        std::time::Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(std::time::Duration::MAX)
    }
}

/// A model description that contradicts itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model `{model}`: {problem}")]
pub struct InvalidModelSpec {
    pub model: String,
    pub problem: String,
}

impl ModelSpec {
    /// Checks the description is usable: ranges ordered, defaults inside the limits.
    pub fn check(&self) -> Result<(), InvalidModelSpec> {
        let fail = |problem: String| Err(InvalidModelSpec { model: self.name.clone(), problem });
        let (l, d) = (&self.limits, &self.defaults);
        if self.name.is_empty() || self.name.len() > 64 || self.name.contains(['@', '/', ' ']) {
            return fail("name must be 1 to 64 characters without '@', '/' or spaces".into());
        }
        if self.version.is_empty() {
            return fail("version is empty".into());
        }
        if l.size_multiple == 0 {
            return fail("limits.size_multiple must be at least 1".into());
        }
        let ordered = l.width.min <= l.width.max
            && l.height.min <= l.height.max
            && l.num_frames.min >= 1
            && l.num_frames.min <= l.num_frames.max
            && l.fps.min <= l.fps.max
            && l.steps.min <= l.steps.max
            && l.guidance.min <= l.guidance.max;
        if !ordered {
            return fail("a limit has min > max (or num_frames.min < 1)".into());
        }
        if !(l.width.contains(d.width) && l.height.contains(d.height))
            || d.width % l.size_multiple != 0
            || d.height % l.size_multiple != 0
        {
            return fail("default width/height outside the limits".into());
        }
        if !(l.num_frames.contains(d.num_frames)
            && l.fps.contains(d.fps)
            && l.steps.contains(d.steps)
            && l.guidance.contains(d.guidance))
        {
            return fail("a default is outside its limit".into());
        }
        if self.fast.is_some_and(|fast| !l.steps.contains(fast.steps)) {
            return fail("fast.steps is outside limits.steps".into());
        }
        if !(self.cost.unit_scale.is_finite() && self.cost.unit_scale > 0.0) {
            return fail("cost.unit_scale must be a positive number".into());
        }
        if l.image_formats.iter().any(|f| !f.is_image()) || l.video_formats.iter().any(|f| f.is_image()) {
            return fail("image_formats must hold image formats and video_formats video formats".into());
        }
        if !l.image_formats.contains(&d.image_format) {
            return fail("defaults.image_format is not in limits.image_formats".into());
        }
        if l.num_frames.max > 1 && !l.video_formats.contains(&d.video_format) {
            return fail("defaults.video_format is not in limits.video_formats".into());
        }
        Ok(())
    }
}

/// A model package directory that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Invalid(#[from] InvalidModelSpec),
}

impl ModelSpec {
    /// The file that describes a model package.
    pub const MANIFEST: &'static str = "manifest.json";

    /// Reads and checks one package's manifest.
    pub fn read_manifest(package: &std::path::Path) -> Result<Self, ManifestError> {
        let path = package.join(Self::MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Io { path: path.clone(), source })?;
        let spec: Self = serde_json::from_str(&text).map_err(|source| ManifestError::Parse { path, source })?;
        spec.check()?;
        Ok(spec)
    }

    /// Every package (a directory with a manifest) directly under `models_dir`, sorted by name.
    pub fn read_packages(models_dir: &std::path::Path) -> Result<Vec<(std::path::PathBuf, Self)>, ManifestError> {
        let io = |source| ManifestError::Io { path: models_dir.to_owned(), source };
        let mut packages = Vec::new();
        for entry in std::fs::read_dir(models_dir).map_err(io)? {
            let dir = entry.map_err(io)?.path();
            if dir.join(Self::MANIFEST).is_file() {
                let spec = Self::read_manifest(&dir)?;
                packages.push((dir, spec));
            }
        }
        packages.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        Ok(packages)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A description used across the domain's tests.
    pub fn demo() -> ModelSpec {
        ModelSpec {
            name: "demo".into(),
            version: "1.0.0".into(),
            pipeline: "procedural".into(),
            description: String::new(),
            limits: Limits {
                width: Range { min: 64, max: 1024 },
                height: Range { min: 64, max: 1024 },
                size_multiple: 8,
                num_frames: Range { min: 1, max: 48 },
                fps: Range { min: 1, max: 30 },
                steps: Range { min: 1, max: 50 },
                guidance: Range { min: 0.0, max: 20.0 },
                max_total_pixels: 512 * 512 * 48,
                image_formats: vec![OutputFormat::Png],
                video_formats: vec![OutputFormat::Gif, OutputFormat::Mp4, OutputFormat::Webm],
            },
            defaults: Defaults {
                width: 512,
                height: 512,
                num_frames: 1,
                fps: 8,
                steps: 4,
                guidance: 0.0,
                image_format: OutputFormat::Png,
                video_format: OutputFormat::Gif,
            },
            render_budget: RenderBudget::default(),
            cost: CostModel::default(),
            fast: None,
        }
    }

    #[test]
    fn a_jobs_cost_counts_pixels_frames_steps_and_guidance_scaled_by_the_model() {
        let resolve = |body: &str, model: &ModelSpec| {
            crate::Submission::parse(body.as_bytes())
                .unwrap()
                .resolve(model, crate::WebhookPolicy::default(), || 1)
                .unwrap()
                .params
        };
        let model = demo();
        let units = |body: &str| model.cost.units(&resolve(body, &model));
        // 512² × 25 steps × 2 passes = 13.1 megapixel-steps.
        assert_eq!(units(r#"{"model":"demo","prompt":"x","steps":25,"guidance":7.5}"#), 14);
        assert_eq!(units(r#"{"model":"demo","prompt":"x","steps":25,"guidance":1.0}"#), 7);
        assert_eq!(units(r#"{"model":"demo","prompt":"x","width":256,"height":256,"steps":1}"#), 1);
        // 1000² exactly: 4 steps are 4 units, not 5 from float error.
        assert_eq!(units(r#"{"model":"demo","prompt":"x","width":1000,"height":1000,"steps":4}"#), 4);
        assert_eq!(units(r#"{"model":"demo","prompt":"x","width":1000,"height":1000,"steps":4,"num_frames":3}"#), 12);
        let slower = ModelSpec { cost: CostModel { unit_scale: 2.5 }, ..demo() };
        let params = resolve(r#"{"model":"demo","prompt":"x","width":1000,"height":1000,"steps":4}"#, &slower);
        assert_eq!(slower.cost.units(&params), 10);
        let mut broken = demo();
        broken.cost.unit_scale = 0.0;
        assert!(broken.check().is_err());
    }

    #[test]
    fn a_render_budget_grows_with_pixels_frames_and_steps() {
        let budget = RenderBudget { base_secs: 10.0, per_megapixel_step_secs: 0.5 };
        let mut params =
            crate::Submission::parse(br#"{"model":"demo","prompt":"x","width":1000,"height":1000,"steps":4}"#)
                .unwrap()
                .resolve(&demo(), crate::WebhookPolicy::default(), || 1);
        let params = &mut params.as_mut().unwrap().params;
        assert_eq!(budget.for_job(params), std::time::Duration::from_secs(12));
        params.num_frames = 3;
        assert_eq!(budget.for_job(params), std::time::Duration::from_secs(16));
    }

    #[test]
    fn the_demo_description_is_valid() {
        demo().check().unwrap();
    }

    #[test]
    fn contradictory_descriptions_are_rejected() {
        let mut m = demo();
        m.defaults.width = 2048;
        assert!(m.check().is_err());
        let mut m = demo();
        m.limits.steps = Range { min: 10, max: 1 };
        assert!(m.check().is_err());
        let mut m = demo();
        m.limits.image_formats = vec![OutputFormat::Gif];
        assert!(m.check().is_err());
        let mut m = demo();
        m.name = "a/b".into();
        assert!(m.check().is_err());
    }
}

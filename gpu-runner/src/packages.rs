//! Model packages: a directory with a `manifest.json` (the model's description) and the files
//! its pipeline needs. Each is loaded once, on the configured device.

use kiln_domain::{ManifestError, ModelSpec};
use std::path::Path;

use crate::render::{
    Pipeline,
    diffusion::{DiffusionLoadError, LatentDiffusion, motion::MotionDiffusion},
    procedural::Procedural,
    runtime::{RuntimeError, SessionOptions},
};

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Diffusion(#[from] DiffusionLoadError),
    #[error(
        "model `{model}`: no pipeline `{pipeline}` (this runner has: procedural, latent-diffusion, motion-diffusion)"
    )]
    UnknownPipeline { model: String, pipeline: String },
    #[error("no model packages in {0}")]
    Empty(std::path::PathBuf),
}

/// A package, loaded.
pub struct LoadedModel {
    pub spec: ModelSpec,
    pub pipeline: Box<dyn Pipeline>,
}

/// Loads every package in `models_dir`.
pub fn load_all(models_dir: &Path, options: &SessionOptions) -> Result<Vec<LoadedModel>, PackageError> {
    let packages = ModelSpec::read_packages(models_dir)?;
    if packages.is_empty() {
        return Err(PackageError::Empty(models_dir.to_owned()));
    }
    packages.into_iter().map(|(dir, spec)| load(&dir, spec, options)).collect()
}

pub fn load(dir: &Path, spec: ModelSpec, options: &SessionOptions) -> Result<LoadedModel, PackageError> {
    let pipeline: Box<dyn Pipeline> = match spec.pipeline.as_str() {
        "procedural" => Box::new(Procedural::load(dir, options)?),
        "latent-diffusion" => Box::new(LatentDiffusion::load(dir, options)?),
        "motion-diffusion" => Box::new(MotionDiffusion::load(dir, options)?),
        other => return Err(PackageError::UnknownPipeline { model: spec.name, pipeline: other.to_owned() }),
    };
    Ok(LoadedModel { spec, pipeline })
}

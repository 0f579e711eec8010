//! Which graph file serves each component of a package on a device.
//!
//! A plain package has one graph per component, `<component>/model.onnx`, for every device.
//! `gpu-runner/sd/prepare_sd.py` adds optimized fp16 graphs for CUDA (fused attention, group
//! norm, NHWC convolutions: contrib operators with CUDA kernels only) and names them in
//! `manifest.json`:
//!
//! ```json
//! "graphs": { "cuda": { "unet": "unet/model.cuda.onnx", "vae_decoder": "vae_decoder/model.cuda.onnx" } }
//! ```
//!
//! A component a device's entry does not name keeps its plain graph. An entry may also name
//! graphs beyond the components: `unet_step` (one whole denoising step, so the latents stay on
//! the device) and `vae_decoder_rgb` (the decoder with the scaling and the conversion to RGB
//! bytes), both made by `gpu-runner/sd/step_graph.py`.

use serde::Deserialize;
use std::{
    collections::HashMap,
    path::{Component, Path, PathBuf},
};

use super::DiffusionLoadError;
use crate::render::runtime::Device;

/// The graph file of each component on each kind of device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GraphFiles {
    /// Device kind (`cpu`, `cuda`) → component → file, relative to the package.
    #[serde(default)]
    graphs: HashMap<String, HashMap<String, String>>,
}

impl GraphFiles {
    /// Reads `manifest.json`'s `graphs`; every file it names must be inside the package and exist.
    pub fn read(package: &Path) -> Result<Self, DiffusionLoadError> {
        let path = package.join("manifest.json");
        let invalid = |message: String| DiffusionLoadError::Invalid { path: path.clone(), message };
        let text = std::fs::read_to_string(&path).map_err(|err| invalid(err.to_string()))?;
        let files: Self = serde_json::from_str(&text).map_err(|err| invalid(format!("graphs: {err}")))?;
        for (device, components) in &files.graphs {
            for (component, file) in components {
                let relative = Path::new(file);
                if !relative.components().all(|part| matches!(part, Component::Normal(_))) {
                    return Err(invalid(format!(
                        "graphs.{device}.{component}: `{file}` must be a path inside the package"
                    )));
                }
                if !package.join(relative).is_file() {
                    return Err(invalid(format!("graphs.{device}.{component}: `{file}` does not exist")));
                }
            }
        }
        Ok(files)
    }

    /// The graph that serves `component` on `device`.
    pub fn path(&self, package: &Path, component: &str, device: Device) -> PathBuf {
        match self.graphs.get(kind(device)).and_then(|components| components.get(component)) {
            Some(file) => package.join(file),
            None => package.join(component).join("model.onnx"),
        }
    }

    /// The graph `name` serves on `device`, when the manifest names one: the graphs a package
    /// may add beside its components (`unet_step`, `vae_decoder_rgb`: see `step_graph.py`).
    pub fn extra(&self, package: &Path, name: &str, device: Device) -> Option<PathBuf> {
        self.graphs.get(kind(device)).and_then(|graphs| graphs.get(name)).map(|file| package.join(file))
    }

    /// Whether any component has a graph of its own on `device`.
    pub fn prepared_for(&self, device: Device) -> bool {
        self.graphs.get(kind(device)).is_some_and(|components| !components.is_empty())
    }
}

/// The name of a device's kind in `graphs`.
fn kind(device: Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A package directory holding `manifest` and (empty) `files`.
    fn package(manifest: &serde_json::Value, files: &[&str]) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kiln-graphs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        for file in files {
            let path = dir.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"graph").unwrap();
        }
        dir
    }

    #[test]
    fn cuda_takes_the_prepared_graphs_and_the_cpu_the_plain_ones() {
        let manifest = serde_json::json!({"name": "m", "graphs": {"cuda": {"unet": "unet/model.cuda.onnx"}}});
        let dir = package(&manifest, &["unet/model.cuda.onnx"]);
        let files = GraphFiles::read(&dir).unwrap();
        let at = |component, device| files.path(&dir, component, device);
        assert_eq!(at("unet", Device::Cuda(1)), dir.join("unet/model.cuda.onnx"));
        assert_eq!(at("unet", Device::Cpu), dir.join("unet/model.onnx"));
        assert_eq!(at("vae_decoder", Device::Cuda(0)), dir.join("vae_decoder/model.onnx"), "not prepared");
        assert!(files.prepared_for(Device::Cuda(0)));
        assert!(!files.prepared_for(Device::Cpu));
    }

    #[test]
    fn a_plain_manifest_serves_the_plain_graphs_everywhere() {
        let dir = package(&serde_json::json!({"name": "m"}), &[]);
        let files = GraphFiles::read(&dir).unwrap();
        assert_eq!(files, GraphFiles::default());
        assert_eq!(files.path(&dir, "unet", Device::Cuda(0)), dir.join("unet/model.onnx"));
        assert!(!files.prepared_for(Device::Cuda(0)));
    }

    #[test]
    fn a_graph_outside_the_package_or_missing_is_refused_by_name() {
        for (file, expected) in [
            ("../elsewhere.onnx", "graphs.cuda.unet: `../elsewhere.onnx` must be a path inside the package"),
            ("/etc/passwd", "graphs.cuda.unet: `/etc/passwd` must be a path inside the package"),
            ("unet/missing.onnx", "graphs.cuda.unet: `unet/missing.onnx` does not exist"),
        ] {
            let dir = package(&serde_json::json!({"graphs": {"cuda": {"unet": file}}}), &[]);
            let err = GraphFiles::read(&dir).unwrap_err().to_string();
            assert!(err.ends_with(expected), "{file}: {err}");
        }
    }
}

//! ONNX Runtime: loaded once per process from `ORT_DYLIB_PATH`, sessions on the CPU or on a
//! CUDA device.

use super::diffusion::DiffusionOptions;
use ort::session::{Session, builder::GraphOptimizationLevel};
use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::OnceLock,
};

/// Where sessions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// The CUDA execution provider on this device id.
    Cuda(i32),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|id| id.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{text}` is not a device: use cpu, cuda or cuda:<id>")),
        }
    }
}

/// The devices a runner serves, one render session per model on each: `KILN_DEVICE` as a
/// comma-separated list (`cuda:0,cuda:1`; `cpu,cpu` gives two CPU sessions per model), or
/// `cuda:all` for every GPU of the machine (its `/dev/nvidia<N>` device files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices(pub Vec<Device>);

impl Devices {
    /// `text` with `cuda:all` meaning `gpus` GPUs.
    pub fn parse_with(text: &str, gpus: usize) -> Result<Self, String> {
        let mut devices = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part == "cuda:all" {
                if gpus == 0 {
                    return Err("`cuda:all`: this machine has no NVIDIA GPU (no /dev/nvidia<N>)".into());
                }
                devices.extend((0..gpus as i32).map(Device::Cuda));
            } else {
                devices.push(part.parse()?);
            }
        }
        let mut cuda: Vec<i32> =
            devices.iter().filter_map(|d| if let Device::Cuda(id) = d { Some(*id) } else { None }).collect();
        let count = cuda.len();
        cuda.sort_unstable();
        cuda.dedup();
        if cuda.len() != count {
            return Err(format!("`{text}` names a GPU twice"));
        }
        Ok(Self(devices))
    }
}

impl FromStr for Devices {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse_with(text, gpu_count())
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&names.join(","))
    }
}

/// NVIDIA GPUs of this machine: its `/dev/nvidia<N>` device files.
fn gpu_count() -> usize {
    std::fs::read_dir("/dev").map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.strip_prefix("nvidia").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .count()
    })
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(id) => write!(f, "cuda:{id}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("loading ONNX Runtime from {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("loading {path} on {device}: {source}")]
    Session {
        path: PathBuf,
        device: Device,
        #[source]
        source: ort::Error,
    },
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime from `dylib` (once; later calls reuse the first).
pub fn environment(dylib: &Path) -> Result<&'static ort::environment::Environment, RuntimeError> {
    let loaded = ENVIRONMENT.get_or_init(|| {
        let builder = ort::init_from(dylib).map_err(|err| err.to_string())?;
        builder.with_name("kiln").build().map_err(|err| err.to_string())
    });
    loaded.as_ref().map_err(|message| RuntimeError::Load { path: dylib.to_owned(), message: message.clone() })
}

/// Options for loading one model file.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub dylib: PathBuf,
    pub device: Device,
    /// Threads within an operator; 0 leaves ONNX Runtime's default.
    pub intra_threads: usize,
    /// How latent-diffusion packages batch and bind their UNet runs.
    pub diffusion: DiffusionOptions,
    /// How cuDNN picks each convolution's algorithm on CUDA (ignored on the CPU).
    pub conv_search: ConvSearch,
}

/// How cuDNN picks a convolution's algorithm for each new input shape (ONNX Runtime's
/// `cudnn_conv_algo_search`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ConvSearch {
    /// Time every algorithm once per shape and keep the fastest (ONNX Runtime's default).
    #[default]
    Exhaustive,
    /// cuDNN's own guess, without timing.
    Heuristic,
    /// The default algorithm.
    Default,
}

impl SessionOptions {
    /// The CPU, ONNX Runtime's default threads.
    pub fn cpu(dylib: PathBuf) -> Self {
        Self {
            dylib,
            device: Device::Cpu,
            intra_threads: 0,
            diffusion: DiffusionOptions::for_device(Device::Cpu),
            conv_search: ConvSearch::default(),
        }
    }
}

/// Loads a model file. On CUDA the provider is registered with `error_on_failure`, so a broken
/// GPU setup fails here, loudly, instead of quietly running on the CPU.
pub fn load(model: &Path, options: &SessionOptions) -> Result<Session, RuntimeError> {
    build(model, options, false)
}

/// [`load`], with the CUDA provider's graph capture on (ignored on the CPU): every run must then
/// say which captured graph it is (`gpu_graph_id`, -1 for none) and bind its inputs and outputs
/// at the same device addresses as the run that captured that graph.
pub fn load_for_cuda_graphs(model: &Path, options: &SessionOptions) -> Result<Session, RuntimeError> {
    build(model, options, true)
}

fn build(model: &Path, options: &SessionOptions, cuda_graph: bool) -> Result<Session, RuntimeError> {
    let environment = environment(&options.dylib)?;
    let fail = |source: ort::Error| RuntimeError::Session { path: model.to_owned(), device: options.device, source };
    let mut builder = Session::builder(environment)
        .map_err(fail)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|err| fail(err.into()))?;
    if options.intra_threads > 0 {
        builder = builder.with_intra_threads(options.intra_threads).map_err(|err| fail(err.into()))?;
    }
    if let Device::Cuda(id) = options.device {
        use ort::ep::cuda::ConvAlgorithmSearch as Search;
        let search = match options.conv_search {
            ConvSearch::Exhaustive => Search::Exhaustive,
            ConvSearch::Heuristic => Search::Heuristic,
            ConvSearch::Default => Search::Default,
        };
        let cuda = ort::ep::CUDA::default()
            .with_device_id(id)
            .with_cuda_graph(cuda_graph)
            .with_conv_algorithm_search(search)
            .build()
            .error_on_failure();
        builder = builder.with_execution_providers([cuda]).map_err(|err| fail(err.into()))?;
    }
    builder.commit_from_file(model).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_a_list_or_every_gpu() {
        let parse = |text: &str, gpus| Devices::parse_with(text, gpus).map(|d| d.0);
        assert_eq!(parse("cpu", 0), Ok(vec![Device::Cpu]));
        assert_eq!(parse("cuda", 1), Ok(vec![Device::Cuda(0)]));
        assert_eq!(parse("cuda:0, cuda:2", 4), Ok(vec![Device::Cuda(0), Device::Cuda(2)]));
        assert_eq!(parse("cuda:all", 4), Ok((0..4).map(Device::Cuda).collect()));
        assert_eq!(parse("cpu,cpu", 0), Ok(vec![Device::Cpu, Device::Cpu]), "two CPU sessions per model");
        assert!(parse("cuda:all", 0).unwrap_err().contains("no NVIDIA GPU"));
        assert!(parse("cuda:1,cuda:1", 2).unwrap_err().contains("names a GPU twice"));
        assert!(parse("cuda:all,cuda:0", 2).unwrap_err().contains("names a GPU twice"));
        assert!(parse("gpu", 1).unwrap_err().contains("`gpu` is not a device"));
        assert_eq!(Devices(vec![Device::Cuda(0), Device::Cuda(1)]).to_string(), "cuda:0,cuda:1");
    }
}

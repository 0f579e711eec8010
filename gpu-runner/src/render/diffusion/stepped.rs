//! Denoising with a step graph (`unet_step`, made by `gpu-runner/sd/step_graph.py`): the UNet,
//! the guidance combine and the scheduler's update in one graph, so a chunk's latents go to the
//! device once, stay there through every step, and come back only as RGB bytes from the decoder
//! graph (`vae_decoder_rgb`), or as latents when a job leaves the chunk midway.
//!
//! On CUDA the steps replay CUDA graphs ([`CapturedGraphs`]): each chunk shape (lanes, rows,
//! latent size) gets a graph id, captured by ONNX Runtime on its second run, with every input
//! and the output at device buffers that never move; a chunk whose shape has no graph left
//! pads up to a larger one of its size, or runs uncaptured, and [`GraphRuns`] counts which.

use ort::{
    memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType},
    session::{IoBinding, RunOptions, Session},
    value::{DynTensor, DynTensorValueType, DynValue, Tensor, TensorElementType, Value, ValueType, ValueTypeMarker},
};

use super::{
    Graph, LATENT_CHANNELS, float_tensor, guidance_scale_embedding, scheduler::StepCoefficients, timestep_tensor,
};
use crate::render::{GraphRuns, RenderError, runtime::Device};

/// Where a device's tensors live, for binding outputs and allocating buffers.
pub(super) fn memory(device: Device) -> Result<MemoryInfo<'static>, RenderError> {
    Ok(match device {
        Device::Cpu => MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?,
        Device::Cuda(id) => MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)?,
    })
}

/// One chunk's step graph inputs and its latents on the device: bound for this chunk alone, or
/// written into the device buffers of a captured graph's shape.
pub(super) struct StepCall {
    inputs: StepInputs,
    lanes: usize,
    rows: usize,
    device: Device,
}

enum StepInputs {
    /// Bound for this chunk: two device buffers the steps write in turn; `current` holds the
    /// latest latents (after the first step: before it, the host latents bound at the start are).
    Bound { binding: Box<IoBinding>, buffers: [DynTensor; 2], current: Option<usize> },
    /// In [`CapturedGraphs`]' graph `graph`, whose `latents` buffer holds the latest latents
    /// (the chunk's lanes first, then zero lanes of padding).
    Captured { graph: usize },
}

/// A chunk's inputs as host tensors of the types and shapes the step graph takes.
struct ChunkInputs {
    values: Vec<(&'static str, DynValue)>,
    shape: StepShape,
}

impl ChunkInputs {
    /// The prompt rows (unconditional ones first when guided), each lane's guidance scale and
    /// LCM guidance embedding, and the starting latents, padded with `padding` lanes: zero
    /// latents, guidance 1, and copies of the first rows (a padding lane's output is never read).
    fn new(
        graph: &Graph,
        rows: &[&[f32]],
        latents: &[Vec<f32>],
        guidance: &[f64],
        embedding: &Option<(i64, Vec<f64>)>,
        latent: (usize, usize),
        padding: usize,
    ) -> Result<Self, RenderError> {
        let lanes = latents.len() + padding;
        let per_lane = rows.len() / latents.len().max(1);
        let latent_len = LATENT_CHANNELS * latent.0 * latent.1;
        let width = rows.first().map_or(0, |row| row.len() / super::tokenizer::CONTEXT);
        // Rows come in `per_lane` groups of one row per lane; each group gains `padding` rows.
        let mut hidden = Vec::with_capacity(lanes * per_lane * rows.first().map_or(0, |row| row.len()));
        for group in rows.chunks(latents.len().max(1)) {
            for row in group {
                hidden.extend_from_slice(row);
            }
            for _ in 0..padding {
                hidden.extend_from_slice(group[0]);
            }
        }
        let (hidden_ty, _) = graph.inputs["hidden"].clone();
        let context = super::tokenizer::CONTEXT as i64;
        let mut values =
            vec![("hidden", float_tensor(hidden_ty, vec![(lanes * per_lane) as i64, context, width as i64], &hidden)?)];
        if let Some((dim, embedded)) = embedding {
            let (ty, _) = graph.inputs["timestep_cond"].clone();
            let data: Vec<f32> = embedded
                .iter()
                .chain(std::iter::repeat_n(&1.0, padding))
                .flat_map(|g| guidance_scale_embedding(*g - 1.0, *dim as usize))
                .collect();
            values.push(("timestep_cond", float_tensor(ty, vec![lanes as i64, *dim], &data)?));
        }
        let scales: Vec<f32> = guidance.iter().map(|g| *g as f32).chain(std::iter::repeat_n(1.0, padding)).collect();
        values.push(("guidance", Tensor::from_array((vec![lanes as i64], scales))?.into_dyn()));
        let step = StepShape { lanes, rows: lanes * per_lane, latent };
        let mut data: Vec<f32> = latents.iter().flat_map(|latent| latent.iter().copied()).collect();
        data.resize(lanes * latent_len, 0.0);
        values.push(("latents", Tensor::from_array((step.latent_shape(), data))?.into_dyn()));
        values.push(("noise", Tensor::from_array((step.latent_shape(), vec![0f32; lanes * latent_len]))?.into_dyn()));
        Ok(Self { values, shape: step })
    }
}

/// One step's inputs as host tensors.
fn step_inputs(
    graph: &Graph,
    rows: usize,
    scale: f64,
    timestep: f64,
    coefficients: StepCoefficients,
) -> Result<Vec<(&'static str, DynValue)>, RenderError> {
    let StepCoefficients { latents, prediction, noise } = coefficients;
    let (timestep_ty, timestep_shape) = graph.inputs["timestep"].clone();
    let count = match timestep_shape.first() {
        Some(1) => 1,
        Some(_) => rows,
        None => 0,
    };
    Ok(vec![
        ("scale", Tensor::from_array((vec![1i64], vec![scale as f32]))?.into_dyn()),
        (
            "coefficients",
            Tensor::from_array((vec![3i64], vec![latents as f32, prediction as f32, noise as f32]))?.into_dyn(),
        ),
        ("timestep", timestep_tensor(timestep_ty, count, timestep)?),
    ])
}

impl StepCall {
    /// Binds the chunk's prompt rows (`rows`: unconditional ones first when guided), each lane's
    /// guidance scale and, for an LCM-distilled UNet, its guidance embedding (width, each lane's
    /// guidance); the starting `latents` (one per lane) go to the device with the first step.
    /// With `captured`, the chunk goes into a captured graph's buffers where one serves its shape.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        graph: &Graph,
        captured: Option<&mut CapturedGraphs>,
        rows: &[&[f32]],
        latents: &[Vec<f32>],
        guidance: &[f64],
        embedding: Option<(i64, Vec<f64>)>,
        latent_size: (usize, usize),
        device: Device,
    ) -> Result<Self, RenderError> {
        let lanes = latents.len();
        let shape = StepShape { lanes, rows: rows.len(), latent: latent_size };
        if let Some(captured) = captured
            && let Some((index, padding)) = captured.choose(shape)
        {
            let chunk = ChunkInputs::new(graph, rows, latents, guidance, &embedding, latent_size, padding)?;
            let unit = StepCoefficients { latents: 1.0, prediction: 0.0, noise: 0.0 };
            let step = step_inputs(graph, chunk.shape.rows, 1.0, 0.0, unit)?;
            captured.load(index, &graph.session, chunk, step, device)?;
            return Ok(Self { inputs: StepInputs::Captured { graph: index }, lanes, rows: rows.len(), device });
        }
        let chunk = ChunkInputs::new(graph, rows, latents, guidance, &embedding, latent_size, 0)?;
        let mut binding = graph.session.create_binding()?;
        for (name, value) in &chunk.values {
            binding.bind_input(*name, value)?;
        }
        let allocator = Allocator::new(&graph.session, memory(device)?)?;
        let latent_shape = chunk.shape.latent_shape();
        let buffers = [
            DynTensor::new(&allocator, TensorElementType::Float32, latent_shape.clone())?,
            DynTensor::new(&allocator, TensorElementType::Float32, latent_shape)?,
        ];
        Ok(Self {
            inputs: StepInputs::Bound { binding: Box::new(binding), buffers, current: None },
            lanes,
            rows: rows.len(),
            device,
        })
    }

    /// One step: `scale` on the UNet's input, `timestep`, the update's coefficients, and fresh
    /// noise (one latent's worth per lane) when the scheduler adds some.
    pub(super) fn run(
        &mut self,
        graph: &mut Graph,
        captured: Option<&mut CapturedGraphs>,
        scale: f64,
        timestep: f64,
        coefficients: StepCoefficients,
        noise: Option<Vec<f32>>,
    ) -> Result<(), RenderError> {
        match &mut self.inputs {
            StepInputs::Captured { graph: index } => {
                let captured = captured.expect("a captured chunk runs with its graphs");
                let bucket = &captured.graphs[*index];
                let mut values = step_inputs(graph, bucket.shape.rows, scale, timestep, coefficients)?;
                if let Some(mut noise) = noise {
                    noise.resize(bucket.shape.latent_shape().iter().product::<i64>() as usize, 0.0);
                    values.push(("noise", Tensor::from_array((bucket.shape.latent_shape(), noise))?.into_dyn()));
                }
                captured.step(*index, &mut graph.session, values, self.lanes)
            }
            StepInputs::Bound { binding, buffers, current } => {
                let next = match *current {
                    Some(current) => {
                        binding.bind_input("latents", &buffers[current])?;
                        1 - current
                    }
                    None => 0,
                };
                binding.bind_output("latents_next", &mut buffers[next])?;
                for (name, value) in step_inputs(graph, self.rows, scale, timestep, coefficients)? {
                    binding.bind_input(name, &value)?;
                }
                if let Some(noise) = noise {
                    let shape = buffers[next].shape().to_vec();
                    binding.bind_input("noise", &Tensor::from_array((shape, noise))?)?;
                }
                match captured {
                    // A session that captures graphs runs everything else as graph -1.
                    Some(captured) => {
                        graph.session.run_binding_with_options(binding, &captured.uncaptured)?;
                        captured.runs.uncaptured += 1;
                    }
                    None => drop(graph.session.run_binding(binding)?),
                }
                *current = Some(next);
                Ok(())
            }
        }
    }

    /// The latents now, as one array on the device (for the decoder graph); a captured graph's
    /// padding lanes follow the chunk's own.
    pub(super) fn latents<'a>(&'a self, captured: Option<&'a CapturedGraphs>) -> Option<&'a DynTensor> {
        match &self.inputs {
            StepInputs::Bound { buffers, current, .. } => current.map(|current| &buffers[current]),
            StepInputs::Captured { graph } => {
                captured.and_then(|captured| captured.graphs.get(*graph)).and_then(|graph| graph.input("latents"))
            }
        }
    }

    /// The latents now, one per lane, on the host.
    pub(super) fn download(
        self,
        captured: Option<&CapturedGraphs>,
        start: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>, RenderError> {
        let Some(buffer) = self.latents(captured) else { return Ok(start) };
        let host = match self.device {
            Device::Cpu => None,
            Device::Cuda(_) => Some(buffer.to(AllocationDevice::CPU, 0)?),
        };
        let (_, data) = host.as_ref().unwrap_or(buffer).try_extract_tensor::<f32>()?;
        let per_lane = data.len() / buffer.shape().first().map_or(1, |lanes| (*lanes).max(1) as usize);
        Ok(data.chunks_exact(per_lane).take(self.lanes).map(<[f32]>::to_vec).collect())
    }
}

/// Decodes latents (on the device or the host) with the decoder graph that ends in RGB bytes:
/// one `height × width × 3` image per latent.
pub(super) fn decode_rgb<T: ValueTypeMarker + ?Sized>(
    graph: &mut Graph,
    latents: &Value<T>,
) -> Result<Vec<Vec<u8>>, RenderError> {
    let mut binding = graph.session.create_binding()?;
    binding.bind_input("latents", latents)?;
    binding.bind_output_to_device("rgb", &memory(Device::Cpu)?)?;
    let outputs = graph.session.run_binding(&binding)?;
    let rgb = &outputs["rgb"];
    if rgb.dtype().tensor_type() != Some(TensorElementType::Uint8) {
        return Err(RenderError::Invalid("the decoder's rgb output is not bytes".into()));
    }
    let (shape, bytes) = rgb.try_extract_tensor::<u8>()?;
    let per_image = shape.iter().skip(1).product::<i64>() as usize;
    Ok(bytes.chunks_exact(per_image.max(1)).map(<[u8]>::to_vec).collect())
}

/// The shape of a chunk's step: lanes, UNet rows (lanes, or twice as many with guidance) and
/// the latents' height and width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StepShape {
    lanes: usize,
    rows: usize,
    latent: (usize, usize),
}

impl StepShape {
    fn latent_shape(&self) -> Vec<i64> {
        vec![self.lanes as i64, LATENT_CHANNELS as i64, self.latent.0 as i64, self.latent.1 as i64]
    }

    /// Whether a graph of this shape serves `chunk` (of fewer lanes, as padding): same size and
    /// rows per lane.
    fn holds(&self, chunk: StepShape) -> bool {
        self.latent == chunk.latent && self.lanes >= chunk.lanes && self.rows * chunk.lanes == chunk.rows * self.lanes
    }
}

/// The step graph's CUDA graphs, on a session made with graph capture on
/// ([`crate::render::runtime::load_for_cuda_graphs`]): one per chunk shape, up to `limit`.
///
/// ONNX Runtime runs a graph id plainly once, captures it on its second run, and from then on
/// replays it without looking at the binding: so each graph owns device buffers for every input
/// and the output, bound once, and a step writes its values into them (the latents it made are
/// copied from the output buffer into the input one). A run outside every graph is id -1.
pub(super) struct CapturedGraphs {
    limit: usize,
    graphs: Vec<CapturedGraph>,
    uncaptured: RunOptions,
    runs: GraphRuns,
}

struct CapturedGraph {
    shape: StepShape,
    options: RunOptions,
    binding: IoBinding,
    /// The device buffer of each input, by name (`Clone` would copy one: they are looked up).
    inputs: Vec<(&'static str, DynTensor)>,
    latents_next: DynTensor,
    runs: u64,
}

impl CapturedGraphs {
    /// Graphs for at most `limit` shapes.
    pub(super) fn new(limit: usize) -> Result<Self, RenderError> {
        let mut uncaptured = RunOptions::new()?;
        uncaptured.set("gpu_graph_id", "-1")?;
        Ok(Self { limit, graphs: Vec::new(), uncaptured, runs: GraphRuns::default() })
    }

    /// The runs counted since the last call.
    pub(super) fn take_runs(&mut self) -> GraphRuns {
        std::mem::take(&mut self.runs)
    }

    /// The graph for `chunk`, and how many lanes of padding it adds: the graph of its shape, a
    /// new one while fewer than `limit` exist, or else the smallest of its size and rows per
    /// lane with more lanes. `None`: the chunk runs uncaptured.
    fn choose(&mut self, chunk: StepShape) -> Option<(usize, usize)> {
        if let Some(index) = self.graphs.iter().position(|graph| graph.shape == chunk) {
            return Some((index, 0));
        }
        if self.graphs.len() < self.limit {
            return Some((self.graphs.len(), 0));
        }
        let larger = self
            .graphs
            .iter()
            .enumerate()
            .filter(|(_, graph)| graph.shape.holds(chunk))
            .min_by_key(|(_, graph)| graph.shape.lanes)
            .map(|(index, graph)| (index, graph.shape.lanes - chunk.lanes));
        if larger.is_none() {
            self.runs.no_graph_chunks += 1;
        }
        larger
    }

    /// Writes a chunk's inputs into graph `index`'s buffers, first making the graph (its id,
    /// buffers and binding) when `index` is new.
    fn load(
        &mut self,
        index: usize,
        session: &Session,
        chunk: ChunkInputs,
        step: Vec<(&'static str, DynValue)>,
        device: Device,
    ) -> Result<(), RenderError> {
        if index == self.graphs.len() {
            let allocator = Allocator::new(session, memory(device)?)?;
            let on_device = |value: &DynValue| -> Result<DynTensor, RenderError> {
                let ValueType::Tensor { ty, shape, .. } = value.dtype() else {
                    return Err(RenderError::Invalid("a step input is not a tensor".into()));
                };
                Ok(DynTensor::new(&allocator, *ty, shape.to_vec())?)
            };
            let mut inputs = Vec::new();
            for (name, value) in chunk.values.iter().chain(&step) {
                inputs.push((*name, on_device(value)?));
            }
            let latent_shape = chunk.shape.latent_shape();
            let latents_next = DynTensor::new(&allocator, TensorElementType::Float32, latent_shape)?;
            let mut binding = session.create_binding()?;
            for (name, tensor) in &inputs {
                binding.bind_input(*name, tensor)?;
            }
            let mut options = RunOptions::new()?;
            options.set("gpu_graph_id", (index + 1).to_string())?;
            let mut graph = CapturedGraph { shape: chunk.shape, options, binding, inputs, latents_next, runs: 0 };
            graph.binding.bind_output("latents_next", &mut graph.latents_next)?;
            self.graphs.push(graph);
            tracing::info!(graph = index + 1, shape = ?chunk.shape, "a new CUDA graph shape; captured on its second run");
        }
        let graph = &mut self.graphs[index];
        graph.write(chunk.values)
    }

    /// One step in graph `index`: its values written, the graph run (captured or replayed),
    /// its latents moved to the input buffer.
    fn step(
        &mut self,
        index: usize,
        session: &mut Session,
        values: Vec<(&'static str, DynValue)>,
        lanes: usize,
    ) -> Result<(), RenderError> {
        let graph = &mut self.graphs[index];
        graph.write(values)?;
        let ran = session.run_binding_with_options(&graph.binding, &graph.options).map(drop);
        if let Err(err) = ran {
            if graph.runs < 2 {
                tracing::error!(graph = index + 1, error = %err, "capturing a CUDA graph failed; the session stops using them");
                self.limit = 0;
                self.graphs.clear();
                self.runs.failed += 1;
            }
            return Err(err.into());
        }
        let CapturedGraph { inputs, latents_next, .. } = graph;
        match inputs.iter_mut().find(|(name, _)| *name == "latents") {
            Some((_, latents)) => latents_next.copy_into(latents)?,
            None => return Err(RenderError::Invalid("the step graph has no latents buffer".into())),
        }
        match graph.runs {
            0 | 1 => self.runs.capturing += 1,
            _ => self.runs.replayed += 1,
        }
        graph.runs += 1;
        if graph.shape.lanes > lanes {
            self.runs.padded += 1;
        }
        Ok(())
    }
}

impl CapturedGraph {
    fn input(&self, name: &str) -> Option<&DynTensor> {
        self.inputs.iter().find(|(input, _)| *input == name).map(|(_, buffer)| buffer)
    }

    fn input_mut(&mut self, name: &str) -> Result<&mut DynTensor, RenderError> {
        match self.inputs.iter_mut().find(|(input, _)| *input == name) {
            Some((_, buffer)) => Ok(buffer),
            None => Err(RenderError::Invalid(format!("the step input `{name}` has no buffer"))),
        }
    }

    /// Copies host `values` into the buffers of the inputs they name.
    fn write(&mut self, values: Vec<(&'static str, DynValue)>) -> Result<(), RenderError> {
        for (name, value) in values {
            value.downcast::<DynTensorValueType>()?.copy_into(self.input_mut(name)?)?;
        }
        Ok(())
    }
}

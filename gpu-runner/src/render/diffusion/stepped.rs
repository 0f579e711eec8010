//! Denoising with a step graph (`unet_step`, made by `gpu-runner/sd/step_graph.py`): the UNet,
//! the guidance combine and the scheduler's update in one graph, so a chunk's latents go to the
//! device once, stay there through every step (two buffers on the device, each step writing
//! the other), and come back only as RGB bytes from the decoder graph (`vae_decoder_rgb`), or
//! as latents when a job leaves the chunk midway.

use ort::{
    memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType},
    session::IoBinding,
    value::{Tensor, TensorElementType, Value, ValueTypeMarker},
};

use super::{
    Graph, LATENT_CHANNELS, float_tensor, guidance_scale_embedding, scheduler::StepCoefficients, timestep_tensor,
};
use crate::render::{RenderError, runtime::Device};

/// Where a device's tensors live, for binding outputs and allocating buffers.
pub(super) fn memory(device: Device) -> Result<MemoryInfo<'static>, RenderError> {
    Ok(match device {
        Device::Cpu => MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?,
        Device::Cuda(id) => MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)?,
    })
}

/// One chunk's step graph inputs, bound once, and its latents on the device.
pub(super) struct StepCall {
    binding: IoBinding,
    /// The two device buffers the steps write in turn; `current` holds the latest latents
    /// (after the first step: before it, the host latents bound at the start are).
    buffers: [Tensor<f32>; 2],
    current: Option<usize>,
    lanes: usize,
    rows: usize,
    device: Device,
}

impl StepCall {
    /// Binds the chunk's prompt rows (`rows`: unconditional ones first when guided), each lane's
    /// guidance scale and, for an LCM-distilled UNet, its guidance embedding (width, each lane's
    /// guidance); the starting `latents` (one per lane) go to the device with the first step.
    pub(super) fn new(
        graph: &Graph,
        rows: &[&[f32]],
        latents: &[Vec<f32>],
        guidance: &[f64],
        embedding: Option<(i64, Vec<f64>)>,
        latent_size: (usize, usize),
        device: Device,
    ) -> Result<Self, RenderError> {
        let lanes = latents.len();
        let shape = vec![lanes as i64, LATENT_CHANNELS as i64, latent_size.0 as i64, latent_size.1 as i64];
        let mut binding = graph.session.create_binding()?;
        let (hidden_ty, _) = graph.inputs["hidden"].clone();
        let width = rows.first().map_or(0, |row| row.len() / super::tokenizer::CONTEXT);
        let hidden: Vec<f32> = rows.iter().flat_map(|row| row.iter().copied()).collect();
        binding.bind_input(
            "hidden",
            &float_tensor(hidden_ty, vec![rows.len() as i64, super::tokenizer::CONTEXT as i64, width as i64], &hidden)?,
        )?;
        if let Some((dim, embedded)) = embedding {
            let (ty, _) = graph.inputs["timestep_cond"].clone();
            let data: Vec<f32> =
                embedded.iter().flat_map(|g| guidance_scale_embedding(*g - 1.0, dim as usize)).collect();
            binding.bind_input("timestep_cond", &float_tensor(ty, vec![lanes as i64, dim], &data)?)?;
        }
        let scales: Vec<f32> = guidance.iter().map(|g| *g as f32).collect();
        binding.bind_input("guidance", &Tensor::from_array((vec![lanes as i64], scales))?)?;
        let count: usize = shape.iter().product::<i64>() as usize;
        binding.bind_input("noise", &Tensor::from_array((shape.clone(), vec![0f32; count]))?)?;
        let data: Vec<f32> = latents.iter().flat_map(|latent| latent.iter().copied()).collect();
        binding.bind_input("latents", &Tensor::from_array((shape.clone(), data))?)?;
        let allocator = Allocator::new(&graph.session, memory(device)?)?;
        let buffers = [Tensor::<f32>::new(&allocator, shape.clone())?, Tensor::<f32>::new(&allocator, shape)?];
        Ok(Self { binding, buffers, current: None, lanes, rows: rows.len(), device })
    }

    /// One step: `scale` on the UNet's input, `timestep`, the update's coefficients, and fresh
    /// noise (one latent's worth per lane) when the scheduler adds some.
    pub(super) fn run(
        &mut self,
        graph: &mut Graph,
        scale: f64,
        timestep: f64,
        coefficients: StepCoefficients,
        noise: Option<Vec<f32>>,
    ) -> Result<(), RenderError> {
        let next = match self.current {
            Some(current) => {
                self.binding.bind_input("latents", &self.buffers[current])?;
                1 - current
            }
            None => 0,
        };
        self.binding.bind_output("latents_next", &mut self.buffers[next])?;
        self.binding.bind_input("scale", &Tensor::from_array((vec![1i64], vec![scale as f32]))?)?;
        let StepCoefficients { latents, prediction, noise: noise_scale } = coefficients;
        let values = vec![latents as f32, prediction as f32, noise_scale as f32];
        self.binding.bind_input("coefficients", &Tensor::from_array((vec![3i64], values))?)?;
        let (timestep_ty, timestep_shape) = graph.inputs["timestep"].clone();
        let count = match timestep_shape.first() {
            Some(1) => 1,
            Some(_) => self.rows,
            None => 0,
        };
        self.binding.bind_input("timestep", &timestep_tensor(timestep_ty, count, timestep)?)?;
        if let Some(noise) = noise {
            let shape = self.buffers[next].shape().to_vec();
            self.binding.bind_input("noise", &Tensor::from_array((shape, noise))?)?;
        }
        graph.session.run_binding(&self.binding)?;
        self.current = Some(next);
        Ok(())
    }

    /// The latents now, as one array, on the device (for the decoder graph).
    pub(super) fn latents(&self) -> Option<&Tensor<f32>> {
        self.current.map(|current| &self.buffers[current])
    }

    /// The latents now, one per lane, on the host.
    pub(super) fn download(self, start: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, RenderError> {
        let Some(current) = self.current else { return Ok(start) };
        let buffer = &self.buffers[current];
        let host = match self.device {
            Device::Cpu => None,
            Device::Cuda(_) => Some(buffer.to(AllocationDevice::CPU, 0)?),
        };
        let (_, data) = host.as_ref().unwrap_or(buffer).extract_tensor();
        let per_lane = data.len() / self.lanes.max(1);
        Ok(data.chunks_exact(per_lane).map(<[f32]>::to_vec).collect())
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

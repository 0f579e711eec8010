//! Encoding frames into the requested format, on the blocking pool, never on the render thread:
//! a session thread hands its frames over and goes on to the next batch while they encode.

mod gif;
mod h264;
mod png;
#[cfg(feature = "webm")]
mod webm;

use kiln_domain::OutputFormat;
use std::sync::Arc;

use crate::render::Frames;

pub use h264::{avcc_to_annex_b, split_annex_b};

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("{format} cannot hold {reason}")]
    Unsupported { format: OutputFormat, reason: String },
    #[error("{format} encoder failed: {message}")]
    Failed { format: OutputFormat, message: String },
}

impl EncodeError {
    fn failed(format: OutputFormat) -> impl FnOnce(String) -> Self {
        move |message| Self::Failed { format, message }
    }
}

/// Encodes `frames` as `format` at `fps` (ignored for images).
pub async fn encode(format: OutputFormat, frames: Arc<Frames>, fps: u32) -> Result<Vec<u8>, EncodeError> {
    if frames.frames.is_empty() {
        return Err(EncodeError::Unsupported { format, reason: "no frames".into() });
    }
    let fps = fps.max(1);
    match format {
        OutputFormat::Png => blocking(format, move || png::encode(&frames)).await,
        // GIF quantizes each frame to its own palette: the slow part, done for all frames at once.
        OutputFormat::Gif => {
            let quantizing: Vec<_> = (0..frames.frames.len())
                .map(|index| {
                    let frames = frames.clone();
                    tokio::task::spawn_blocking(move || gif::quantize(&frames, index, fps))
                })
                .collect();
            let mut quantized = Vec::with_capacity(quantizing.len());
            for task in quantizing {
                quantized.push(task.await.map_err(|err| EncodeError::failed(format)(err.to_string()))?);
            }
            let (width, height) = (frames.width, frames.height);
            blocking(format, move || gif::assemble(width, height, quantized)).await
        }
        OutputFormat::Mp4 => blocking(format, move || h264::encode_mp4(&frames, fps)).await,
        #[cfg(feature = "webm")]
        OutputFormat::Webm => blocking(format, move || webm::encode(&frames, fps)).await,
        #[cfg(not(feature = "webm"))]
        OutputFormat::Webm => {
            Err(EncodeError::Unsupported { format, reason: "anything: this build has no WebM encoder".into() })
        }
    }
}

async fn blocking(
    format: OutputFormat,
    work: impl FnOnce() -> Result<Vec<u8>, String> + Send + 'static,
) -> Result<Vec<u8>, EncodeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| err.to_string())
        .and_then(|result| result)
        .map_err(EncodeError::failed(format))
}

/// Video codecs work on 4:2:0 frames: width and height must be even.
fn check_even(format: OutputFormat, frames: &Frames) -> Result<(), String> {
    if frames.width % 2 == 1 || frames.height % 2 == 1 {
        return Err(format!("{format} needs an even width and height, not {}x{}", frames.width, frames.height));
    }
    Ok(())
}

/// Converts RGB to I420 (planar Y, then U, then V at half resolution), BT.601.
#[cfg(feature = "webm")]
fn rgb_to_i420(rgb: &[u8], width: usize, height: usize) -> Vec<u8> {
    let yuv = openh264::formats::YUVBuffer::from_rgb8_source(openh264::formats::RgbSliceU8::new(rgb, (width, height)));
    use openh264::formats::YUVSource;
    let mut i420 = Vec::with_capacity(width * height * 3 / 2);
    i420.extend_from_slice(yuv.y());
    i420.extend_from_slice(yuv.u());
    i420.extend_from_slice(yuv.v());
    i420
}

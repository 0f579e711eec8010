//! Animated GIF: each frame quantized to its own 256-colour palette (in parallel), then written
//! in order, looping forever.

use crate::render::Frames;

/// NeuQuant's sampling factor: 1 is best and slowest, 30 fastest; 10 is the gif crate's default.
const QUANTIZE_SPEED: i32 = 10;

pub fn quantize(frames: &Frames, index: usize, fps: u32) -> gif::Frame<'static> {
    let mut frame =
        gif::Frame::from_rgb_speed(frames.width as u16, frames.height as u16, &frames.frames[index], QUANTIZE_SPEED);
    frame.delay = (100 / fps).max(1) as u16;
    frame
}

pub fn assemble(width: u32, height: u32, frames: Vec<gif::Frame<'static>>) -> Result<Vec<u8>, String> {
    let (width, height) =
        (u16::try_from(width).map_err(|e| e.to_string())?, u16::try_from(height).map_err(|e| e.to_string())?);
    let mut out = Vec::new();
    {
        let mut encoder = gif::Encoder::new(&mut out, width, height, &[]).map_err(|err| err.to_string())?;
        encoder.set_repeat(gif::Repeat::Infinite).map_err(|err| err.to_string())?;
        for frame in &frames {
            encoder.write_frame(frame).map_err(|err| err.to_string())?;
        }
    }
    Ok(out)
}

//! Turning a prompt and seed into numbers a procedural model can use.

use kiln_domain::JobParams;
use sha2::{Digest, Sha256};

/// Slots of the demo model's style vector (see its `build_model.py`).
pub const STYLE_LEN: usize = 16;

/// The style of a picture: colours from the prompt (so a prompt keeps its palette whatever the
/// seed), shapes from the seed, contrast from guidance.
pub fn style(params: &JobParams) -> [f32; STYLE_LEN] {
    let colours = Sha256::new()
        .chain_update(params.prompt.as_bytes())
        .chain_update([0])
        .chain_update(params.negative_prompt.as_bytes())
        .finalize();
    let shapes = Sha256::digest(params.seed.to_le_bytes());
    let unit = |byte: u8| f32::from(byte) / 255.0;
    let mut style = [0.0; STYLE_LEN];
    for (slot, value) in style.iter_mut().enumerate() {
        *value = match slot {
            0..=5 | 10..=12 => unit(colours[slot]),
            _ => unit(shapes[slot]),
        };
    }
    // The sun is brighter than the sky around it.
    for value in &mut style[10..13] {
        *value = 0.55 + 0.45 * *value;
    }
    style[15] = (params.guidance / 20.0).clamp(0.0, 1.0) as f32;
    style
}

//! Turning a prompt and seed into numbers a procedural model can use, and seeded noise.

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

/// Uniform noise in 0..1, the same for the same seed and stream on every machine (SplitMix64).
pub fn noise(seed: u64, stream: u64, len: usize) -> Vec<f32> {
    let mut state = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_deterministic_uniform_and_differs_by_stream() {
        let a = noise(7, 0, 10_000);
        assert_eq!(a, noise(7, 0, 10_000));
        assert_ne!(a, noise(7, 1, 10_000));
        assert!(a.iter().all(|v| (0.0..1.0).contains(v)));
        let mean: f32 = a.iter().sum::<f32>() / a.len() as f32;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }
}

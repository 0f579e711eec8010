//! Seeded noise, the same on every machine and in the Python reference
//! (`gpu-runner/sd/reference.py`): SplitMix64 streams, uniform and Gaussian values, and the
//! spherical interpolation a latent walk moves along.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 sequence for one seed and stream: output `i` depends only on (seed, stream, i).
fn splitmix(seed: u64, stream: u64) -> impl Iterator<Item = u64> {
    let mut state = seed ^ stream.wrapping_mul(GOLDEN);
    std::iter::repeat_with(move || {
        state = state.wrapping_add(GOLDEN);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// Uniform noise in 0..1 (24-bit resolution).
pub fn uniform(seed: u64, stream: u64, len: usize) -> Vec<f32> {
    splitmix(seed, stream).take(len).map(|z| (z >> 40) as f32 / (1u64 << 24) as f32).collect()
}

/// Standard normal noise (Box-Muller over pairs of 53-bit uniforms, computed in f64).
pub fn gaussian(seed: u64, stream: u64, len: usize) -> Vec<f32> {
    const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
    let mut bits = splitmix(seed, stream);
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        let (a, b) = (bits.next().unwrap_or_default(), bits.next().unwrap_or_default());
        let u1 = ((a >> 11) + 1) as f64 * SCALE; // (0, 1]: ln is finite
        let u2 = (b >> 11) as f64 * SCALE;
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        out.push((radius * angle.cos()) as f32);
        out.push((radius * angle.sin()) as f32);
    }
    out.truncate(len);
    out
}

/// Spherical interpolation from `a` (t = 0) to `b` (t = 1): moves along the sphere Gaussian noise
/// lives near, so every point in between is still noise of the right scale (a straight line
/// between two noises passes through low-variance noise that a model renders washed out).
pub fn slerp(a: &[f32], b: &[f32], t: f64) -> Vec<f32> {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let cos = dot / (norm(a) * norm(b)).max(f64::MIN_POSITIVE);
    let (wa, wb) = if cos.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta = cos.acos();
        (((1.0 - t) * theta).sin() / theta.sin(), (t * theta).sin() / theta.sin())
    };
    a.iter().zip(b).map(|(x, y)| (wa * f64::from(*x) + wb * f64::from(*y)) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_noise_is_deterministic_uniform_and_differs_by_stream() {
        let a = uniform(7, 0, 10_000);
        assert_eq!(a, uniform(7, 0, 10_000));
        assert_ne!(a, uniform(7, 1, 10_000));
        assert!(a.iter().all(|v| (0.0..1.0).contains(v)));
        let mean: f32 = a.iter().sum::<f32>() / a.len() as f32;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }

    #[test]
    fn gaussian_noise_has_zero_mean_and_unit_variance() {
        let g = gaussian(3, 5, 100_001);
        assert_eq!(g.len(), 100_001);
        assert_eq!(g, gaussian(3, 5, 100_001));
        let mean = g.iter().map(|v| f64::from(*v)).sum::<f64>() / g.len() as f64;
        let var = g.iter().map(|v| (f64::from(*v) - mean).powi(2)).sum::<f64>() / g.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
        assert_eq!(&gaussian(3, 5, 10)[..], &g[..10], "a shorter draw is a prefix of a longer one");
    }

    #[test]
    fn slerp_ends_at_its_endpoints_and_keeps_the_noise_scale() {
        let (a, b) = (gaussian(1, 0, 4096), gaussian(1, 1, 4096));
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
        assert!(close(&slerp(&a, &b, 0.0), &a));
        assert!(close(&slerp(&a, &b, 1.0), &b));
        let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let mid = slerp(&a, &b, 0.5);
        let lerp: Vec<f32> = a.iter().zip(&b).map(|(x, y)| 0.5 * (x + y)).collect();
        assert!((norm(&mid) / norm(&a) - 1.0).abs() < 0.05, "slerp keeps the scale");
        assert!(norm(&lerp) / norm(&a) < 0.8, "a straight line would shrink it");
    }
}

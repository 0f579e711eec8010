//! Input images (a job's `init_image`), made ready for a pipeline: decoded and fitted to the
//! job's frame by scaling to cover it and cropping the middle, so nothing is stretched.

use std::sync::Arc;

/// An RGB image of the job's size, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// The step an image-to-image render starts at (diffusers' `get_timesteps`): the last
/// `strength × steps` steps run, at least one; 0 for a job without an image.
pub fn first_step(params: &kiln_domain::JobParams) -> u32 {
    match (&params.init_image, params.strength) {
        (Some(_), Some(strength)) => {
            let run = ((f64::from(params.steps) * strength) as u32).clamp(1, params.steps);
            params.steps - run
        }
        _ => 0,
    }
}

/// Decodes `bytes` (PNG or JPEG) and fits it to `width`×`height`.
pub fn fit(bytes: &[u8], width: u32, height: u32) -> Result<Arc<InputImage>, image::ImageError> {
    let decoded = image::load_from_memory(bytes)?.to_rgb8();
    let (w, h) = (decoded.width() as f64, decoded.height() as f64);
    let scale = (f64::from(width) / w).max(f64::from(height) / h);
    let (scaled_w, scaled_h) = (((w * scale).round() as u32).max(width), ((h * scale).round() as u32).max(height));
    let scaled = match (scaled_w, scaled_h) == (decoded.width(), decoded.height()) {
        true => decoded,
        false => image::imageops::resize(&decoded, scaled_w, scaled_h, image::imageops::FilterType::Triangle),
    };
    let (left, top) = ((scaled_w - width) / 2, (scaled_h - height) / 2);
    let cropped = image::imageops::crop_imm(&scaled, left, top, width, height).to_image();
    Ok(Arc::new(InputImage { width, height, rgb: cropped.into_raw() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb(pixel(x, y)));
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn an_image_of_the_frame_size_is_kept_as_it_is() {
        let bytes = png(16, 8, |x, y| [x as u8 * 10, y as u8 * 20, 7]);
        let fitted = fit(&bytes, 16, 8).unwrap();
        assert_eq!(fitted.rgb[..6], [0, 0, 7, 10, 0, 7]);
        assert_eq!(fitted.rgb.len(), 16 * 8 * 3);
    }

    #[test]
    fn a_wider_image_is_scaled_to_cover_and_its_middle_kept() {
        // Left third red, middle third green, right third blue; fitted into a square: green.
        let bytes = png(96, 32, |x, _| match x / 32 {
            0 => [255, 0, 0],
            1 => [0, 255, 0],
            _ => [0, 0, 255],
        });
        let fitted = fit(&bytes, 16, 16).unwrap();
        assert_eq!((fitted.width, fitted.height, fitted.rgb.len()), (16, 16, 16 * 16 * 3));
        let middle = &fitted.rgb[(8 * 16 + 8) * 3..][..3];
        assert!(middle[1] > 200 && middle[0] < 30 && middle[2] < 30, "{middle:?}");
    }
}

//! Decoding large frames in tiles, as diffusers' `AutoencoderKL.tiled_decode` does: the latents
//! are cut into overlapping square tiles, each decoded alone (so the decoder's memory is that of
//! one tile whatever the frame), and neighbouring tiles are blended across their overlap with a
//! linear ramp before each is cropped and the crops are put together.
//!
//! With the defaults (tiles of 64 latents, a quarter overlapping) a 1920×1080 frame is 3 × 5
//! tiles of 512×512 pixels, where an untiled decode of SD's VAE needs several gigabytes for its
//! activations.

use serde::Deserialize;

use super::RenderError;

/// When and how a package's decoder tiles (`manifest.json`'s `vae_tiling`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TilePolicy {
    /// A tile's side, in latents (diffusers: the VAE's `sample_size / 8`, 64 for SD 1.5). Frames
    /// whose latents are larger on either side are decoded in tiles.
    #[serde(default = "default_tile")]
    pub tile: usize,
    /// The share of a tile that overlaps its neighbour (diffusers: 0.25).
    #[serde(default = "default_overlap")]
    pub overlap: f64,
}

fn default_tile() -> usize {
    64
}

fn default_overlap() -> f64 {
    0.25
}

impl Default for TilePolicy {
    fn default() -> Self {
        Self { tile: default_tile(), overlap: default_overlap() }
    }
}

impl TilePolicy {
    /// Whether latents of this size are decoded in tiles.
    pub fn applies(&self, latent_height: usize, latent_width: usize) -> bool {
        latent_height > self.tile || latent_width > self.tile
    }

    /// Tile starts along one side of `len` latents (every `tile × (1 − overlap)`).
    fn starts(&self, len: usize) -> Vec<usize> {
        let stride = ((self.tile as f64 * (1.0 - self.overlap)) as usize).max(1);
        (0..len).step_by(stride).collect()
    }

    /// Decodes `latents` (each `[4, h, w]`) in tiles. `decode` takes the tiles' latents (one per
    /// frame, `[4, th, tw]`) and answers each frame's pixels of the tile, `[th·f, tw·f, 3]` on a
    /// 0..255 scale, not rounded; `factor` is the decoder's upscaling (8).
    pub fn decode(
        &self,
        latents: &[&[f32]],
        (latent_height, latent_width): (usize, usize),
        factor: usize,
        mut decode: impl FnMut(&[Vec<f32>], (usize, usize)) -> Result<Vec<Vec<f32>>, RenderError>,
    ) -> Result<Vec<Vec<u8>>, RenderError> {
        let channels = latents.first().map_or(0, |l| l.len() / (latent_height * latent_width).max(1));
        let tile_pixels = self.tile * factor;
        let blend = (tile_pixels as f64 * self.overlap) as usize;
        let limit = tile_pixels - blend;
        let (rows, columns) = (self.starts(latent_height), self.starts(latent_width));
        // tiles[row][column][frame]: the frame's pixels of that tile, and the tile's pixel size.
        let mut tiles: Vec<Vec<Tile>> = Vec::with_capacity(rows.len());
        for &top in &rows {
            let mut row = Vec::with_capacity(columns.len());
            for &left in &columns {
                let (th, tw) = ((latent_height - top).min(self.tile), (latent_width - left).min(self.tile));
                let cut: Vec<Vec<f32>> = latents
                    .iter()
                    .map(|latent| {
                        let mut out = Vec::with_capacity(channels * th * tw);
                        for c in 0..channels {
                            for y in top..top + th {
                                let at = (c * latent_height + y) * latent_width + left;
                                out.extend_from_slice(&latent[at..at + tw]);
                            }
                        }
                        out
                    })
                    .collect();
                let frames = decode(&cut, (th, tw))?;
                row.push(Tile { height: th * factor, width: tw * factor, frames });
            }
            tiles.push(row);
        }
        // Blend each tile with the one above and the one to its left (already blended: in
        // place, in order, as diffusers does), then crop.
        for i in 0..tiles.len() {
            for j in 0..tiles[i].len() {
                if i > 0 {
                    let (above, here) = tiles.split_at_mut(i);
                    blend_vertical(&above[i - 1][j], &mut here[0][j], blend);
                }
                if j > 0 {
                    let (left, here) = tiles[i].split_at_mut(j);
                    blend_horizontal(&left[j - 1], &mut here[0], blend);
                }
            }
        }
        let (height, width) = (latent_height * factor, latent_width * factor);
        let frames = latents.len();
        let mut out = vec![vec![0u8; height * width * 3]; frames];
        let mut y0 = 0;
        for row in &tiles {
            let mut x0 = 0;
            let mut row_height = 0;
            for tile in row {
                let (h, w) = (tile.height.min(limit), tile.width.min(limit));
                for (frame, pixels) in tile.frames.iter().enumerate() {
                    for y in 0..h {
                        let from = &pixels[y * tile.width * 3..][..w * 3];
                        let to = &mut out[frame][((y0 + y) * width + x0) * 3..][..w * 3];
                        for (byte, value) in to.iter_mut().zip(from) {
                            *byte = (value.clamp(0.0, 255.0) + 0.5) as u8;
                        }
                    }
                }
                x0 += w;
                row_height = h;
            }
            y0 += row_height;
        }
        Ok(out)
    }
}

struct Tile {
    height: usize,
    width: usize,
    /// Per frame, `[height, width, 3]`.
    frames: Vec<Vec<f32>>,
}

/// The top `extent` rows of `below` fade in from the bottom rows of `above`.
fn blend_vertical(above: &Tile, below: &mut Tile, extent: usize) {
    let extent = extent.min(above.height).min(below.height);
    let width = above.width.min(below.width);
    for (a, b) in above.frames.iter().zip(below.frames.iter_mut()) {
        for y in 0..extent {
            let t = y as f32 / extent as f32;
            let from = &a[(above.height - extent + y) * above.width * 3..][..width * 3];
            let to = &mut b[y * below.width * 3..][..width * 3];
            for (value, old) in to.iter_mut().zip(from) {
                *value = old * (1.0 - t) + *value * t;
            }
        }
    }
}

/// The left `extent` columns of `right` fade in from the right columns of `left`.
fn blend_horizontal(left: &Tile, right: &mut Tile, extent: usize) {
    let extent = extent.min(left.width).min(right.width);
    let height = left.height.min(right.height);
    for (a, b) in left.frames.iter().zip(right.frames.iter_mut()) {
        for y in 0..height {
            for x in 0..extent {
                let t = x as f32 / extent as f32;
                let from = (y * left.width + left.width - extent + x) * 3;
                let to = (y * right.width + x) * 3;
                for c in 0..3 {
                    b[to + c] = a[from + c] * (1.0 - t) + b[to + c] * t;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "decoder" whose every pixel depends on its latent alone (nearest upscaling): tiles
    /// agree on their overlap, so blending changes nothing and the tiled decode is the plain one.
    fn nearest(latents: &[Vec<f32>], (h, w): (usize, usize), factor: usize) -> Vec<Vec<f32>> {
        latents
            .iter()
            .map(|latent| {
                let mut out = Vec::with_capacity(h * w * factor * factor * 3);
                for y in 0..h * factor {
                    for x in 0..w * factor {
                        for c in 0..3 {
                            out.push(latent[(c * h + y / factor) * w + x / factor]);
                        }
                    }
                }
                out
            })
            .collect()
    }

    fn latents(frames: usize, h: usize, w: usize) -> Vec<Vec<f32>> {
        (0..frames).map(|f| (0..4 * h * w).map(|i| ((i * 37 + f * 11) % 256) as f32).collect()).collect()
    }

    #[test]
    fn a_decoder_without_context_decodes_the_same_in_tiles() {
        let policy = TilePolicy { tile: 8, overlap: 0.25 };
        // Sides that are and are not whole strides, and a frame not square.
        for (h, w) in [(8, 8), (17, 11), (24, 30), (9, 40)] {
            let all = latents(2, h, w);
            let views: Vec<&[f32]> = all.iter().map(Vec::as_slice).collect();
            let whole: Vec<Vec<u8>> = nearest(&all, (h, w), 4)
                .into_iter()
                .map(|pixels| pixels.iter().map(|v| (v + 0.5) as u8).collect())
                .collect();
            let mut calls = 0;
            let tiled = policy
                .decode(&views, (h, w), 4, |tile, size| {
                    calls += 1;
                    assert!(size.0 <= 8 && size.1 <= 8, "no tile is larger than the policy's: {size:?}");
                    Ok(nearest(tile, size, 4))
                })
                .unwrap();
            assert_eq!(tiled, whole, "{h}×{w}");
            assert_eq!(calls, policy.starts(h).len() * policy.starts(w).len());
        }
    }

    #[test]
    fn overlapping_tiles_fade_into_each_other() {
        // Each tile decodes to one flat value (its call's number × 100): the seam between two
        // tiles is a ramp, not a step.
        let policy = TilePolicy { tile: 8, overlap: 0.5 };
        let all = latents(1, 8, 12);
        let views: Vec<&[f32]> = all.iter().map(Vec::as_slice).collect();
        let mut call = 0.0;
        let out = policy
            .decode(&views, (8, 12), 1, |tile, (h, w)| {
                call += 1.0;
                Ok(tile.iter().map(|_| vec![call * 100.0; h * w * 3]).collect())
            })
            .unwrap();
        let row: Vec<u8> = out[0][..12 * 3].iter().step_by(3).copied().collect();
        // Tiles start at 0, 4 and 8; each keeps 4 columns; the second and third fade in over 4.
        assert_eq!(row, [100, 100, 100, 100, 100, 125, 150, 175, 200, 225, 250, 255]);
    }

    #[test]
    fn only_frames_larger_than_a_tile_are_tiled() {
        let policy = TilePolicy::default();
        assert!(!policy.applies(64, 64));
        assert!(policy.applies(135, 240), "1920×1080");
        assert!(policy.applies(64, 65));
    }
}

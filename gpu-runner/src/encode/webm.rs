//! WebM with VP9 (the system libvpx, through `vpx-encode`) in a Matroska container (libwebm,
//! through the `webm` crate).

use std::io::Cursor;
use vpx_encode::{Config, Encoder, VideoCodecId};
use webm::mux::{SegmentBuilder, SegmentMode, VideoCodecId as TrackCodec, Writer};

use super::{check_even, rgb_to_i420};
use crate::render::Frames;
use kiln_domain::OutputFormat;

/// Kilobits per second per pixel of a frame at 1 fps; 0.25 × 512 × 512 × 8 fps / 1000 ≈ 520 kbit/s.
const KBITS_PER_PIXEL_FRAME: f64 = 0.25 / 1000.0;

pub fn encode(frames: &Frames, fps: u32) -> Result<Vec<u8>, String> {
    check_even(OutputFormat::Webm, frames)?;
    let (width, height) = (frames.width, frames.height);
    let bitrate = (KBITS_PER_PIXEL_FRAME * f64::from(width * height) * f64::from(fps)) as u32;
    let mut encoder = Encoder::new(Config {
        width,
        height,
        timebase: [1, fps as i32],
        bitrate: bitrate.max(100),
        codec: VideoCodecId::VP9,
    })
    .map_err(|e| e.to_string())?;
    let nanos_per_frame = 1_000_000_000 / u64::from(fps);
    let mut packets: Vec<(Vec<u8>, i64, bool)> = Vec::with_capacity(frames.frames.len());
    for (index, rgb) in frames.frames.iter().enumerate() {
        let i420 = rgb_to_i420(rgb, width as usize, height as usize);
        for packet in encoder.encode(index as i64, &i420).map_err(|e| e.to_string())? {
            packets.push((packet.data.to_vec(), packet.pts, packet.key));
        }
    }
    let mut finish = encoder.finish().map_err(|e| e.to_string())?;
    while let Some(packet) = finish.next().map_err(|e| e.to_string())? {
        packets.push((packet.data.to_vec(), packet.pts, packet.key));
    }

    let writer = Writer::new(Cursor::new(Vec::new()));
    let builder = SegmentBuilder::new(writer).map_err(|e| format!("{e:?}"))?;
    let builder = builder.set_mode(SegmentMode::File).map_err(|e| format!("{e:?}"))?;
    let (builder, track) =
        builder.add_video_track(width, height, TrackCodec::VP9, None).map_err(|e| format!("{e:?}"))?;
    let mut segment = builder.build();
    for (data, pts, key) in &packets {
        segment.add_frame(track, data, *pts as u64 * nanos_per_frame, *key).map_err(|e| format!("{e:?}"))?;
    }
    let duration = frames.frames.len() as u64 * nanos_per_frame;
    let writer = segment.finalize(Some(duration)).map_err(|_| "finalizing the WebM segment failed".to_string())?;
    Ok(writer.into_inner().into_inner())
}

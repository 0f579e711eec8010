//! MP4 with H.264 (openh264, built from source) in an ISO BMFF container (the `mp4` crate).

use mp4::{AvcConfig, FourCC, MediaConfig, Mp4Config, Mp4Sample, Mp4Writer, TrackConfig, TrackType};
use openh264::{
    OpenH264API,
    encoder::{Encoder, EncoderConfig, FrameRate, FrameType, QpRange, RateControlMode},
    formats::{RgbSliceU8, YUVBuffer},
};
use std::io::Cursor;

use super::check_even;
use crate::render::Frames;
use kiln_domain::OutputFormat;

const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
/// Quantizer bounds: constant quality rather than a bitrate target (a bitrate target needs frame
/// skipping, and every rendered frame must reach the file).
const QP: (u8, u8) = (18, 28);
/// Track timescale units per frame.
const TICKS_PER_FRAME: u32 = 1000;

pub fn encode_mp4(frames: &Frames, fps: u32) -> Result<Vec<u8>, String> {
    check_even(OutputFormat::Mp4, frames)?;
    let (width, height) = (frames.width as usize, frames.height as usize);
    let config = EncoderConfig::new()
        .rate_control_mode(RateControlMode::Off)
        .qp(QpRange::new(QP.0, QP.1))
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .skip_frames(false);
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config).map_err(|e| e.to_string())?;
    let (mut sps, mut pps) = (None, None);
    let mut samples = Vec::with_capacity(frames.frames.len());
    let mut yuv = YUVBuffer::new(width, height);
    for rgb in &frames.frames {
        yuv.read_rgb8(RgbSliceU8::new(rgb, (width, height)));
        let stream = encoder.encode(&yuv).map_err(|e| e.to_string())?;
        let is_sync = matches!(stream.frame_type(), FrameType::IDR | FrameType::I);
        let mut sample = Vec::new();
        for nal in split_annex_b(&stream.to_vec()) {
            match nal[0] & 0x1f {
                NAL_SPS => sps = Some(nal.to_vec()),
                NAL_PPS => pps = Some(nal.to_vec()),
                _ => {
                    sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    sample.extend_from_slice(nal);
                }
            }
        }
        samples.push((sample, is_sync));
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err("the encoder produced no parameter sets".into());
    };
    let brand = |code: &[u8; 4]| FourCC::from(*code);
    let mp4_config = Mp4Config {
        major_brand: brand(b"isom"),
        minor_version: 512,
        compatible_brands: vec![brand(b"isom"), brand(b"iso2"), brand(b"avc1"), brand(b"mp41")],
        timescale: 1000,
    };
    let mut writer = Mp4Writer::write_start(Cursor::new(Vec::new()), &mp4_config).map_err(|e| e.to_string())?;
    writer
        .add_track(&TrackConfig {
            track_type: TrackType::Video,
            timescale: fps * TICKS_PER_FRAME,
            language: "und".into(),
            media_conf: MediaConfig::AvcConfig(AvcConfig {
                width: width as u16,
                height: height as u16,
                seq_param_set: sps,
                pic_param_set: pps,
            }),
        })
        .map_err(|e| e.to_string())?;
    for (index, (bytes, is_sync)) in samples.into_iter().enumerate() {
        let sample = Mp4Sample {
            start_time: index as u64 * u64::from(TICKS_PER_FRAME),
            duration: TICKS_PER_FRAME,
            rendering_offset: 0,
            is_sync,
            bytes: bytes.into(),
        };
        writer.write_sample(1, &sample).map_err(|e| e.to_string())?;
    }
    writer.write_end().map_err(|e| e.to_string())?;
    Ok(writer.into_writer().into_inner())
}

/// The NAL units of an Annex B stream (start codes removed).
pub fn split_annex_b(stream: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(n, &start)| {
            let mut end = starts.get(n + 1).map_or(stream.len(), |next| next - 3);
            // A four-byte start code leaves a zero before the next unit.
            while end > start && stream[end - 1] == 0 && n + 1 < starts.len() {
                end -= 1;
            }
            &stream[start..end]
        })
        .filter(|nal| !nal.is_empty())
        .collect()
}

/// Turns an MP4 sample (length-prefixed NAL units) back into Annex B, with the parameter sets in
/// front, as a decoder expects. For tests and tools that decode what was written.
pub fn avcc_to_annex_b(sample: &[u8], parameter_sets: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(sample.len() + 64);
    for set in parameter_sets {
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(set);
    }
    let mut rest = sample;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(nal) = rest.get(4..4 + len) else { break };
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(nal);
        rest = &rest[4 + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annex_b_splits_on_three_and_four_byte_start_codes() {
        let stream = [0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5, 0];
        let nals = split_annex_b(&stream);
        assert_eq!(nals, vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5, 0][..]]);
    }
}

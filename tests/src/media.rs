//! Decoding what the runner wrote, to check it is a valid file of the asked size and length.
//! PNG, GIF and H.264 are decoded frame by frame; WebM is demuxed and each VP9 frame's header
//! is read (size from the key frame), without a full VP9 decode.

use std::io::Cursor;

/// What a file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub width: u32,
    pub height: u32,
    pub frames: usize,
}

/// Probes `bytes` as `format` (png, gif, mp4 or webm).
pub fn probe(format: &str, bytes: &[u8]) -> Result<Probe, String> {
    match format {
        "png" => png(bytes),
        "gif" => gif(bytes),
        "mp4" => mp4(bytes),
        "webm" => webm(bytes),
        other => Err(format!("no prober for {other}")),
    }
}

fn png(bytes: &[u8]) -> Result<Probe, String> {
    let mut reader = png::Decoder::new(Cursor::new(bytes)).read_info().map_err(|e| e.to_string())?;
    let mut buffer = vec![0; reader.output_buffer_size().ok_or("no buffer size")?];
    let info = reader.next_frame(&mut buffer).map_err(|e| e.to_string())?;
    Ok(Probe { width: info.width, height: info.height, frames: 1 })
}

fn gif(bytes: &[u8]) -> Result<Probe, String> {
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::RGBA);
    let mut decoder = options.read_info(Cursor::new(bytes)).map_err(|e| e.to_string())?;
    let (width, height) = (u32::from(decoder.width()), u32::from(decoder.height()));
    let mut frames = 0;
    while let Some(frame) = decoder.read_next_frame().map_err(|e| e.to_string())? {
        if (u32::from(frame.width), u32::from(frame.height)) != (width, height) {
            return Err(format!("frame {frames} is {}x{}", frame.width, frame.height));
        }
        frames += 1;
    }
    Ok(Probe { width, height, frames })
}

fn mp4(bytes: &[u8]) -> Result<Probe, String> {
    let mut reader = mp4::Mp4Reader::read_header(Cursor::new(bytes), bytes.len() as u64).map_err(|e| e.to_string())?;
    let track =
        reader.tracks().values().find(|t| t.media_type().ok() == Some(mp4::MediaType::H264)).ok_or("no H.264 track")?;
    let (id, samples) = (track.track_id(), track.sample_count());
    let (width, height) = (u32::from(track.width()), u32::from(track.height()));
    let avc = track.trak.mdia.minf.stbl.stsd.avc1.as_ref().ok_or("no avc1 box")?;
    let sps = avc.avcc.sequence_parameter_sets.first().ok_or("no SPS")?.bytes.clone();
    let pps = avc.avcc.picture_parameter_sets.first().ok_or("no PPS")?.bytes.clone();
    let mut decoder = openh264::decoder::Decoder::new().map_err(|e| e.to_string())?;
    let mut frames = 0;
    for index in 1..=samples {
        let sample = reader.read_sample(id, index).map_err(|e| e.to_string())?.ok_or("missing sample")?;
        let annex_b = kiln_runner::encode::avcc_to_annex_b(&sample.bytes, &[&sps, &pps]);
        if let Some(image) = decoder.decode(&annex_b).map_err(|e| format!("sample {index}: {e}"))? {
            use openh264::formats::YUVSource;
            let (w, h) = image.dimensions();
            if (w as u32, h as u32) != (width, height) {
                return Err(format!("frame {frames} decodes to {w}x{h}"));
            }
            frames += 1;
        }
    }
    frames += decoder.flush_remaining().map_err(|e| e.to_string())?.len();
    Ok(Probe { width, height, frames })
}

fn webm(bytes: &[u8]) -> Result<Probe, String> {
    let mut file = matroska_demuxer::MatroskaFile::open(Cursor::new(bytes)).map_err(|e| e.to_string())?;
    let track = file.tracks().first().ok_or("no track")?;
    if track.codec_id() != "V_VP9" {
        return Err(format!("codec {}", track.codec_id()));
    }
    let video = track.video().ok_or("not a video track")?;
    let (width, height) = (video.pixel_width().get() as u32, video.pixel_height().get() as u32);
    let mut frame = matroska_demuxer::Frame::default();
    let mut frames = 0;
    while file.next_frame(&mut frame).map_err(|e| e.to_string())? {
        if frames == 0 {
            let size = vp9_key_frame_size(&frame.data).ok_or("the first frame is not a VP9 key frame")?;
            if size != (width, height) {
                return Err(format!("the key frame is {}x{}, the track says {width}x{height}", size.0, size.1));
            }
        } else if frame.data.first().is_none_or(|b| b >> 6 != 0b10) {
            return Err(format!("frame {frames} has no VP9 frame marker"));
        }
        frames += 1;
    }
    Ok(Probe { width, height, frames })
}

/// The frame size in a VP9 profile-0 key frame's uncompressed header.
fn vp9_key_frame_size(data: &[u8]) -> Option<(u32, u32)> {
    let bit = |n: usize| -> Option<u32> { Some(u32::from(data.get(n / 8)? >> (7 - n % 8) & 1)) };
    let bits = |from: usize, count: usize| -> Option<u32> {
        (from..from + count).try_fold(0, |acc, n| Some(acc << 1 | bit(n)?))
    };
    // frame_marker(2)=2, profile_low, profile_high (0 for profile 0), show_existing_frame,
    // frame_type (0 = key), show_frame, error_resilient_mode.
    if bits(0, 2)? != 2 || bits(2, 2)? != 0 || bit(4)? != 0 || bit(5)? != 0 {
        return None;
    }
    if bits(8, 24)? != 0x49_83_42 {
        return None;
    }
    // color_config for profile 0: color_space(3), and color_range(1) unless sRGB.
    let color_space = bits(32, 3)?;
    let at = if color_space == 7 { 35 } else { 36 };
    Some((bits(at, 16)? + 1, bits(at + 16, 16)? + 1))
}

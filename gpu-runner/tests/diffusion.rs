//! The latent-diffusion pipeline on the tiny SD-shaped models (random weights, built by
//! `gpu-runner/sd/build_sd.py`), held against the numpy/onnxruntime reference
//! `gpu-runner/sd/reference.py` run on the same files.
//!
//! Tolerance: every channel of every pixel within [`TOLERANCE`] of the reference (of 255), and at
//! most 1% of them differ at all (10% for fp16 graphs, whose inputs are rounded to f16 on both
//! sides). Measured: fp32 cases are byte-identical; the fp16 case differs by 1 in 4.1% of values. Both sides run the same ONNX Runtime build on the CPU; what
//! differs is ours: batching (ONNX Runtime may sum in another order for another batch size) and
//! f64 scheduler arithmetic written twice.

use kiln_domain::{ModelSpec, Submission, WebhookPolicy};
use kiln_local::{Tools, ensure_tools, workspace_root};
use kiln_runner::{
    packages,
    render::{
        Frames, Pipeline, RenderControl, RenderError, RenderRequest, StopReason, diffusion::tokenizer::PromptTokenizer,
        runtime::SessionOptions,
    },
};
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

const TOLERANCE: u8 = 2;

fn tools() -> Tools {
    ensure_tools(&workspace_root()).expect("tools")
}

fn package() -> PathBuf {
    workspace_root().join("gpu-runner/models/kiln-tiny-sd")
}

fn fp16_package() -> PathBuf {
    workspace_root().join("gpu-runner/tests/fixtures/kiln-tiny-sd-fp16")
}

/// A fresh path under cargo's scratch directory for integration tests.
fn scratch(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffusion-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    path
}

/// A copy of the tiny package whose scheduler config is `config` (model files linked, not copied).
fn with_scheduler(config: &str) -> PathBuf {
    let copy = scratch("package");
    std::fs::create_dir_all(copy.join("scheduler")).unwrap();
    for entry in std::fs::read_dir(package()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "scheduler" {
            std::os::unix::fs::symlink(entry.path(), copy.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(copy.join("scheduler/scheduler_config.json"), config).unwrap();
    copy
}

fn load(dir: &Path) -> Box<dyn Pipeline> {
    let options = SessionOptions { intra_threads: 1, ..SessionOptions::cpu(tools().ort_dylib) };
    let spec = ModelSpec::read_manifest(dir).unwrap();
    packages::load(dir, spec, &options).expect("loading the package").pipeline
}

fn request(dir: &Path, body: &str) -> RenderRequest {
    let model = ModelSpec::read_manifest(dir).unwrap();
    let params =
        Submission::parse(body.as_bytes()).unwrap().resolve(&model, WebhookPolicy::default(), || 0).unwrap().params;
    RenderRequest { params, control: Arc::new(RenderControl::default()), init_image: None }
}

/// The reference's frames for the same job, as raw RGB.
fn reference(dir: &Path, request: &RenderRequest) -> Vec<u8> {
    let p = &request.params;
    let out = scratch("frames.rgb");
    let status = Command::new(tools().python)
        .arg(workspace_root().join("gpu-runner/sd/reference.py"))
        .arg("--package")
        .arg(dir)
        .args(["--prompt", &p.prompt, "--negative", &p.negative_prompt])
        .args(["--seed", &p.seed.to_string(), "--steps", &p.steps.to_string()])
        .args(["--guidance", &p.guidance.to_string(), "--frames", &p.num_frames.to_string()])
        .args(["--width", &p.width.to_string(), "--height", &p.height.to_string()])
        .arg("--out")
        .arg(&out)
        .status()
        .expect("running reference.py");
    assert!(status.success(), "reference.py failed");
    let frames = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    frames
}

fn assert_matches_reference(dir: &Path, body: &str) {
    assert_near_reference(dir, body, 1);
}

fn assert_near_reference(dir: &Path, body: &str, percent_differing: usize) {
    let request = request(dir, body);
    let frames = load(dir).render(&request).expect("render");
    let ours: Vec<u8> = frames.frames.concat();
    let theirs = reference(dir, &request);
    assert_eq!(ours.len(), theirs.len(), "{body}: frame bytes");
    let worst = ours.iter().zip(&theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
    eprintln!("{body}: max |Δ| {worst}, {differing} of {} values differ", ours.len());
    assert!(worst <= TOLERANCE, "{body}: a value differs by {worst} from the reference");
    assert!(differing * 100 <= ours.len() * percent_differing, "{body}: {differing} of {} values differ", ours.len());
    // The picture is not flat: a pipeline that returned a constant would match nothing.
    let mean = ours.iter().map(|v| f64::from(*v)).sum::<f64>() / ours.len() as f64;
    let spread = ours.iter().map(|v| (f64::from(*v) - mean).abs()).sum::<f64>() / ours.len() as f64;
    assert!(spread > 5.0, "{body}: the image is nearly flat (mean deviation {spread})");
}

#[test]
fn the_tokenizer_matches_clips_algorithm() {
    let dir = package();
    let tokenizer = PromptTokenizer::load(&dir.join("tokenizer")).unwrap();
    let long = "a lighthouse on a rocky coast at dusk, ".repeat(12);
    for text in ["a photo of a cat", "A  Lighthouse,\tat DUSK!!", "it's 42 o'clock: café déjà-vu", "", &long] {
        let output = Command::new(tools().python)
            .arg(workspace_root().join("gpu-runner/sd/reference.py"))
            .arg("--package")
            .arg(&dir)
            .args(["--tokens", text])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let expected: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let ours = tokenizer.encode(text).unwrap();
        assert_eq!(serde_json::json!(ours.ids), expected["ids"], "{text:?}");
        assert_eq!(serde_json::json!(ours.truncated), expected["truncated"], "{text:?}");
    }
    assert!(tokenizer.encode(&long).unwrap().truncated > 0, "the long prompt is cut");
}

#[test]
fn euler_with_guidance_matches_the_reference() {
    assert_matches_reference(
        &package(),
        r#"{"model":"kiln-tiny-sd","prompt":"a lighthouse at dusk","negative_prompt":"blurry","width":64,"height":64,"steps":4,"guidance":7.5,"seed":7}"#,
    );
}

#[test]
fn fp16_graphs_match_the_reference() {
    assert_near_reference(
        &fp16_package(),
        r#"{"model":"kiln-tiny-sd-fp16","prompt":"a red car","width":64,"height":96,"steps":3,"guidance":5.0,"seed":11}"#,
        10,
    );
}

#[test]
fn euler_ancestral_and_lcm_match_the_reference() {
    let base = r#""num_train_timesteps":1000,"beta_start":0.00085,"beta_end":0.012,"beta_schedule":"scaled_linear""#;
    let euler_a = with_scheduler(&format!(
        r#"{{"_class_name":"EulerAncestralDiscreteScheduler",{base},"timestep_spacing":"trailing"}}"#
    ));
    assert_matches_reference(
        &euler_a,
        r#"{"model":"kiln-tiny-sd","prompt":"a castle","width":64,"height":64,"steps":3,"guidance":0.0,"seed":5}"#,
    );
    let lcm = with_scheduler(&format!(r#"{{"_class_name":"LCMScheduler",{base},"original_inference_steps":50}}"#));
    assert_matches_reference(
        &lcm,
        r#"{"model":"kiln-tiny-sd","prompt":"a castle","width":64,"height":64,"steps":4,"guidance":1.0,"seed":5}"#,
    );
}

#[test]
fn a_video_is_a_smooth_seeded_latent_walk() {
    let dir = package();
    let body = |seed: u32| {
        format!(
            r#"{{"model":"kiln-tiny-sd","prompt":"waves","width":64,"height":64,"steps":2,"guidance":3.0,"num_frames":10,"fps":8,"format":"gif","seed":{seed}}}"#
        )
    };
    let request = request(&dir, &body(3));
    let mut pipeline = load(&dir);
    let video = pipeline.render(&request).unwrap();
    assert_eq!(video.frames.len(), 10);
    // Frame 0 is the image the same seed gives.
    let image = pipeline
        .render(&self::request(&dir, &body(3).replace(r#""num_frames":10,"fps":8,"format":"gif","#, "")))
        .unwrap();
    let distance =
        |a: &[u8], b: &[u8]| a.iter().zip(b).map(|(x, y)| f64::from(x.abs_diff(*y))).sum::<f64>() / a.len() as f64;
    assert!(distance(&video.frames[0], &image.frames[0]) < 0.5, "frame 0 is the seed's image");
    let other = pipeline.render(&self::request(&dir, &body(4))).unwrap();
    let apart = distance(&video.frames[0], &other.frames[0]);
    for pair in video.frames.windows(2) {
        let step = distance(&pair[0], &pair[1]);
        assert!(step > 0.0, "the frames move");
        assert!(step < apart / 2.0, "consecutive frames ({step}) are far closer than two seeds ({apart})");
    }
    // Across the keyframe at frame 8 too, and the whole walk matches the reference.
    let theirs = reference(&dir, &request);
    let ours = video.frames.concat();
    assert!(ours.iter().zip(&theirs).all(|(a, b)| a.abs_diff(*b) <= TOLERANCE), "video matches the reference");
}

#[test]
fn jobs_batched_together_render_as_alone_and_a_cancel_leaves_the_others() {
    let dir = package();
    let a = r#"{"model":"kiln-tiny-sd","prompt":"a forest","width":64,"height":64,"steps":3,"guidance":6.0,"seed":1}"#;
    let b = r#"{"model":"kiln-tiny-sd","prompt":"a desert","negative_prompt":"dark","width":64,"height":64,"steps":3,"guidance":8.0,"seed":2,"num_frames":2,"fps":4,"format":"gif"}"#;
    let mut pipeline = load(&dir);
    let alone: Vec<Frames> = [a, b].iter().map(|body| pipeline.render(&request(&dir, body)).unwrap()).collect();
    let batch = [request(&dir, a), request(&dir, b)];
    let together = pipeline.render_batch(&batch);
    for (single, joint) in alone.iter().zip(&together) {
        let joint = joint.as_ref().unwrap();
        assert_eq!(single.frames.len(), joint.frames.len());
        let worst = single.frames.concat().iter().zip(joint.frames.concat()).map(|(x, y)| x.abs_diff(y)).max();
        assert!(worst <= Some(TOLERANCE), "batched render differs by {worst:?}");
    }
    assert_eq!(batch[0].control.progress(), 1.0);

    let batch = [request(&dir, a), request(&dir, b)];
    batch[1].control.stop(StopReason::Canceled);
    let results = pipeline.render_batch(&batch);
    assert!(matches!(results[1], Err(RenderError::Stopped(StopReason::Canceled))), "{:?}", results[1]);
    let survivor = results[0].as_ref().unwrap().frames.concat();
    assert!(survivor.iter().zip(alone[0].frames.concat()).all(|(x, y)| x.abs_diff(y) <= TOLERANCE));
}

#[test]
fn a_long_prompt_is_rendered_and_its_truncation_reported() {
    let dir = package();
    let prompt = "a lighthouse on a rocky coast at dusk ".repeat(12);
    let body = format!(r#"{{"model":"kiln-tiny-sd","prompt":"{prompt}","width":64,"height":64,"steps":1}}"#);
    let frames = load(&dir).render(&request(&dir, &body)).unwrap();
    assert_eq!(frames.notes.len(), 1, "{:?}", frames.notes);
    assert!(frames.notes[0].contains("prompt truncated"), "{:?}", frames.notes);
    let short = load(&dir)
        .render(&request(&dir, r#"{"model":"kiln-tiny-sd","prompt":"a lighthouse","width":64,"height":64,"steps":1}"#));
    assert!(short.unwrap().notes.is_empty());
}

/// A copy of the tiny package whose manifest has `key` set to `value` (model files linked).
fn with_manifest(key: &str, value: serde_json::Value) -> PathBuf {
    let copy = scratch("package");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(package()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "manifest.json" {
            std::os::unix::fs::symlink(entry.path(), copy.join(entry.file_name())).unwrap();
        }
    }
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(package().join("manifest.json")).unwrap()).unwrap();
    manifest[key] = value;
    std::fs::write(copy.join("manifest.json"), manifest.to_string()).unwrap();
    copy
}

/// The same job decoded whole and in tiles of 128×128 pixels (16 latents, a quarter
/// overlapping): the two agree within the blend's error. Tiles do not see their neighbours, so
/// pixels near a tile's edge differ; the blend spreads that over the overlap. Measured on the
/// tiny package (256×256: 3 × 3 tiles): mean |Δ| 3.43 of 255, 7.5% of values off by more than 8
/// (with tiles of 8 latents, 7.23 and 30.9%: the tiny VAE's 4 levels see far relative to a
/// tile; SD's tiles are 64 latents).
#[test]
fn a_tiled_decode_agrees_with_a_whole_one() {
    let body = r#"{"model":"kiln-tiny-sd","prompt":"a harbour at night","width":256,"height":256,"steps":3,"seed":4}"#;
    let whole = load(&package()).render(&request(&package(), body)).expect("whole");
    let tiled_package = with_manifest("vae_tiling", serde_json::json!({"tile": 16, "overlap": 0.25}));
    let tiled = load(&tiled_package).render(&request(&tiled_package, body)).expect("tiled");
    let (a, b) = (whole.frames.concat(), tiled.frames.concat());
    assert_eq!(a.len(), b.len());
    let mean = a.iter().zip(&b).map(|(x, y)| f64::from(x.abs_diff(*y))).sum::<f64>() / a.len() as f64;
    let far = a.iter().zip(&b).filter(|(x, y)| x.abs_diff(**y) > 8).count() as f64 / a.len() as f64;
    eprintln!("tiled vs whole: mean |Δ| {mean:.2}, {:.1}% of values off by more than 8", far * 100.0);
    assert!(a != b, "the tiled package decoded in tiles");
    assert!(
        mean <= 5.0 && far <= 0.12,
        "tiled and whole decodes differ: mean |Δ| {mean:.2}, {far:.3} off by more than 8"
    );
}

/// Image-to-image against diffusers' `StableDiffusionImg2ImgPipeline` on the same weights, from
/// the same image latents and noise (`gpu-runner/sd/reference_img2img.py`, recorded in
/// `tests/fixtures/img2img`): the last `strength × steps` steps from the image noised to match.
#[test]
fn image_to_image_matches_diffusers_img2img_pipeline() {
    let fixtures = workspace_root().join("gpu-runner/tests/fixtures/img2img");
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("case.json")).unwrap()).unwrap();
    let bytes = std::fs::read(fixtures.join("input.png")).unwrap();
    let image = kiln_domain::image::inspect("images/t/img_01KBWJ5N0000000000000000AA.png", &bytes).unwrap();
    let body = serde_json::json!({
        "model": "kiln-tiny-sd", "prompt": case["prompt"], "width": case["width"], "height": case["height"],
        "steps": case["steps"], "strength": case["strength"], "guidance": case["guidance"], "seed": case["seed"],
        "init_image": "img_01KBWJ5N0000000000000000AA.png",
    });
    let model = ModelSpec::read_manifest(&package()).unwrap();
    let params = Submission::parse(body.to_string().as_bytes())
        .unwrap()
        .resolve_with_image(&model, WebhookPolicy::default(), || 0, Some(image))
        .unwrap()
        .params;
    let fitted = kiln_runner::render::input::fit(&bytes, params.width, params.height).unwrap();
    let request = RenderRequest { params, control: Arc::new(RenderControl::default()), init_image: Some(fitted) };
    let ours = load(&package()).render(&request).expect("render").frames.concat();
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(fixtures.join("output.png")).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut theirs = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut theirs).unwrap();
    theirs.truncate(info.buffer_size());
    assert_eq!(ours.len(), theirs.len());
    let worst = ours.iter().zip(&theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
    eprintln!("img2img: max |Δ| {worst}, {differing} of {} values differ", ours.len());
    assert!(worst <= TOLERANCE && differing * 100 <= ours.len(), "img2img: max |Δ| {worst}, {differing} differ");
    // The image mattered: the same job from noise is another picture.
    let mut from_noise = request.clone();
    from_noise.init_image = None;
    from_noise.params.init_image = None;
    from_noise.params.strength = None;
    let plain = load(&package()).render(&from_noise).expect("render").frames.concat();
    let apart = plain.iter().zip(&ours).map(|(a, b)| f64::from(a.abs_diff(*b))).sum::<f64>() / ours.len() as f64;
    assert!(apart > 5.0, "the init image changed nothing: mean |Δ| {apart:.2}");
}

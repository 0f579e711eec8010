//! The demo model's pipeline on ONNX Runtime (CPU), without the service around it.

use kiln_domain::{ModelSpec, Submission, WebhookPolicy};
use kiln_local::{ensure_tools, workspace_root};
use kiln_runner::{
    packages,
    render::{Frames, RenderControl, RenderError, RenderRequest, StopReason, runtime::SessionOptions},
};
use std::sync::Arc;

fn options() -> SessionOptions {
    let tools = ensure_tools(&workspace_root()).expect("tools");
    SessionOptions { intra_threads: 1, ..SessionOptions::cpu(tools.ort_dylib) }
}

fn request(body: &str) -> RenderRequest {
    let dir = workspace_root().join("gpu-runner/models/kiln-demo");
    let model = ModelSpec::read_manifest(&dir).unwrap();
    let params =
        Submission::parse(body.as_bytes()).unwrap().resolve(&model, WebhookPolicy::default(), || 0).unwrap().params;
    RenderRequest { params, control: Arc::new(RenderControl::default()), init_image: None }
}

fn render(body: &str) -> Result<Frames, RenderError> {
    let dir = workspace_root().join("gpu-runner/models/kiln-demo");
    let spec = ModelSpec::read_manifest(&dir).unwrap();
    let mut model = packages::load(&dir, spec, &options()).expect("loading the demo model");
    model.pipeline.render(&request(body))
}

#[test]
fn the_demo_model_draws_a_picture_not_noise() {
    let frames =
        render(r#"{"model":"kiln-demo","prompt":"a calm lake","width":96,"height":64,"seed":3,"steps":3}"#).unwrap();
    assert_eq!((frames.width, frames.height, frames.frames.len()), (96, 64, 1));
    let pixels = &frames.frames[0];
    assert_eq!(pixels.len(), 96 * 64 * 3);
    // Neighbouring pixels of a picture are alike; of uniform noise they differ by ~85 on average.
    let row = 96 * 3;
    let mean_step: f64 =
        (0..pixels.len() - row).map(|i| (pixels[i] as f64 - pixels[i + row] as f64).abs()).sum::<f64>()
            / (pixels.len() - row) as f64;
    assert!(mean_step < 12.0, "mean vertical difference {mean_step}: looks like noise");
}

#[test]
fn same_seed_same_frames_and_the_seed_matters() {
    let body = |seed: u32| {
        format!(
            r#"{{"model":"kiln-demo","prompt":"dunes","width":64,"height":64,"num_frames":3,"fps":3,"format":"gif","seed":{seed}}}"#
        )
    };
    let first = render(&body(9)).unwrap();
    assert_eq!(first, render(&body(9)).unwrap());
    assert_ne!(first, render(&body(10)).unwrap());
    assert_ne!(first.frames[0], first.frames[1], "the frames of a video move");
}

#[test]
fn a_stop_request_ends_the_render_between_steps() {
    let dir = workspace_root().join("gpu-runner/models/kiln-demo");
    let spec = ModelSpec::read_manifest(&dir).unwrap();
    let mut model = packages::load(&dir, spec, &options()).unwrap();
    let request = request(r#"{"model":"kiln-demo","prompt":"x","width":64,"height":64,"steps":10}"#);
    request.control.stop(StopReason::Canceled);
    let stopped = model.pipeline.render(&request);
    assert!(matches!(stopped, Err(RenderError::Stopped(StopReason::Canceled))), "{stopped:?}");
    assert_eq!(request.control.progress(), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_warm_up_renders_every_served_model_through_its_session() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        runner: kiln_runner::RunnerConfig,
    }
    let tools = ensure_tools(&workspace_root()).expect("tools");
    let models_dir = workspace_root().join("gpu-runner/models");
    let cli = Cli::parse_from([
        "runner".as_ref(),
        "--ort-dylib".as_ref(),
        tools.ort_dylib.as_os_str(),
        "--models-dir".as_ref(),
        models_dir.as_os_str(),
    ]);
    assert!(cli.runner.warm_up, "on unless asked otherwise");
    let metrics = Arc::new(kiln_runner::Metrics::default());
    let (models, sessions, _threads) = kiln_runner::start_sessions(&cli.runner, &metrics).expect("loading models");
    let warmed = kiln_runner::warm_up(&models, &sessions).await.expect("warm-up");
    let names: Vec<_> = warmed.iter().map(|w| (w.model.as_str(), w.version.as_str())).collect();
    let served: Vec<_> = models.iter().map(|m| (m.name.as_str(), m.version.as_str())).collect();
    assert_eq!(names, served, "one warm-up per served model");
    assert!(served.len() >= 2, "the repository serves the demo and the tiny SD model: {served:?}");
    for w in &warmed {
        assert!(w.render_time > std::time::Duration::ZERO && w.elapsed >= w.render_time, "{w:?}");
    }

    // A model without a session (here: one the sessions were not started for) is an error, not a skip.
    let mut unknown = models[0].clone();
    unknown.version = "0.0.0-not-loaded".into();
    let err = kiln_runner::warm_up(&[unknown], &sessions).await.unwrap_err();
    assert!(err.to_string().contains("no render session"), "{err}");
}

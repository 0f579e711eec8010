//! `gpu-runner/sd/prepare_sd.py` on the tiny packages, on the CPU: ONNX Runtime's Stable
//! Diffusion recipe fuses what it should into the CUDA graphs, the manifest names them, and the
//! CPU keeps rendering the plain graphs, byte for byte as before. The step graphs (a whole
//! denoising step, and the decoder to RGB bytes, so latents stay on the device) are held to the
//! host loop on the CPU, where both can run. (That the prepared graphs render on CUDA within
//! fp16 tolerance of the plain ones is checked on the GPU machine: `gpu-runner/sd/gpu-prepare.sh`,
//! BENCHMARKS.md.)

use kiln_domain::{ModelSpec, Submission, WebhookPolicy};
use kiln_local::{Tools, ensure_tools, workspace_root};
use kiln_runner::{
    packages,
    render::{GraphRuns, RenderControl, RenderRequest, runtime::SessionOptions},
};
use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

fn tools() -> Tools {
    ensure_tools(&workspace_root()).expect("tools")
}

fn scratch(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("prepare-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    path
}

/// Prepares `package` into `out` (`extra` arguments after); returns the tool's report.
fn prepare(package: &Path, out: &Path, extra: &[&str]) -> Value {
    let output = Command::new(tools().python)
        .arg(workspace_root().join("gpu-runner/sd/prepare_sd.py"))
        .arg("--package")
        .arg(package)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("running prepare_sd.py");
    assert!(output.status.success(), "prepare_sd.py failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("prepare_sd.py prints its report as JSON")
}

fn fused(report: &Value, component: &str, op: &str) -> u64 {
    report[component]["fused"][op].as_u64().unwrap_or(0)
}

fn render_on_cpu(dir: &Path, body: &str) -> Vec<u8> {
    render_batch_on_cpu(dir, &[body]).concat()
}

/// The jobs `bodies` rendered together on the CPU; each job's frames, concatenated.
fn render_batch_on_cpu(dir: &Path, bodies: &[&str]) -> Vec<Vec<u8>> {
    let (mut rendered, _) = render_batches_on_cpu(dir, &[bodies], 0);
    rendered.remove(0)
}

/// Batches of jobs rendered one after another by one pipeline on the CPU, with `cuda_graphs`
/// fixed-buffer graph shapes (the path CUDA graphs take; nothing is captured on the CPU): each
/// batch's jobs' frames, and the pipeline's graph runs.
fn render_batches_on_cpu(dir: &Path, batches: &[&[&str]], cuda_graphs: usize) -> (Vec<Vec<Vec<u8>>>, GraphRuns) {
    let mut options = SessionOptions { intra_threads: 1, ..SessionOptions::cpu(tools().ort_dylib) };
    options.diffusion.cuda_graphs = cuda_graphs;
    let spec = ModelSpec::read_manifest(dir).unwrap();
    let request = |body: &&str| {
        let params =
            Submission::parse(body.as_bytes()).unwrap().resolve(&spec, WebhookPolicy::default(), || 0).unwrap().params;
        RenderRequest { params, control: Arc::new(RenderControl::default()), init_image: None }
    };
    let mut pipeline = packages::load(dir, spec.clone(), &options).expect("loading the package").pipeline;
    let rendered = batches
        .iter()
        .map(|bodies| {
            let requests: Vec<RenderRequest> = bodies.iter().map(request).collect();
            pipeline.render_batch(&requests).into_iter().map(|frames| frames.expect("render").frames.concat()).collect()
        })
        .collect();
    (rendered, pipeline.take_graph_runs())
}

/// The largest difference between two renders, and how many values differ.
fn difference(ours: &[u8], theirs: &[u8]) -> (u8, usize) {
    assert_eq!(ours.len(), theirs.len());
    let worst = ours.iter().zip(theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
    (worst, ours.iter().zip(theirs).filter(|(a, b)| a != b).count())
}

/// A copy of `dir` whose scheduler is `class` (model files linked, not copied).
fn with_scheduler(dir: &Path, class: &str, name: &str) -> PathBuf {
    let copy = scratch(name);
    std::fs::create_dir_all(copy.join("scheduler")).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "scheduler" {
            std::os::unix::fs::symlink(entry.path(), copy.join(entry.file_name())).unwrap();
        }
    }
    let config = std::fs::read_to_string(dir.join("scheduler/scheduler_config.json")).unwrap();
    let mut config: Value = serde_json::from_str(&config).unwrap();
    config["_class_name"] = class.into();
    std::fs::write(copy.join("scheduler/scheduler_config.json"), config.to_string()).unwrap();
    copy
}

#[test]
fn preparing_fuses_the_cuda_graphs_and_leaves_the_cpu_its_plain_ones() {
    let plain = workspace_root().join("gpu-runner/models/kiln-tiny-sd");
    let prepared = scratch("kiln-tiny-sd");
    let report = prepare(&plain, &prepared, &[]);
    eprintln!("{report:#}");

    // The UNet's attention and convolutions, the VAE's convolutions, the text encoder's norms.
    for (component, op) in [
        ("unet", "MultiHeadAttention"),
        ("unet", "NhwcConv"),
        ("vae_decoder", "NhwcConv"),
        ("text_encoder", "SkipLayerNormalization"),
    ] {
        assert!(fused(&report, component, op) > 0, "{component}: no {op} fused: {report}");
    }
    // The tiny UNet's GEGLU (hidden size 256) is one ONNX Runtime's CUDA BiasSplitGelu kernel
    // refuses at run time (seen on the H100): left unfused, and said. (SD-1.5's 2560-10240 fuse.)
    assert_eq!(fused(&report, "unet", "BiasSplitGelu"), 0, "{report}");
    let note = report["unet"]["bias split gelu left unfused"].as_str().unwrap_or_default();
    assert!(note.contains("[256]"), "{report}");
    // The tiny model's group norms (32 channels in 32 groups) are ones ONNX Runtime's CUDA
    // GroupNorm kernel refuses at run time (seen on the H100): they stay unfused, and say so.
    // (SD-1.5's are fused: BENCHMARKS.md.)
    for component in ["unet", "vae_decoder"] {
        assert_eq!(fused(&report, component, "GroupNorm") + fused(&report, component, "SkipGroupNorm"), 0);
        let note = report[component]["group norm left unfused"].as_str().unwrap_or_default();
        assert!(note.contains("[1"), "{component}: {report}");
    }
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(prepared.join("manifest.json")).unwrap()).unwrap();
    for component in ["unet", "vae_decoder", "text_encoder"] {
        let file = manifest["graphs"]["cuda"][component].as_str().expect("the manifest names the CUDA graph");
        assert_eq!(file, format!("{component}/model.cuda.onnx"));
        assert!(prepared.join(file).is_file());
        assert!(prepared.join(component).join("model.onnx").is_file(), "{component}: the plain graph is kept");
    }
    assert!(manifest["graphs"].get("cpu").is_none(), "the CPU keeps the plain graphs");
    assert_eq!(ModelSpec::read_manifest(&prepared).unwrap(), ModelSpec::read_manifest(&plain).unwrap());

    let job = r#"{"model":"kiln-tiny-sd","prompt":"a red car","width":64,"height":64,"steps":3,"seed":5}"#;
    assert_eq!(render_on_cpu(&prepared, job), render_on_cpu(&plain, job), "the CPU renders the plain graphs");
}

#[test]
fn an_fp16_export_is_widened_then_prepared() {
    let plain = workspace_root().join("gpu-runner/tests/fixtures/kiln-tiny-sd-fp16");
    let prepared = scratch("kiln-tiny-sd-fp16");
    let report = prepare(&plain, &prepared, &[]);
    assert_eq!(report["unet"]["from"], "fp16 (widened to fp32 first)", "{report}");
    assert!(fused(&report, "unet", "MultiHeadAttention") > 0, "{report}");
    assert!(fused(&report, "vae_decoder", "NhwcConv") > 0, "{report}");
}

#[test]
fn the_step_graphs_render_what_the_host_loop_renders() {
    let plain = workspace_root().join("gpu-runner/models/kiln-tiny-sd");
    let prepared = scratch("kiln-tiny-sd-steps");
    let report = prepare(&plain, &prepared, &["--components", "unet", "--steps-for", "cpu,cuda"]);
    assert_eq!(report["step graphs (cpu)"]["unet_step"], "unet/step.onnx", "{report}");
    let job = |prompt: &str, guidance: f64, frames: u32, seed: u32| {
        format!(
            r#"{{"model":"kiln-tiny-sd","prompt":"{prompt}","width":96,"height":64,"steps":4,"guidance":{guidance},"num_frames":{frames},"format":"{}","seed":{seed}}}"#,
            if frames > 1 { "gif" } else { "png" }
        )
    };
    let cases: Vec<(&str, PathBuf, Vec<String>)> = vec![
        ("guided image", prepared.clone(), vec![job("a red car", 7.5, 1, 3)]),
        ("unguided image", prepared.clone(), vec![job("a red car", 0.0, 1, 3)]),
        ("guided video", prepared.clone(), vec![job("waves", 5.0, 3, 4)]),
        ("a batch of two guidance scales", prepared.clone(), vec![job("a", 7.5, 1, 1), job("b", 3.0, 1, 2)]),
        (
            "Euler-a (fresh noise each step)",
            with_scheduler(&prepared, "EulerAncestralDiscreteScheduler", "euler-a"),
            vec![job("a lighthouse", 6.0, 1, 9)],
        ),
    ];
    for (name, dir, bodies) in cases {
        let bodies: Vec<&str> = bodies.iter().map(String::as_str).collect();
        let host = render_batch_on_cpu(&with_graphs_off(&dir), &bodies);
        let stepped = render_batch_on_cpu(&dir, &bodies);
        for (ours, theirs) in stepped.iter().zip(&host) {
            assert_eq!(ours.len(), theirs.len(), "{name}");
            let worst = ours.iter().zip(theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            let differing = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
            eprintln!("{name}: max |Δ| {worst}, {differing} of {} values differ", ours.len());
            assert!(worst <= 2, "{name}: a value differs by {worst}");
            assert!(differing * 100 <= ours.len(), "{name}: {differing} of {} values differ", ours.len());
        }
    }
}

/// The path CUDA graphs take (every input in a device buffer that never moves, each step's
/// values written into them, a chunk padded up to a larger graph of its size when no graph of
/// its own is left, the rest uncaptured) renders what the bound step graph renders. On the CPU
/// nothing is captured, so this holds the buffers, the padding and the counting; the GPU run
/// (`gpu-prepare.sh`) holds the captured graphs to the same renders.
#[test]
fn the_fixed_buffers_of_cuda_graphs_render_what_the_bound_step_graph_renders() {
    let plain = workspace_root().join("gpu-runner/models/kiln-tiny-sd");
    let prepared = scratch("kiln-tiny-sd-graphs");
    prepare(&plain, &prepared, &["--components", "unet", "--steps-for", "cpu"]);
    let job = |prompt: &str, guidance: f64, seed: u32| {
        format!(
            r#"{{"model":"kiln-tiny-sd","prompt":"{prompt}","width":96,"height":64,"steps":4,"guidance":{guidance},"seed":{seed}}}"#
        )
    };
    let (two, one, unguided) =
        ([job("a", 7.5, 1), job("b", 3.0, 2)], [job("a lighthouse", 6.0, 9)], [job("a red car", 0.0, 3)]);
    let batches: Vec<Vec<&str>> = vec![
        two.iter().map(String::as_str).collect(),
        // No graph left for one guided lane: it pads into the two-lane graph.
        one.iter().map(String::as_str).collect(),
        // Nor for an unguided one, and no graph has its rows per lane: uncaptured.
        unguided.iter().map(String::as_str).collect(),
    ];
    let batches: Vec<&[&str]> = batches.iter().map(Vec::as_slice).collect();
    let (bound, runs) = render_batches_on_cpu(&prepared, &batches, 0);
    assert_eq!(runs, GraphRuns::default(), "no graphs asked for, none used");
    let (fixed, runs) = render_batches_on_cpu(&prepared, &batches, 1);
    for (batch, (ours, theirs)) in fixed.iter().zip(&bound).enumerate() {
        for (job, (ours, theirs)) in ours.iter().zip(theirs).enumerate() {
            let (worst, differing) = difference(ours, theirs);
            eprintln!("batch {batch} job {job}: max |Δ| {worst}, {differing} of {} values differ", ours.len());
            assert!(worst <= 2, "batch {batch} job {job}: a value differs by {worst}");
        }
    }
    let expected = GraphRuns { capturing: 2, replayed: 2 + 4, padded: 4, uncaptured: 4, no_graph_chunks: 1, failed: 0 };
    assert_eq!(runs, expected);

    // Euler-a's fresh noise each step goes through the noise buffer.
    let euler_a = with_scheduler(&prepared, "EulerAncestralDiscreteScheduler", "graphs-euler-a");
    let batch = [job("a lighthouse", 6.0, 9)];
    let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
    let (bound, _) = render_batches_on_cpu(&euler_a, &[&batch, &batch], 0);
    let (fixed, runs) = render_batches_on_cpu(&euler_a, &[&batch, &batch], 8);
    assert_eq!((runs.capturing, runs.replayed, runs.uncaptured), (2, 6, 0));
    for (ours, theirs) in fixed.iter().flatten().zip(bound.iter().flatten()) {
        let (worst, _) = difference(ours, theirs);
        assert!(worst <= 2, "Euler-a: a value differs by {worst}");
    }
}

/// A copy of the package whose manifest names no graphs (the host loop on the plain graphs).
fn with_graphs_off(dir: &Path) -> PathBuf {
    let copy = scratch(&format!("plain-{}", dir.file_name().unwrap().to_string_lossy()));
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "manifest.json" {
            std::os::unix::fs::symlink(std::fs::canonicalize(entry.path()).unwrap(), copy.join(entry.file_name()))
                .unwrap();
        }
    }
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    manifest.as_object_mut().unwrap().remove("graphs");
    std::fs::write(copy.join("manifest.json"), manifest.to_string()).unwrap();
    copy
}

//! `gpu-runner/sd/prepare_sd.py` on the tiny packages, on the CPU: ONNX Runtime's Stable
//! Diffusion recipe fuses what it should into the CUDA graphs, the manifest names them, and the
//! CPU keeps rendering the plain graphs, byte for byte as before. (That the prepared graphs
//! render on CUDA within fp16 tolerance of the plain ones is checked on the GPU machine:
//! `gpu-runner/sd/gpu-bench.sh`, BENCHMARKS.md.)

use kiln_domain::{ModelSpec, Submission, WebhookPolicy};
use kiln_local::{Tools, ensure_tools, workspace_root};
use kiln_runner::{
    packages,
    render::{RenderControl, RenderRequest, runtime::SessionOptions},
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

/// Prepares `package` into `out`; returns the tool's report.
fn prepare(package: &Path, out: &Path) -> Value {
    let output = Command::new(tools().python)
        .arg(workspace_root().join("gpu-runner/sd/prepare_sd.py"))
        .arg("--package")
        .arg(package)
        .arg("--out")
        .arg(out)
        .output()
        .expect("running prepare_sd.py");
    assert!(output.status.success(), "prepare_sd.py failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("prepare_sd.py prints its report as JSON")
}

fn fused(report: &Value, component: &str, op: &str) -> u64 {
    report[component]["fused"][op].as_u64().unwrap_or(0)
}

fn render_on_cpu(dir: &Path, body: &str) -> Vec<u8> {
    let options = SessionOptions { intra_threads: 1, ..SessionOptions::cpu(tools().ort_dylib) };
    let spec = ModelSpec::read_manifest(dir).unwrap();
    let params =
        Submission::parse(body.as_bytes()).unwrap().resolve(&spec, WebhookPolicy::default(), || 0).unwrap().params;
    let mut pipeline = packages::load(dir, spec, &options).expect("loading the package").pipeline;
    let request = RenderRequest { params, control: Arc::new(RenderControl::default()) };
    pipeline.render(&request).expect("render").frames.concat()
}

#[test]
fn preparing_fuses_the_cuda_graphs_and_leaves_the_cpu_its_plain_ones() {
    let plain = workspace_root().join("gpu-runner/models/kiln-tiny-sd");
    let prepared = scratch("kiln-tiny-sd");
    let report = prepare(&plain, &prepared);
    eprintln!("{report:#}");

    // The UNet's attention, norms and convolutions, the VAE's norms and convolutions.
    for (component, op) in [
        ("unet", "MultiHeadAttention"),
        ("unet", "GroupNorm"),
        ("unet", "SkipGroupNorm"),
        ("unet", "NhwcConv"),
        ("unet", "BiasSplitGelu"),
        ("vae_decoder", "GroupNorm"),
        ("vae_decoder", "NhwcConv"),
        ("text_encoder", "SkipLayerNormalization"),
    ] {
        assert!(fused(&report, component, op) > 0, "{component}: no {op} fused: {report}");
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
    let report = prepare(&plain, &prepared);
    assert_eq!(report["unet"]["from"], "fp16 (widened to fp32 first)", "{report}");
    assert!(fused(&report, "unet", "MultiHeadAttention") > 0, "{report}");
    assert!(fused(&report, "vae_decoder", "GroupNorm") > 0, "{report}");
}

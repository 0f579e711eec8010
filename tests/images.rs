//! Jobs that start from an image, end to end over moto: a tenant uploads a PNG through a link
//! from `POST /v1/uploads` (`"kind": "image"`) and names its id in `init_image` (image-to-image
//! on kiln-tiny-sd, image-to-video on kiln-tiny-motion); an inbox spec names an image beside it.
//! Bad images are refused naming `init_image`, through the API and in the outbox's
//! `error.json`; no tenant can name another's image.

use kiln_local::LocalStack;
use kiln_tests::{Client, download, media, put_object, runner_options, stack, start_runner, wait_for_object};
use serde_json::{Value, json};
use std::time::Duration;

/// A PNG of `width`×`height`: a gradient with a yellow disc.
fn picture(width: u32, height: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            let (dx, dy) = (x as f64 - width as f64 / 2.0, y as f64 - height as f64 / 2.0);
            match dx * dx + dy * dy < (width as f64 / 4.0).powi(2) {
                true => data.extend([240, 240, 40]),
                false => data.extend([(x * 255 / width) as u8, (y * 255 / height) as u8, 90]),
            }
        }
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header().unwrap().write_image_data(&data).unwrap();
    out
}

/// Uploads `bytes` as an image through a link; its image id.
async fn upload_image(client: &Client, tenant: &str, bytes: &[u8], content_type: &str) -> String {
    let link = client
        .post_json("/v1/uploads", &json!({"kind": "image", "content_type": content_type, "size": bytes.len()}))
        .await;
    assert_eq!(link.status, 201, "{}", link.body);
    let put = reqwest::Client::new()
        .put(link.body["url"].as_str().unwrap())
        .header("content-type", content_type)
        .header("content-length", bytes.len().to_string())
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "upload: {}", put.status());
    let image = link.body["image"].as_str().unwrap().to_owned();
    assert_eq!(link.body["key"], format!("images/{tenant}/{image}"));
    image
}

async fn started() -> LocalStack {
    let mut stack = stack().await;
    stack.start_relays().await.expect("relays");
    stack
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uploaded_image_renders_image_to_image_and_image_to_video() {
    let stack = started().await;
    let _runner = start_runner(&stack, &runner_options("images"));
    let client = Client::tenant(&stack, "acme").await;
    let image = upload_image(&client, "acme", &picture(96, 64), "image/png").await;

    // Image to image: no size given, so the image's.
    let body = json!({"model": "kiln-tiny-sd", "prompt": "a lake at dawn", "init_image": image, "strength": 0.6,
                      "steps": 6, "seed": 3});
    let submitted = client.post_json("/v1/jobs", &body).await;
    assert_eq!(submitted.status, 202, "{}", submitted.body);
    assert_eq!(submitted.body["input"]["width"], 96);
    assert_eq!(submitted.body["input"]["height"], 64);
    let id = submitted.body["id"].as_str().unwrap();
    let job = client.wait_finished(id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let png = download(job["outputs"][0]["url"].as_str().unwrap()).await;
    assert_eq!(media::probe("png", &png).unwrap(), media::Probe { width: 96, height: 64, frames: 1 });
    // The same request again is the same render (the image counts by its content).
    let again = client.post_json("/v1/jobs", &body).await;
    assert_eq!((again.body["id"].as_str(), again.body["cached"].as_bool()), (Some(id), Some(true)), "{}", again.body);

    // Image to video on the motion model: frames and a poster.
    let video = json!({"model": "kiln-tiny-motion", "prompt": "the lake in wind", "init_image": image,
                       "num_frames": 8, "steps": 4, "seed": 1, "width": 64, "height": 64});
    let submitted = client.post_json("/v1/jobs", &video).await;
    assert_eq!(submitted.status, 202, "{}", submitted.body);
    let job = client.wait_finished(submitted.body["id"].as_str().unwrap(), Duration::from_secs(120)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let gif = download(job["outputs"][0]["url"].as_str().unwrap()).await;
    assert_eq!(media::probe("gif", &gif).unwrap(), media::Probe { width: 64, height: 64, frames: 8 });
    assert_eq!(job["outputs"].as_array().unwrap().len(), 2, "the video and its poster: {job}");

    // Another tenant naming the id reads under its own prefix: no such image.
    let other = Client::tenant(&stack, "globex").await;
    let theirs = other.post_json("/v1/jobs", &body).await;
    assert_eq!(theirs.status, 422, "{}", theirs.body);
    assert_eq!(theirs.body["error"]["field"], "init_image");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_images_are_refused_naming_the_field() {
    let stack = started().await;
    let client = Client::tenant(&stack, "acme").await;
    let good = picture(64, 64);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() - 40].to_vec(), "does not decode"),
        ("not an image", b"<html>hello</html>".to_vec(), "not a PNG or JPEG"),
        ("too small", picture(4, 64), "width is 4 pixels"),
    ];
    for (what, bytes, says) in cases {
        let image = upload_image(&client, "acme", &bytes, "image/png").await;
        let answer =
            client.post_json("/v1/jobs", &json!({"model": "kiln-tiny-sd", "prompt": "x", "init_image": image})).await;
        assert_eq!(answer.status, 422, "{what}: {}", answer.body);
        assert_eq!(answer.body["error"]["field"], "init_image", "{what}");
        assert!(answer.body["error"]["message"].as_str().unwrap().contains(says), "{what}: {}", answer.body);
    }
    let missing = "img_01KBWJ5N0000000000000000AA.png";
    let answer =
        client.post_json("/v1/jobs", &json!({"model": "kiln-tiny-sd", "prompt": "x", "init_image": missing})).await;
    assert_eq!(
        (answer.status.as_u16(), &answer.body["error"]["field"]),
        (422, &json!("init_image")),
        "{}",
        answer.body
    );
    let answer = client.post_json("/v1/jobs", &json!({"model": "kiln-tiny-sd", "prompt": "x", "strength": 0.5})).await;
    assert_eq!(answer.body["error"]["field"], "strength", "{}", answer.body);
    // The link itself: an image kind, a size, a type.
    let link =
        client.post_json("/v1/uploads", &json!({"kind": "image", "content_type": "image/gif", "size": 10})).await;
    assert_eq!((link.status.as_u16(), &link.body["error"]["field"]), (422, &json!("content_type")), "{}", link.body);
    let huge = 20 * 1024 * 1024 + 1;
    let link =
        client.post_json("/v1/uploads", &json!({"kind": "image", "content_type": "image/png", "size": huge})).await;
    assert_eq!(link.body["error"]["field"], "size", "{}", link.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inbox_spec_starts_from_the_image_beside_it() {
    let stack = started().await;
    let _runner = start_runner(&stack, &runner_options("images-inbox"));
    let _client = Client::tenant(&stack, "acme").await;
    // Beside it: in the spec's folder (here the tenant's, for a spec named without an upload id).
    put_object(&stack, "inbox/acme/photo.png", picture(128, 80), "image/png").await;
    let spec = json!({"model": "kiln-tiny-sd", "prompt": "boats", "init_image": "photo.png", "steps": 4, "seed": 2});
    put_object(&stack, "inbox/acme/boats.json", spec.to_string().into_bytes(), "application/json").await;
    let result: Value = serde_json::from_slice(
        &wait_for_object(&stack, "outbox/acme/boats/result.json", Duration::from_secs(120)).await,
    )
    .unwrap();
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!((result["input"]["width"].as_u64(), result["input"]["height"].as_u64()), (Some(128), Some(80)));
    let png = wait_for_object(&stack, "outbox/acme/boats/output.png", Duration::from_secs(5)).await;
    assert_eq!(media::probe("png", &png).unwrap(), media::Probe { width: 128, height: 80, frames: 1 });

    // The motion model through the inbox: a video from the prompt alone, and one from the image.
    for (name, image) in [("waves", None), ("boats-moving", Some("photo.png"))] {
        let mut spec = json!({"model": "kiln-tiny-motion", "prompt": "boats on a windy lake", "num_frames": 8,
                              "width": 64, "height": 64, "steps": 4, "seed": 3});
        if let Some(image) = image {
            spec["init_image"] = json!(image);
        }
        put_object(&stack, &format!("inbox/acme/{name}.json"), spec.to_string().into_bytes(), "application/json").await;
        let outbox = format!("outbox/acme/{name}/");
        let result: Value = serde_json::from_slice(
            &wait_for_object(&stack, &format!("{outbox}result.json"), Duration::from_secs(120)).await,
        )
        .unwrap();
        assert_eq!(result["status"], "succeeded", "{name}: {result}");
        let video = result["outputs"][0]["key"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
        let gif = wait_for_object(&stack, &format!("{outbox}{video}"), Duration::from_secs(5)).await;
        assert_eq!(media::probe("gif", &gif).unwrap(), media::Probe { width: 64, height: 64, frames: 8 }, "{name}");
        assert_eq!(result["input"]["init_image"].is_object(), image.is_some(), "{name}: {result}");
    }

    // A spec naming a file that is not there: error.json names the field.
    let spec = json!({"model": "kiln-tiny-sd", "prompt": "boats", "init_image": "nowhere.png"});
    put_object(&stack, "inbox/acme/lost.json", spec.to_string().into_bytes(), "application/json").await;
    let error: Value =
        serde_json::from_slice(&wait_for_object(&stack, "outbox/acme/lost/error.json", Duration::from_secs(30)).await)
            .unwrap();
    assert_eq!(error["error"]["field"], "init_image", "{error}");
}

//! The web playground in a real headless Chromium (Debian's, over WebDriver), served by the
//! local stack at `/` with a runner behind it: a wrong key shows the API's 401 message; with the
//! tenant's key the page lists the models, submits a job, follows it and shows the decoded
//! image, its timings and the job in the history. The window is saved as
//! `target/playground/playground.png` (`KILN_BLESS=1` also writes `docs/playground.png`, the
//! README's picture).

use kiln_local::workspace_root;
use kiln_tests::{Client, browser::Browser, runner_options, stack, start_runner};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn the_playground_renders_a_job_in_a_real_browser() {
    let stack = stack().await;
    let _runner = tokio::task::block_in_place(|| start_runner(&stack, &runner_options("playground")));
    let tenant = Client::tenant(&stack, "playground").await;
    let browser = Browser::start().await.expect("headless Chromium and ChromeDriver");
    browser.open(&format!("{}/", stack.api_url)).await.unwrap();
    let title = browser.eval("return document.title").await.unwrap();
    assert_eq!(title, "kiln playground");

    // A wrong key: the page shows the status and the API's own words.
    let wrong = "kiln_0000000000000000000000000000000000000000";
    let refused = Client::new(&stack.api_url, Some(wrong)).get("/v1/models").await;
    assert_eq!(refused.status, 401);
    let message = refused.body["error"]["message"].as_str().unwrap().to_owned();
    browser.type_into("#key", wrong).await.unwrap();
    browser.click("#connect").await.unwrap();
    let shown = browser
        .wait_for("return document.querySelector('#error').textContent || null", Duration::from_secs(10))
        .await
        .unwrap();
    let shown = shown.as_str().unwrap();
    assert!(
        shown.starts_with("401: ") && shown.contains(&message),
        "the page shows `{shown}`, the API said `{message}`"
    );
    assert_eq!(browser.eval("return document.querySelector('#submit').disabled").await.unwrap(), true);

    // The tenant's key: the models from /v1/models, then a job submitted from the page.
    browser.type_into("#key", tenant.key.as_deref().unwrap()).await.unwrap();
    browser.click("#connect").await.unwrap();
    let models = browser
        .wait_for(
            "const o = [...document.querySelectorAll('#model option')].map(o => o.value); return o.length ? o : null",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(models.as_array().unwrap().iter().any(|m| m == "kiln-demo"), "{models}");
    browser
        .eval("const m = document.querySelector('#model'); m.value = 'kiln-demo'; m.onchange(); return true")
        .await
        .unwrap();
    browser.type_into("#prompt", "a lighthouse on a cliff at dusk").await.unwrap();
    browser.type_into("#seed", "7").await.unwrap();
    browser.click("#submit").await.unwrap();

    // The image element shows a decoded image once the job has succeeded.
    let size = browser
        .wait_for(
            "const i = document.querySelector('#result'); \
             return i && i.tagName === 'IMG' && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null",
            Duration::from_secs(90),
        )
        .await
        .unwrap();
    let status = browser.eval("return document.querySelector('#status').textContent").await.unwrap();
    assert!(status.as_str().unwrap().ends_with("succeeded"), "{status}");
    let job_id = status.as_str().unwrap().split(':').next().unwrap().to_owned();
    let job = tenant.get(&format!("/v1/jobs/{job_id}")).await.body;
    assert_eq!(size, serde_json::json!([job["input"]["width"], job["input"]["height"]]), "{job}");
    assert_eq!(browser.eval("return document.querySelector('#progress').value").await.unwrap(), 1);
    let timings = browser.eval("return document.querySelector('#timings').innerText").await.unwrap();
    assert!(timings.as_str().unwrap().contains("render"), "the job's timings: {timings}");
    let history = browser
        .wait_for(
            "const t = document.querySelector('#history').innerText; return t.includes('lighthouse') ? t : null",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(history.as_str().unwrap().contains("succeeded"), "{history}");

    let png = browser.screenshot().await.unwrap();

    // A video: it plays in the page (Chromium decodes the WebM; `readyState` 2 or more means a
    // frame is decoded and showing).
    browser.type_into("#frames", "8").await.unwrap();
    browser.eval("const f = document.querySelector('#format'); f.value = 'webm'; return f.value").await.unwrap();
    browser.type_into("#prompt", "waves rolling in").await.unwrap();
    browser.click("#submit").await.unwrap();
    let video = browser
        .wait_for(
            "const v = document.querySelector('#result'); \
             return v && v.tagName === 'VIDEO' && v.readyState >= 2 && v.videoWidth > 0 \
                 ? {width: v.videoWidth, paused: v.paused, loop: v.loop} : null",
            Duration::from_secs(90),
        )
        .await
        .unwrap();
    assert_eq!(video["width"], 512, "{video}");
    assert_eq!(video["loop"], true, "{video}");

    // Where API Gateway serves it (`/<stage>/v1/playground`) the page finds the API beside it
    // too; the key stays for the tab's life, so it connects at once.
    browser.open(&format!("{}/v1/playground", stack.api_url)).await.unwrap();
    browser
        .wait_for("return document.querySelectorAll('#model option').length > 0", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let out = workspace_root().join("target/playground");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("playground.png"), &png).unwrap();
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(workspace_root().join("docs/playground.png"), &png).unwrap();
    }
}

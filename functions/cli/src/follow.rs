//! Following a job: its queue position while queued, a progress bar by step while it runs, its
//! outputs downloaded when it succeeds. Ctrl-C cancels it (on a terminal, after asking).

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::{io::IsTerminal, path::PathBuf, time::Duration};

use crate::api::{Api, CliError};

pub struct Options {
    /// Where outputs are downloaded; None: not at all.
    pub out: Option<PathBuf>,
    /// Ctrl-C cancels the job (else it is left running).
    pub cancel_on_interrupt: bool,
    /// No progress display (`--json`).
    pub quiet: bool,
}

/// Ctrl-C, listened for from the start of the command: a signal before the first poll of a
/// lazily made listener would end the process instead.
pub struct Interrupts(tokio::signal::unix::Signal);

impl Interrupts {
    pub fn listen() -> Result<Self, CliError> {
        Ok(Self(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?))
    }
}

/// Polls the job until it ends; its last view and the files its outputs were written to.
pub async fn follow(
    api: &Api,
    id: &str,
    options: &Options,
    interrupts: &mut Interrupts,
) -> Result<(Value, Vec<PathBuf>), CliError> {
    let bar = match options.quiet {
        true => ProgressBar::hidden(),
        false => ProgressBar::new_spinner(),
    };
    bar.enable_steady_tick(Duration::from_millis(120));
    let job = loop {
        let job = api.job(id).await?;
        show(&bar, &job);
        if !matches!(job["status"].as_str(), Some("queued" | "running")) {
            break job;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = interrupts.0.recv() => {
                bar.suspend(|| ());
                bar.finish_and_clear();
                if options.cancel_on_interrupt && confirm_cancel(id) {
                    api.cancel(id).await?;
                    eprintln!("kiln: canceled job {id}");
                } else {
                    eprintln!("kiln: job {id} goes on (`kiln wait {id}` follows it again)");
                }
                return Err(CliError::Interrupted);
            }
        }
    };
    bar.finish_and_clear();
    let status = job["status"].as_str().unwrap_or("?").to_owned();
    if status != "succeeded" {
        let message = job["error"]["message"].as_str().map(str::to_owned);
        return Err(CliError::JobDidNotSucceed { id: id.to_owned(), status, message });
    }
    let mut files = Vec::new();
    if let Some(out) = &options.out {
        std::fs::create_dir_all(out)?;
        for output in job["outputs"].as_array().into_iter().flatten() {
            let (Some(url), Some(key)) = (output["url"].as_str(), output["key"].as_str()) else { continue };
            let name = key.rsplit('/').next().unwrap_or("output");
            let path = out.join(format!("{id}-{name}"));
            api.download(url, &path).await?;
            files.push(path);
        }
    }
    Ok((job, files))
}

/// The job's state on the bar: queue position and estimates while queued, steps while running.
fn show(bar: &ProgressBar, job: &Value) {
    match job["status"].as_str() {
        Some("queued") => {
            let position = job["queue_position"].as_u64().map(|p| format!(", {p} ahead")).unwrap_or_default();
            let start = job["estimated_start_at"].as_str().map(|t| format!(", starts about {t}")).unwrap_or_default();
            bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("a template"));
            bar.set_message(format!("queued{position}{start}"));
        }
        Some("running") => {
            let steps = job["steps"].as_u64().unwrap_or(100);
            let step =
                job["step"].as_u64().unwrap_or_else(|| (job["progress"].as_f64().unwrap_or(0.0) * steps as f64) as u64);
            if bar.length() != Some(steps) {
                bar.set_style(
                    ProgressStyle::with_template("{spinner} rendering [{bar:32}] {pos}/{len} steps {msg}")
                        .expect("a template")
                        .progress_chars("=> "),
                );
                bar.set_length(steps);
            }
            bar.set_position(step);
            let finish = job["estimated_finish_at"].as_str().map(|t| format!("(done about {t})")).unwrap_or_default();
            bar.set_message(finish);
        }
        _ => {}
    }
}

/// On a terminal, asks; otherwise (a script, a pipe) cancels.
fn confirm_cancel(id: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        return true;
    }
    eprint!("cancel job {id}? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok() && matches!(answer.trim(), "y" | "Y" | "yes")
}

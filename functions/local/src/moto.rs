//! The moto server: installed into `<workspace>/.venv` when missing, started on 127.0.0.1.

use anyhow::{Context, bail};
use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The moto release the project is tested with.
pub const MOTO_REQUIREMENT: &str = "moto[server]==5.2.5";

/// Makes sure `<root>/.venv` has moto's server and returns the path of `moto_server`.
/// Several processes may call this at once: a lock file lets one install while the others wait.
pub fn ensure_moto(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = root.join(".venv");
    let server = venv.join("bin/moto_server");
    if server.exists() {
        return Ok(server);
    }
    std::fs::create_dir_all(root.join("target")).ok();
    let lock = File::create(root.join("target/.venv.lock")).context("creating the venv lock file")?;
    lock.lock().context("locking the venv lock file")?;
    if server.exists() {
        return Ok(server);
    }
    eprintln!("kiln: installing {MOTO_REQUIREMENT} into {} (first run only)", venv.display());
    if !run(Command::new("python3").args(["-m", "venv"]).arg(&venv))? {
        // Debian's python3 ships venv separately.
        eprintln!("kiln: python3 -m venv failed; installing python3-venv with apt-get");
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get").args(["install", "-y", "-q", "python3-venv"]))?;
        if !run(Command::new("python3").args(["-m", "venv"]).arg(&venv))? {
            bail!("could not create a Python virtual environment in {}", venv.display());
        }
    }
    if !run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        MOTO_REQUIREMENT,
    ]))? {
        bail!("pip could not install {MOTO_REQUIREMENT}");
    }
    if !server.exists() {
        bail!("{} is missing after installing moto", server.display());
    }
    Ok(server)
}

fn run(command: &mut Command) -> anyhow::Result<bool> {
    let status = command.status().with_context(|| format!("running {command:?}"))?;
    Ok(status.success())
}

/// A running moto server; stopped when dropped, and (through the parent-death signal) when the
/// thread that started it exits.
pub struct MotoServer {
    child: Child,
    pub url: String,
}

impl MotoServer {
    /// Starts moto on `127.0.0.1:port` (0 picks a free port) and waits until it answers.
    pub fn start(moto_server: &Path, port: u16) -> anyhow::Result<Self> {
        let port = match port {
            0 => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
            port => port,
        };
        let mut command = Command::new(moto_server);
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = command.spawn().with_context(|| format!("starting {}", moto_server.display()))?;
        let mut server = Self { child, url: format!("http://127.0.0.1:{port}") };
        server.wait_ready(Duration::from_secs(30))?;
        Ok(server)
    }

    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let address = self.url.trim_start_matches("http://").to_owned();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait()? {
                bail!("moto exited with {status} before it was ready (is port {address} taken?)");
            }
            if std::net::TcpStream::connect(&address).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("moto did not answer on {address} within {limit:?}")
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

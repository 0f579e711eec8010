//! The tools the local stack needs, installed on first use (Python packages into
//! `<workspace>/.venv`, Debian packages with apt-get), and the moto server on 127.0.0.1.

use anyhow::{Context, bail};
use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// What the project installs into `<workspace>/.venv`: moto's server (the local AWS), ONNX
/// Runtime's CPU build (its `libonnxruntime.so` is what the runner loads; its Python package
/// carries `onnxruntime.transformers`, the graph optimizer `gpu-runner/sd/prepare_sd.py` runs)
/// and onnx, which that optimizer needs; schemathesis, which tests the API against its OpenAPI
/// document (`tests/openapi.rs`).
pub const PYTHON_REQUIREMENTS: &[&str] =
    &["moto[server]==5.2.5", "onnxruntime==1.31.1", "onnx==1.23.2", "schemathesis==4.32.5"];

/// Debian packages the runner links against: libvpx for WebM (VP9), found through pkg-config.
const SYSTEM_PACKAGES: &[&str] = &["libvpx-dev", "pkg-config"];

/// Paths of the installed tools.
#[derive(Debug, Clone)]
pub struct Tools {
    /// moto's server with kiln's fix (`functions/local/moto_server.py`), run by `python`.
    pub moto_server: PathBuf,
    /// ONNX Runtime's shared library, for `ORT_DYLIB_PATH`.
    pub ort_dylib: PathBuf,
    /// The venv's Python, with numpy and onnxruntime (what `gpu-runner/sd/reference.py` needs).
    pub python: PathBuf,
}

/// Makes sure `<root>/.venv` holds [`PYTHON_REQUIREMENTS`] (installing them on first use) and
/// returns where the tools are. Several processes may call this at once: a lock file lets one
/// install while the others wait.
pub fn ensure_tools(root: &Path) -> anyhow::Result<Tools> {
    let venv = root.join(".venv");
    let stamp = venv.join("kiln-requirements.txt");
    let wanted = PYTHON_REQUIREMENTS.join("\n");
    let installed = || std::fs::read_to_string(&stamp).is_ok_and(|text| text == wanted);
    if !installed() {
        std::fs::create_dir_all(root.join("target")).ok();
        let lock = File::create(root.join("target/.venv.lock")).context("creating the venv lock file")?;
        lock.lock().context("locking the venv lock file")?;
        if !installed() {
            install(&venv)?;
            std::fs::write(&stamp, &wanted).context("writing the requirements stamp")?;
        }
    }
    Ok(Tools {
        moto_server: root.join("functions/local/moto_server.py"),
        ort_dylib: find_ort_dylib(&venv)?,
        python: venv.join("bin/python"),
    })
}

fn install(venv: &Path) -> anyhow::Result<()> {
    eprintln!("kiln: installing {} into {} (first run only)", PYTHON_REQUIREMENTS.join(", "), venv.display());
    if !venv.join("bin/pip").exists() && !run(Command::new("python3").args(["-m", "venv"]).arg(venv))? {
        // Debian's python3 ships venv separately.
        eprintln!("kiln: python3 -m venv failed; installing python3-venv with apt-get");
        apt_get_install(&["python3-venv"])?;
        if !run(Command::new("python3").args(["-m", "venv"]).arg(venv))? {
            bail!("could not create a Python virtual environment in {}", venv.display());
        }
    }
    let pip = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PYTHON_REQUIREMENTS)
        .status()
        .context("running pip")?;
    if !pip.success() {
        bail!("pip could not install {}", PYTHON_REQUIREMENTS.join(", "));
    }
    Ok(())
}

/// `libonnxruntime.so.<version>` inside the onnxruntime wheel.
fn find_ort_dylib(venv: &Path) -> anyhow::Result<PathBuf> {
    let lib = venv.join("lib");
    for python in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let capi = python?.path().join("site-packages/onnxruntime/capi");
        if let Ok(entries) = std::fs::read_dir(&capi) {
            for entry in entries {
                let path = entry?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                if name.starts_with("libonnxruntime.so") {
                    return Ok(path);
                }
            }
        }
    }
    bail!("no libonnxruntime.so under {}; delete .venv to reinstall", lib.display())
}

/// Installs the Debian packages the runner builds against, when pkg-config cannot find libvpx.
pub fn ensure_system_libraries() -> anyhow::Result<()> {
    let found = Command::new("pkg-config").args(["--exists", "vpx"]).status().is_ok_and(|s| s.success());
    if !found {
        eprintln!("kiln: installing {} with apt-get (first run only)", SYSTEM_PACKAGES.join(", "));
        apt_get_install(SYSTEM_PACKAGES)?;
    }
    Ok(())
}

/// Debian's Chromium and its WebDriver, for the playground's browser test.
const BROWSER_PACKAGES: &[&str] = &["chromium", "chromium-driver"];

/// Where Debian's `chromium-driver` puts ChromeDriver, and `chromium` the browser.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Installs Chromium and ChromeDriver with apt-get when they are not there (first run only).
pub fn ensure_browser() -> anyhow::Result<()> {
    if !(Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists()) {
        eprintln!("kiln: installing {} with apt-get (first run only)", BROWSER_PACKAGES.join(", "));
        apt_get_install(BROWSER_PACKAGES)?;
    }
    Ok(())
}

fn apt_get_install(packages: &[&str]) -> anyhow::Result<()> {
    let root = Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.starts_with(b"0"));
    let sudo: &[&str] = if root { &[] } else { &["sudo"] };
    let apt = |args: &[&str]| -> anyhow::Result<bool> {
        let mut command = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            command.arg("apt-get");
        }
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut command)
    };
    if !apt(&["install", "-y", "-q"].iter().copied().chain(packages.iter().copied()).collect::<Vec<_>>())? {
        apt(&["update", "-q"])?;
        if !apt(&["install", "-y", "-q"].iter().copied().chain(packages.iter().copied()).collect::<Vec<_>>())? {
            bail!("apt-get could not install {}; install them and run again", packages.join(" "));
        }
    }
    Ok(())
}

/// Polls `ready` until it holds, failing when `child` exits first or `limit` passes. `what`
/// names the child in the error.
pub(crate) fn wait_for_child(
    child: &mut Child,
    limit: Duration,
    what: &str,
    ready: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status} before it was ready");
        }
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} was not ready within {limit:?}")
}

/// Has the child killed when the thread that spawned it exits (Linux), so a crashed or killed
/// test or demo never leaves servers behind. The thread, not the process: start children from a
/// thread that lives as long as they should (never from tokio's blocking pool, whose idle
/// threads exit after ten seconds).
pub(crate) fn die_with_parent(command: &mut Command) {
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
    #[cfg(not(target_os = "linux"))]
    let _ = command;
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
    pub fn start(tools: &Tools, port: u16) -> anyhow::Result<Self> {
        let port = match port {
            0 => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
            port => port,
        };
        let mut command = Command::new(&tools.python);
        command
            .arg(&tools.moto_server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        let child = command.spawn().with_context(|| format!("starting {}", tools.moto_server.display()))?;
        let mut server = Self { child, url: format!("http://127.0.0.1:{port}") };
        server.wait_ready(Duration::from_secs(30))?;
        Ok(server)
    }

    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let address = self.url.trim_start_matches("http://").to_owned();
        let ready = || std::net::TcpStream::connect(&address).is_ok();
        wait_for_child(&mut self.child, limit, &format!("moto on {address} (is the port taken?)"), ready)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! What the end-to-end tests share: running the role binaries and a served authority.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The authority binary.
pub const AUTHORITY: &str = env!("CARGO_BIN_EXE_authority");
/// The client binary.
pub const CLIENT: &str = env!("CARGO_BIN_EXE_client");
/// The trainer binary.
pub const TRAINER: &str = env!("CARGO_BIN_EXE_trainer");

/// Runs `cmd` (without the MNIST directory variable, so the embedded data is the default)
/// and returns its output.
pub fn output(cmd: &mut Command) -> Output {
    cmd.env_remove("CRYPTONN_MNIST_DIR")
        .output()
        .expect("process starts")
}

/// Runs `cmd`, which must succeed.
pub fn run(cmd: &mut Command) -> Output {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd`, which must fail; returns its standard error.
pub fn fails(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(!out.status.success(), "{cmd:?} should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A running `authority serve` process, stopped on drop (SIGTERM, which writes the audit
/// log's summaries, then SIGKILL if it does not stop).
pub struct Served {
    /// The process.
    pub child: Child,
    /// The address it listens on.
    pub addr: String,
    /// The callers' token.
    pub token: String,
    /// The server's TLS certificate, which callers pin; `None` for a clear-text server
    /// (`--insecure-plaintext`).
    pub ca: Option<PathBuf>,
}

impl Served {
    /// The flags that make a caller reach this server: `--ca FILE` (`flag`, for the
    /// prediction service `--server-ca`) or `--insecure-plaintext`.
    pub fn tls_flags(&self, flag: &str) -> Vec<String> {
        match &self.ca {
            Some(c) => vec![flag.to_string(), c.display().to_string()],
            None => vec!["--insecure-plaintext".to_string()],
        }
    }

    /// The flags that make a caller reach this authority (`--ca FILE` or
    /// `--insecure-plaintext`).
    pub fn tls_args(&self) -> Vec<String> {
        self.tls_flags("--ca")
    }

    /// A library client's configuration for this server: TLS pinned to its certificate, or
    /// clear text.
    pub fn config(&self) -> cryptonn::protocol::ClientConfig {
        cryptonn::protocol::ClientConfig {
            transport: match &self.ca {
                Some(c) => cryptonn::protocol::ClientTransport::pinned(c).expect("certificate"),
                None => cryptonn::protocol::ClientTransport::Plaintext,
            },
            ..cryptonn::protocol::ClientConfig::default()
        }
    }
}

fn plaintext(flags: &[&str]) -> bool {
    flags.contains(&"--insecure-plaintext")
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address a server prints as "listening on ADDR" among its first lines of standard
/// output, or `None` if it ends first.
fn listening_address(child: &mut Child) -> Option<String> {
    let stdout = child.stdout.take()?;
    BufReader::new(stdout)
        .lines()
        .take(50)
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("listening on ")
                .map(|a| a.trim().to_string())
        })
}

/// `trainer train --quiet` reaching the authority `a` (address, token and TLS flags).
pub fn train_with(a: &Served) -> Command {
    let mut c = Command::new(TRAINER);
    c.args([
        "train",
        "--quiet",
        "--authority",
        &a.addr,
        "--token",
        &a.token,
    ])
    .args(a.tls_args());
    c
}

/// Serves the key directory `dir` on a free loopback port, with `extra` serve flags.
pub fn serve(dir: &Path, extra: &[&str]) -> Served {
    serve_on(dir, "127.0.0.1:0", extra)
}

/// Serves the key directory `dir` on `listen` (an address a stopped authority had, to
/// restart it: retried for up to 5 s while the port is still taken), with `extra` serve
/// flags.
pub fn serve_on(dir: &Path, listen: &str, extra: &[&str]) -> Served {
    for _ in 0..50 {
        if let Some(s) = try_serve_on(dir, listen, extra) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the authority cannot listen on {listen}");
}

/// One attempt of [`serve_on`]: `None` if the authority exits before printing its address.
fn try_serve_on(dir: &Path, listen: &str, extra: &[&str]) -> Option<Served> {
    let mut child = Command::new(AUTHORITY)
        .args(["serve", "--listen", listen, "--quiet", "--dir"])
        .arg(dir)
        .args(extra)
        .env_remove("CRYPTONN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("authority starts");
    let Some(addr) = listening_address(&mut child) else {
        let _ = child.wait();
        return None;
    };
    let token = std::fs::read_to_string(dir.join("token"))
        .expect("token")
        .trim()
        .to_string();
    let ca = (!plaintext(extra)).then(|| dir.join("cert.pem"));
    Some(Served {
        child,
        addr,
        token,
        ca,
    })
}

/// `authority init` with `init` flags into `dir`, then [`serve`].
pub fn start_authority(dir: &Path, init: &[&str]) -> Served {
    run(Command::new(AUTHORITY)
        .arg("init")
        .args(init)
        .arg("--dir")
        .arg(dir));
    serve(dir, &[])
}

/// A running `trainer serve` for `model`, keyed by the authority `a`, on a free loopback port;
/// its clients' token is written to `dir/serve.token` (and its TLS certificate to
/// `dir/serve.pem`, unless `extra` has `--insecure-plaintext`, which `a` then needs too).
/// Its standard error is kept (see [`stop_service`]).
pub fn start_service(model: &Path, a: &Served, dir: &Path, extra: &[&str]) -> Served {
    let token_file = dir.join("serve.token");
    let mut child = Command::new(TRAINER)
        .args(["serve", "--listen", "127.0.0.1:0", "--authority", &a.addr])
        .args(["--token", &a.token])
        .args(if plaintext(extra) {
            Vec::new()
        } else {
            a.tls_args()
        })
        .arg("--model")
        .arg(model)
        .arg("--client-token-file")
        .arg(&token_file)
        .arg("--dlog-table")
        .arg(dir.join("dlog.bin"))
        .args(extra)
        .env_remove("CRYPTONN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("serve.err")).expect("stderr file"))
        .spawn()
        .expect("trainer serve starts");
    let Some(addr) = listening_address(&mut child) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "trainer serve did not start:\n{}",
            std::fs::read_to_string(dir.join("serve.err")).unwrap_or_default()
        );
    };
    let token = std::fs::read_to_string(&token_file)
        .expect("service token")
        .trim()
        .to_string();
    let ca = (!plaintext(extra)).then(|| token_file.with_extension("pem"));
    Served {
        child,
        addr,
        token,
        ca,
    }
}

/// Stops a process started by [`start_service`] in `dir` with SIGTERM, waits for it, and
/// returns its standard error.
pub fn stop_service(mut s: Served, dir: &Path) -> String {
    let _ = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status();
    for _ in 0..200 {
        if let Ok(Some(_)) = s.child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::read_to_string(dir.join("serve.err")).unwrap_or_default()
}

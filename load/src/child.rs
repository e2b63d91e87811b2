//! A `tailscope-server` child process, for the commands that measure or break a real server
//! (`bench`, `chaos`): started on given or ephemeral loopback ports, killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

/// A running server process.
pub struct ChildServer {
    child: Child,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its HTTP address.
    pub http: SocketAddr,
    /// Its OTLP/HTTP address.
    pub otlp_http: SocketAddr,
}

/// The server binary: `given`, or `tailscope-server` next to this binary.
pub fn server_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let bin = match given {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe()?.with_file_name("tailscope-server"),
    };
    if !bin.exists() {
        bail!(
            "no server binary at {} (build it with `cargo build --release -p tailscope-server`, or give --server-bin)",
            bin.display()
        );
    }
    Ok(bin)
}

impl ChildServer {
    /// Starts `bin` on `data` at the given addresses (`127.0.0.1:0` for ephemeral ports), with
    /// extra `TAILSCOPE_*` settings, and waits until it serves.
    pub fn start(
        bin: &Path,
        data: &Path,
        grpc: &str,
        http: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<ChildServer> {
        let mut child = Command::new(bin)
            .args([
                "--grpc-addr",
                grpc,
                "--http-addr",
                http,
                "--otlp-http-addr",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .arg("--data-dir")
            .arg(data)
            .env("TAILSCOPE_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut lines = BufReader::new(child.stderr.take().context("no stderr")?).lines();
        // The last lines it wrote, to say why if it exits before it starts (a bad setting).
        let mut last = std::collections::VecDeque::new();
        let started = loop {
            let Some(line) = lines.next() else {
                let _ = child.wait();
                bail!(
                    "the server exited before it started (ports {grpc} and {http}, data {}): {}",
                    data.display(),
                    Vec::from(last).join("\n")
                )
            };
            let line = line?;
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if last.len() == 5 {
                last.pop_front();
            }
            last.push_back(line);
            if v["fields"]["message"] == "tailscope started" {
                break v;
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            Ok(started["fields"][k].as_str().with_context(|| format!("no {k} in the start line"))?.parse()?)
        };
        Ok(ChildServer {
            grpc: addr("grpc_addr")?,
            http: addr("http_addr")?,
            otlp_http: addr("otlp_http_addr")?,
            child,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (a graceful shutdown: everything accepted is written first), and waits for it
    /// to exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?.success();
        anyhow::ensure!(sent, "kill -TERM {pid} failed");
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "the server exited with {status} after SIGTERM");
        Ok(())
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.kill();
    }
}

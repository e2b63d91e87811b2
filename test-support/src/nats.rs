//! A NATS JetStream cluster of real `nats-server` processes on loopback, for the cluster tests
//! and `tailscope-load chaos --cluster`: free ports, a temporary store directory per server,
//! ready once every server reports JetStream healthy.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::Peer;

/// One server of the cluster.
#[derive(Debug)]
pub struct NatsServer {
    /// Its name (`n1`, `n2`, ...), as JetStream names stream leaders.
    pub name: String,
    /// The client port.
    pub port: u16,
    /// The monitoring port (`/healthz`, `/jsz`).
    pub http_port: u16,
    config: PathBuf,
    /// The configuration without what [`NatsCluster::start_with`] added.
    base: String,
    process: Option<Peer>,
}

/// A cluster of `nats-server`s with JetStream.
#[derive(Debug)]
pub struct NatsCluster {
    /// The servers, in start order.
    pub servers: Vec<NatsServer>,
    bin: PathBuf,
}

/// A free loopback port (bound and released: another process could take it meanwhile, which
/// a server start would then report).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

impl NatsCluster {
    /// Starts `n` servers (`bin`: the `nats-server` program) with their stores under `dir`,
    /// routed to each other, and waits until each reports JetStream ready.
    ///
    /// A port picked free may be taken by another test before the server binds it (tests run
    /// side by side); a server that exits or never answers is started again, on new ports, up
    /// to three times.
    pub fn start(bin: &Path, dir: &Path, n: usize) -> NatsCluster {
        NatsCluster::start_with(bin, dir, n, "")
    }

    /// [`NatsCluster::start`] with `more` added to every server's configuration (`tls { ... }`,
    /// `authorization { ... }`).
    pub fn start_with(bin: &Path, dir: &Path, n: usize, more: &str) -> NatsCluster {
        let mut last = String::new();
        for attempt in 1..=3 {
            let mut cluster = NatsCluster::start_once(bin, &dir.join(format!("try{attempt}")), n, more);
            match cluster.ready(Instant::now() + Duration::from_secs(60)) {
                Ok(()) => return cluster,
                Err(e) => {
                    eprintln!("NATS cluster attempt {attempt}: {e}; starting again on new ports");
                    last = e;
                }
            }
        }
        panic!("no NATS cluster after three attempts: {last}");
    }

    fn start_once(bin: &Path, dir: &Path, n: usize, more: &str) -> NatsCluster {
        let ports: Vec<(u16, u16, u16)> = (0..n).map(|_| (free_port(), free_port(), free_port())).collect();
        std::fs::create_dir_all(dir).expect("create the NATS directory");
        let routes: Vec<String> = ports.iter().map(|p| format!("nats-route://127.0.0.1:{}", p.2)).collect();
        let mut servers = Vec::new();
        for (i, &(port, http_port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.join(&name);
            let config = dir.join(format!("{name}.conf"));
            let cluster = if n > 1 {
                format!(
                    "cluster {{ name: tailscope_test, listen: 127.0.0.1:{cluster_port}, routes: [{}] }}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let base = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http_port}\nmax_payload: 8MB\n\
                 jetstream {{ store_dir: {store:?}, max_memory_store: 256MB, max_file_store: 2GB }}\n{cluster}"
            );
            std::fs::write(&config, format!("{base}{more}\n")).expect("write nats-server config");
            servers.push(NatsServer { name, port, http_port, config, base, process: None });
        }
        let mut cluster = NatsCluster { servers, bin: bin.to_owned() };
        for i in 0..n {
            cluster.start_server(i);
        }
        cluster
    }

    /// Whether every running server answers `/healthz?js-enabled-only=true` by `deadline`;
    /// names the first that exited or did not.
    fn ready(&mut self, deadline: Instant) -> Result<(), String> {
        for s in self.servers.iter_mut() {
            let Some(process) = s.process.as_mut() else { continue };
            loop {
                let body = http_get(s.http_port, "/healthz?js-enabled-only=true").unwrap_or_default();
                if body.contains("\"ok\"") {
                    break;
                }
                if let Ok(Some(status)) = process.0.try_wait() {
                    return Err(format!("nats-server {} exited ({status}) before it was ready", s.name));
                }
                if Instant::now() > deadline {
                    return Err(format!("nats-server {} not ready: {body}", s.name));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Starts (or restarts, on its own store) server `i`.
    pub fn start_server(&mut self, i: usize) {
        let s = &mut self.servers[i];
        let log = s.config.with_extension("log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&s.config)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        s.process = Some(Peer(child));
    }

    /// Rewrites every server's configuration with `more` in place of what was added before,
    /// and has each running server reload it (SIGHUP), as an operator rotating credentials
    /// does.
    pub fn reconfigure(&mut self, more: &str) {
        for s in &self.servers {
            std::fs::write(&s.config, format!("{}{more}\n", s.base)).expect("write nats-server config");
            if let Some(p) = &s.process {
                let pid = p.0.id().to_string();
                let ok = Command::new("kill").args(["-HUP", &pid]).status().is_ok_and(|st| st.success());
                assert!(ok, "SIGHUP to nats-server {}", s.name);
            }
        }
    }

    /// SIGKILLs server `i`.
    pub fn kill(&mut self, i: usize) {
        self.servers[i].process = None;
    }

    /// The client URLs of every server, comma-separated (what `TAILSCOPE_CLUSTER_NATS` takes).
    pub fn urls(&self) -> String {
        self.servers.iter().map(|s| format!("nats://127.0.0.1:{}", s.port)).collect::<Vec<_>>().join(",")
    }

    /// The index of the server that leads stream `stream`, as a running server's `/jsz` says.
    pub fn leader_of(&self, stream: &str) -> Option<usize> {
        for s in self.servers.iter().filter(|s| s.process.is_some()) {
            let body: String = http_get(s.http_port, "/jsz?accounts=true&streams=true")
                .unwrap_or_default()
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            // `"name":"<stream>"` ... `"leader":"nX"` within the stream's detail.
            let Some(at) = body.find(&format!("\"name\":\"{stream}\"")) else { continue };
            // The stream's cluster comes before its state.
            let rest = &body[at..];
            let rest = rest.find("\"state\"").map_or(rest, |end| &rest[..end]);
            let Some(l) = rest.find("\"leader\":\"") else { continue };
            let leader: String = rest[l + 10..].chars().take_while(|&c| c != '"').collect();
            if let Some(i) = self.servers.iter().position(|s| s.name == leader) {
                return Some(i);
            }
        }
        None
    }
}

/// A plain HTTP/1.0 GET on loopback; the body.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

//! Test support shared by the server's, the client's and the load tool's tests.
//!
//! - [`assert_eventually!`]: polls a condition until it holds instead of
//!   sleeping a fixed time, so a test waits as long as a slow machine needs and no longer;
//! - [`peers`] and [`on_path`]: the real peer programs the tests run against;
//! - [`Peer`]: a child process killed when the test ends, however it ends;
//! - [`proc_status_bytes`]: a process's memory as `/proc` reports it.
//! - [`nats`]: a NATS JetStream cluster of real `nats-server`s on loopback.
#![allow(clippy::unwrap_used)]

pub mod nats;

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

/// How long [`assert_eventually!`] waits by default.
pub const EVENTUALLY: Duration = Duration::from_secs(30);

/// Polls `$cond` (an expression yielding bool, which may `.await`) every 20 ms until it holds,
/// and panics with the message after 30 s, or after `within = DURATION;` when given.
#[macro_export]
macro_rules! assert_eventually {
    (within = $within:expr; $cond:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + $within;
        loop {
            if $cond { break; }
            if std::time::Instant::now() > deadline { panic!($($msg)+); }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
    ($cond:expr, $($msg:tt)+) => {
        $crate::assert_eventually!(within = $crate::EVENTUALLY; $cond, $($msg)+)
    };
}

/// `name` from PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Real peer programs from PATH (`package` is the Debian package that has them). Missing ones
/// fail the test, unless `TAILSCOPE_SKIP_PEERS` is set (then it is skipped, saying so).
pub fn peers(names: &[&str], package: &str) -> Option<Vec<PathBuf>> {
    let found: Option<Vec<_>> = names.iter().map(|n| on_path(n)).collect();
    match found {
        Some(paths) => Some(paths),
        None if std::env::var_os("TAILSCOPE_SKIP_PEERS").is_some() => {
            eprintln!("SKIPPED: {names:?} not on PATH and TAILSCOPE_SKIP_PEERS is set");
            None
        }
        None => panic!(
            "{names:?} are needed on PATH: install Debian's `{package}` package (.ci/run does), \
             or set TAILSCOPE_SKIP_PEERS=1 to skip the tests against real peers"
        ),
    }
}

/// A `/proc/<pid>/status` field in kB (`VmRSS:`, `VmHWM:`), as bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Peer(pub Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_condition_is_awaited_until_it_holds_and_not_forever() {
        let polls = AtomicU32::new(0);
        assert_eventually!(polls.fetch_add(1, Ordering::Relaxed) >= 3, "never held");
        assert!(polls.load(Ordering::Relaxed) >= 4);
        let result = tokio::spawn(async {
            assert_eventually!(within = Duration::from_millis(30); false, "gave up as told");
        })
        .await;
        assert!(result.unwrap_err().is_panic());
    }

    #[test]
    fn programs_are_found_on_path_and_memory_is_read_from_proc() {
        assert!(on_path("sh").is_some());
        assert!(on_path("no-such-program-anywhere").is_none());
        assert!(proc_status_bytes(std::process::id(), "VmRSS:") > 0);
        let mut peer = Peer(std::process::Command::new("sleep").arg("30").spawn().unwrap());
        let pid = peer.0.id();
        assert!(peer.0.try_wait().unwrap().is_none());
        drop(peer);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                stat.contains(") Z ")
            }
        );
    }
}

/// Certificates made for a test: a CA, a server certificate for `localhost` and `127.0.0.1`,
/// a client certificate, both signed by the CA, written as PEM files into a directory.
pub mod pki {
    use std::path::{Path, PathBuf};

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    /// The files of one certificate authority's certificates.
    #[derive(Debug, Clone)]
    pub struct Pki {
        /// The CA's certificate and key, to issue more ([`Pki::issue_client`]).
        issuer: std::sync::Arc<Issuer>,
        dir: PathBuf,
        prefix: String,
        /// The CA certificate (trust it to verify the others).
        pub ca: PathBuf,
        /// The server certificate and its key.
        pub server_cert: PathBuf,
        /// The server key.
        pub server_key: PathBuf,
        /// A client certificate and its key.
        pub client_cert: PathBuf,
        /// The client key.
        pub client_key: PathBuf,
    }

    /// A CA's certificate and key.
    struct Issuer(rcgen::Certificate, KeyPair);

    impl std::fmt::Debug for Issuer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Issuer")
        }
    }

    impl Pki {
        /// A new CA and its certificates, written into `dir` with `prefix` before each name.
        pub fn new(dir: &Path, prefix: &str) -> Pki {
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params.distinguished_name.push(DnType::CommonName, format!("{prefix} test CA"));
            let ca_key = KeyPair::generate().unwrap();
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let leaf = |names: Vec<String>, cn: &str| {
                let mut params = CertificateParams::new(names).unwrap();
                params.distinguished_name.push(DnType::CommonName, cn);
                let key = KeyPair::generate().unwrap();
                let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
                (cert.pem(), key.serialize_pem())
            };
            let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "tailscope");
            let (client_cert, client_key) = leaf(vec!["client.test".into()], "a client");
            let write = |name: &str, pem: &str| {
                let path = dir.join(format!("{prefix}{name}"));
                std::fs::write(&path, pem).unwrap();
                path
            };
            Pki {
                dir: dir.to_owned(),
                prefix: prefix.to_owned(),
                ca: write("ca.pem", &ca.pem()),
                server_cert: write("server.pem", &server_cert),
                server_key: write("server-key.pem", &server_key),
                client_cert: write("client.pem", &client_cert),
                client_key: write("client-key.pem", &client_key),
                issuer: std::sync::Arc::new(Issuer(ca, ca_key)),
            }
        }

        /// Another client certificate of this CA, for `common_name`, written as
        /// `<prefix><name>.pem` and `<prefix><name>-key.pem`: (certificate, key).
        pub fn issue_client(&self, name: &str, common_name: &str) -> (PathBuf, PathBuf) {
            let mut params = CertificateParams::new(vec![format!("{name}.test")]).unwrap();
            params.distinguished_name.push(DnType::CommonName, common_name);
            let key = KeyPair::generate().unwrap();
            let Issuer(ca, ca_key) = &*self.issuer;
            let cert = params.signed_by(&key, ca, ca_key).unwrap();
            let write = |file: String, pem: String| {
                let path = self.dir.join(format!("{}{file}", self.prefix));
                std::fs::write(&path, pem).unwrap();
                path
            };
            (write(format!("{name}.pem"), cert.pem()), write(format!("{name}-key.pem"), key.serialize_pem()))
        }
    }
}

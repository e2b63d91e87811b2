use tailscope_test_support::pki::Pki;

use super::*;

fn web_config(dir: &Path, yaml: &str) -> PathBuf {
    let path = dir.join("web.yml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn error(dir: &Path, yaml: &str) -> String {
    match Tls::load(&web_config(dir, yaml)) {
        Err(e) => e.to_string(),
        Ok(t) => panic!("accepted: {yaml}: {t:?}"),
    }
}

#[test]
fn a_prometheus_web_config_gives_tls_and_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "");
    // Relative paths are relative to the file.
    let plain =
        web_config(dir.path(), "tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\n");
    let tls = Tls::load(&plain).unwrap().expect("TLS configured");
    assert_eq!(tls.acceptor(Alpn::H2).config().alpn_protocols, [b"h2".to_vec()]);
    assert_eq!(tls.acceptor(Alpn::Http1).config().alpn_protocols, [b"http/1.1".to_vec()]);
    let mutual = format!(
        "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n  min_version: TLS13\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display()
    );
    assert!(Tls::load(&web_config(dir.path(), &mutual)).unwrap().is_some());
    // A file without tls_server_config serves plaintext.
    assert!(Tls::load(&web_config(dir.path(), "{}\n")).unwrap().is_none());
}

#[test]
fn bad_web_configs_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "");
    let other = Pki::new(dir.path(), "other-");
    let base = format!(
        "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
        pki.server_cert.display(),
        pki.server_key.display()
    );
    for (yaml, want) in [
        ("http_server_config: {http2: false}\n".to_string(), "unknown field `http_server_config`"),
        (
            format!("{base}  client_auth_type: RequireAndVerifyClientCert\n"),
            "client_ca_file: required by client_auth_type",
        ),
        (
            format!("{base}  client_auth_type: RequireAnyClientCert\n"),
            "RequireAnyClientCert (a certificate taken unverified) is not supported",
        ),
        (format!("{base}  client_auth_type: Sometimes\n"), "client_auth_type: unknown \"Sometimes\""),
        (format!("{base}  min_version: TLS11\n"), "min_version: \"TLS11\" is not TLS12 or TLS13"),
        (format!("{base}  min_version: TLS13\n  max_version: TLS12\n"), "min_version is above max_version"),
        (
            "tls_server_config:\n  cert_file: nowhere.pem\n  key_file: nowhere.pem\n".to_string(),
            "nowhere.pem: No such file",
        ),
        (
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                pki.server_cert.display(),
                other.server_key.display()
            ),
            "the key does not fit the certificate",
        ),
        (
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                pki.server_key.display(),
                pki.server_key.display()
            ),
            "cert_file",
        ),
    ] {
        let e = error(dir.path(), &yaml);
        assert!(e.contains(want), "{yaml}\n  gave {e}\n  want {want}");
    }
}

#[test]
fn a_reload_takes_a_rotated_certificate_and_a_failed_one_keeps_the_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let first = Pki::new(dir.path(), "");
    let path =
        web_config(dir.path(), "tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\n");
    let tls = Tls::load(&path).unwrap().unwrap();
    let served = |tls: &Tls| format!("{:?}", tls.acceptor(Alpn::H2).config().cert_resolver);
    let before = served(&tls);
    // Rotated on disk: another CA's certificate under the same names.
    let second = Pki::new(dir.path(), "next-");
    std::fs::copy(&second.server_cert, &first.server_cert).unwrap();
    std::fs::copy(&second.server_key, &first.server_key).unwrap();
    tls.reload().unwrap();
    let after = served(&tls);
    assert_ne!(before, after, "the new certificate is served");
    // A broken file: the reload fails naming it, the rotated certificate stays.
    std::fs::write(&first.server_key, "not a key").unwrap();
    let e = tls.reload().unwrap_err().to_string();
    assert!(e.contains("key_file"), "{e}");
    assert_eq!(served(&tls), after);
}

use super::*;

fn on(dir: &Path) -> ClusterConfig {
    ClusterConfig {
        nats: vec!["nats://127.0.0.1:4222".into()],
        node_id: "a".into(),
        tls_ca_file: dir.join("ca.pem"),
        ..ClusterConfig::default()
    }
}

/// The key and the message of the error loading `config` gives.
fn refused(config: &ClusterConfig) -> (&'static str, String) {
    match NatsAccess::load(config) {
        Err(ClusterError::Access { key, error }) => (key, error.to_string()),
        other => panic!("expected a file error, got {other:?}"),
    }
}

#[test]
fn certificates_and_secrets_are_read_once_and_a_bad_file_is_named_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tailscope_test_support::pki::Pki::new(dir.path(), "");
    let mut config = on(dir.path());
    config.tls_cert_file = pki.client_cert.clone();
    config.tls_key_file = pki.client_key.clone();
    std::fs::write(dir.path().join("password"), "s3cret\n").unwrap();
    config.user = "tailscope".into();
    config.password_file = dir.path().join("password");
    let access = NatsAccess::load(&config).unwrap();
    // What is printed never holds the password.
    let shown = format!("{access:?}");
    assert!(shown.contains("tls: true") && shown.contains("user \"tailscope\""), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");

    // A CA file that is missing, or holds no certificate.
    let (key, message) =
        refused(&ClusterConfig { tls_ca_file: dir.path().join("none.pem"), ..config.clone() });
    assert_eq!(key, "tls_ca_file");
    assert!(message.contains("none.pem"), "{message}");
    std::fs::write(dir.path().join("empty.pem"), "not a certificate").unwrap();
    let (key, message) =
        refused(&ClusterConfig { tls_ca_file: dir.path().join("empty.pem"), ..config.clone() });
    assert_eq!((key, message.contains("no certificate")), ("tls_ca_file", true), "{message}");
    // A key that is not the certificate's.
    let (key, message) = refused(&ClusterConfig { tls_key_file: pki.server_key.clone(), ..config.clone() });
    assert_eq!(key, "tls_key_file");
    assert!(message.contains("does not fit"), "{message}");
    // An empty password file, a missing token file, a seed that is not one.
    std::fs::write(dir.path().join("blank"), " \n").unwrap();
    let (key, message) =
        refused(&ClusterConfig { password_file: dir.path().join("blank"), ..config.clone() });
    assert_eq!((key, message.contains("empty")), ("password_file", true), "{message}");
    let anonymous = ClusterConfig { user: String::new(), password_file: PathBuf::new(), ..config.clone() };
    let (key, _) = refused(&ClusterConfig { token_file: dir.path().join("no-token"), ..anonymous.clone() });
    assert_eq!(key, "token_file");
    std::fs::write(dir.path().join("seed"), "SUNOTASEED").unwrap();
    let (key, message) =
        refused(&ClusterConfig { nkey_seed_file: dir.path().join("seed"), ..anonymous.clone() });
    assert_eq!(key, "nkey_seed_file");
    assert!(message.contains("not an nkey seed"), "{message}");
    let user = nkeys::KeyPair::new_user();
    std::fs::write(dir.path().join("seed"), user.seed().unwrap()).unwrap();
    let access =
        NatsAccess::load(&ClusterConfig { nkey_seed_file: dir.path().join("seed"), ..anonymous.clone() })
            .unwrap();
    assert!(format!("{access:?}").contains("nkey"));
    // A credentials file: its JWT and seed between the fences, or refused naming the key.
    let creds = dir.path().join("node.creds");
    std::fs::write(&creds, "just a JWT, no fences\n").unwrap();
    let (key, message) = refused(&ClusterConfig { credentials_file: creds.clone(), ..anonymous.clone() });
    assert_eq!(key, "credentials_file");
    assert!(message.contains("no user JWT and nkey seed"), "{message}");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAi.e30.c2ln\n------END NATS USER JWT------\n\n\
             ***** IMPORTANT *****\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let access = NatsAccess::load(&ClusterConfig { credentials_file: creds, ..anonymous }).unwrap();
    assert!(format!("{access:?}").contains("credentials file"));
}

#[test]
fn the_servers_are_verified_against_the_ca_the_file_holds_at_each_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        tailscope_test_support::pki::Pki::new(dir.path(), "a-"),
        tailscope_test_support::pki::Pki::new(dir.path(), "b-"),
    );
    let leaf = |pki: &tailscope_test_support::pki::Pki| {
        pem::certificates(&std::fs::read(&pki.server_cert).unwrap()).unwrap().remove(0)
    };
    let ca = dir.path().join("ca.pem");
    std::fs::copy(&a.ca, &ca).unwrap();
    let roots = ServerRoots::load(ca.clone(), Arc::new(rustls::crypto::ring::default_provider())).unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let verify = |pki| roots.verify_server_cert(&leaf(pki), &[], &name, &[], UnixTime::now());
    assert!(verify(&a).is_ok());
    assert!(verify(&b).is_err(), "a server of another CA was trusted");
    // The file now holds the other CA: trusted from the next handshake on, the first not.
    std::fs::copy(&b.ca, &ca).unwrap();
    assert!(verify(&b).is_ok());
    assert!(verify(&a).is_err());
    // A file that cannot be read then keeps the CA last read.
    std::fs::write(&ca, "garbage").unwrap();
    assert!(verify(&b).is_ok());
    assert!(verify(&a).is_err());
    // The name is checked too.
    let other = ServerName::try_from("example.com").unwrap();
    assert!(roots.verify_server_cert(&leaf(&b), &[], &other, &[], UnixTime::now()).is_err());
}

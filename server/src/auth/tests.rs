use base64::Engine as _;

use super::*;

fn basic_header(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// A web configuration with `alice` (reads), `bob` (writes) and `ops` (admin), and a token file.
fn setup(dir: &Path, config: impl FnOnce(&mut AuthConfig)) -> (Auth, Arc<Metrics>) {
    let hash = |p: &str| bcrypt::hash(p, 4).unwrap();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "basic_auth_users:\n  alice: {}\n  bob: {}\n  ops: {}\n",
            hash("alice-pw"),
            hash("bob-pw"),
            hash("ops-pw")
        ),
    )
    .unwrap();
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "# writers\ns3cret-one\n\n  s3cret-two  \n").unwrap();
    let mut c = AuthConfig {
        ingest_token_files: vec![tokens],
        write_users: vec!["bob".into(), "ops".into()],
        admin_users: vec!["ops".into()],
        enable_lifecycle: true,
    };
    config(&mut c);
    let metrics = Arc::new(Metrics::new());
    (Auth::load(&c, Some(&web), metrics.clone()).unwrap(), metrics)
}

#[test]
fn users_read_writers_write_admins_reload_and_the_rest_is_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (auth, metrics) = setup(dir.path(), |_| {});
    let alice = basic_header("alice", "alice-pw");
    let bob = basic_header("bob", "bob-pw");
    let ops = basic_header("ops", "ops-pw");
    assert_eq!(auth.check_http(Some(&alice), Access::Read), Ok(()));
    assert_eq!(auth.check_http(Some(&alice), Access::Write), Err(Refusal::Forbidden("alice".into())));
    assert_eq!(auth.check_http(Some(&bob), Access::Write), Ok(()));
    assert_eq!(auth.check_http(Some(&bob), Access::Admin), Err(Refusal::Forbidden("bob".into())));
    assert_eq!(auth.check_http(Some(&ops), Access::Admin), Ok(()));
    assert_eq!(auth.check_http(None, Access::Read), Err(Refusal::Missing));
    assert_eq!(auth.check_http(Some(&basic_header("alice", "wrong")), Access::Read), Err(Refusal::Invalid));
    assert_eq!(auth.check_http(Some(&basic_header("mallory", "x")), Access::Read), Err(Refusal::Invalid));
    assert_eq!(auth.check_http(Some("Basic !!!"), Access::Read), Err(Refusal::Invalid));
    assert_eq!(auth.check_http(Some("Bearer s3cret-one"), Access::Read), Err(Refusal::Invalid));
    // A verified password is remembered; a wrong one for the same user still fails.
    assert_eq!(auth.check_http(Some(&alice), Access::Read), Ok(()));
    assert_eq!(
        auth.check_http(Some(&basic_header("alice", "alice-pw2")), Access::Read),
        Err(Refusal::Invalid)
    );
    let text = metrics.encode();
    for (reason, n) in [("forbidden", 2), ("missing", 1), ("invalid", 5)] {
        let line = format!("tailscope_auth_failures_total{{listener=\"http\",reason=\"{reason}\"}} {n}");
        assert!(text.contains(&line), "{line}\n{text}");
    }
    assert!(!text.contains("alice-pw"), "no secret in the metrics");
}

#[test]
fn ingest_takes_any_listed_token_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (auth, _) = setup(dir.path(), |_| {});
    let one = auth.check_ingest(Some("Bearer s3cret-one"), "grpc").unwrap().expect("a credential");
    let two = auth.check_ingest(Some("bearer   s3cret-two"), "grpc").unwrap().expect("a credential");
    assert_ne!(one, two, "each token is its own credential");
    assert_eq!(auth.check_ingest(Some("Bearer s3cret-one"), "grpc"), Ok(Some(one)));
    assert_eq!(auth.check_ingest(Some("Bearer s3cret"), "grpc"), Err(Refusal::Invalid));
    assert_eq!(auth.check_ingest(Some("Bearer # writers"), "grpc"), Err(Refusal::Invalid));
    assert_eq!(auth.check_ingest(Some("s3cret-one"), "grpc"), Err(Refusal::Invalid));
    assert_eq!(auth.check_ingest(None, "otlp_http"), Err(Refusal::Missing));
    // A token file rewritten and reloaded: the old token is gone, the new one works.
    std::fs::write(dir.path().join("tokens"), "rotated\n").unwrap();
    auth.reload().unwrap();
    assert_eq!(auth.check_ingest(Some("Bearer s3cret-one"), "grpc"), Err(Refusal::Invalid));
    assert!(auth.check_ingest(Some("Bearer rotated"), "grpc").unwrap().is_some());
}

#[test]
fn without_credentials_everything_but_the_lifecycle_is_open() {
    let metrics = Arc::new(Metrics::new());
    let open = Auth::load(&AuthConfig::default(), None, metrics.clone()).unwrap();
    assert_eq!(open.check_http(None, Access::Read), Ok(()));
    assert_eq!(open.check_http(None, Access::Write), Ok(()));
    assert_eq!(open.check_ingest(None, "grpc"), Ok(None));
    assert_eq!(open.check_http(None, Access::Admin), Err(Refusal::LifecycleDisabled));
    let lifecycle = AuthConfig { enable_lifecycle: true, ..AuthConfig::default() };
    assert_eq!(Auth::load(&lifecycle, None, metrics).unwrap().check_http(None, Access::Admin), Ok(()));
}

#[test]
fn bad_credentials_files_are_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.yml");
    let metrics = Arc::new(Metrics::new());
    std::fs::write(&web, "basic_auth_users:\n  alice: plaintext\n").unwrap();
    let e = Auth::load(&AuthConfig::default(), Some(&web), metrics.clone()).unwrap_err().to_string();
    assert!(e.contains("basic_auth_users.alice: not a bcrypt hash"), "{e}");
    std::fs::write(&web, format!("basic_auth_users:\n  alice: {}\n", bcrypt::hash("x", 4).unwrap())).unwrap();
    let c = AuthConfig { write_users: vec!["bob".into()], ..AuthConfig::default() };
    let e = Auth::load(&c, Some(&web), metrics.clone()).unwrap_err().to_string();
    assert!(e.contains("auth.write_users names \"bob\", who is not among basic_auth_users"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "# nothing\n").unwrap();
    let c = AuthConfig { ingest_token_files: vec![empty], ..AuthConfig::default() };
    assert!(Auth::load(&c, None, metrics.clone()).unwrap_err().to_string().contains("no token in it"));
    let c = AuthConfig { ingest_token_files: vec![dir.path().join("missing")], ..AuthConfig::default() };
    assert!(Auth::load(&c, None, metrics).unwrap_err().to_string().contains("missing"));
}

#[test]
fn requests_are_classed_as_read_write_or_admin() {
    use axum::http::Method;
    assert_eq!(access_of(&Method::POST, "/-/reload"), Access::Admin);
    assert_eq!(access_of(&Method::POST, "/api/v2/silences"), Access::Write);
    assert_eq!(access_of(&Method::DELETE, "/api/v2/silence/abc"), Access::Write);
    assert_eq!(access_of(&Method::POST, "/api/v2/alerts"), Access::Write);
    assert_eq!(access_of(&Method::GET, "/api/v2/alerts"), Access::Read);
    // A query by POST only reads.
    assert_eq!(access_of(&Method::POST, "/api/v1/query"), Access::Read);
    assert_eq!(access_of(&Method::GET, "/metrics"), Access::Read);
}

use super::*;

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn the_example_file_parses_to_the_defaults() {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tailscope.example.toml"));
    let config = Config::load(Some(path), env(&[]), &Overrides::default()).expect("example parses");
    assert_eq!(config, Config::default());
}

#[test]
fn unknown_keys_name_the_key_and_the_file() {
    let err = Config::from_toml("[ingest]\nshardz = 3\n", Path::new("/etc/tailscope.toml"))
        .expect_err("unknown key");
    let msg = err.to_string();
    assert!(msg.contains("/etc/tailscope.toml"), "{msg}");
    assert!(msg.contains("shardz"), "{msg}");
    assert!(msg.contains("line 2"), "{msg}");
}

#[test]
fn wrong_types_and_bad_durations_are_errors() {
    let msg = Config::from_toml("[ingest]\nflush_interval = \"soon\"\n", Path::new("t.toml"))
        .expect_err("bad duration")
        .to_string();
    assert!(msg.contains("flush_interval") || msg.contains("line 2"), "{msg}");
    assert!(Config::from_toml("[server]\ngrpc_addr = 4317\n", Path::new("t.toml")).is_err());
}

#[test]
fn env_overrides_the_file_and_flags_override_env() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[server]\nhttp_addr = \"127.0.0.1:1000\"\n[ingest]\nshards = 2\n").expect("write");
    let vars = env(&[
        ("TAILSCOPE_HTTP_ADDR", "127.0.0.1:2000"),
        ("TAILSCOPE_INGEST_SHARDS", "3"),
        ("TAILSCOPE_INGEST_FLUSH_INTERVAL", "250ms"),
        ("TAILSCOPE_DATA_DIR", "/tmp/from-env"),
        ("TAILSCOPE_LOG", "debug"),
        ("TAILSCOPE_CLUSTER_NATS", "nats://127.0.0.1:4222, nats://127.0.0.1:4223"),
        ("TAILSCOPE_CLUSTER_NODE_ID", "node-1"),
        ("PATH", "/bin"),
    ]);
    let flags = Overrides { data_dir: Some("/tmp/from-flag".into()), ..Overrides::default() };
    let c = Config::load(Some(&file), vars, &flags).expect("load");
    assert_eq!(c.server.http_addr.port(), 2000);
    assert_eq!(c.ingest.shards, 3);
    assert_eq!(c.ingest.flush_interval, Duration::from_millis(250));
    assert_eq!(c.server.data_dir, PathBuf::from("/tmp/from-flag"));
    // A list from the environment is comma-separated.
    assert_eq!(c.cluster.nats, ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]);
    assert!(c.cluster.enabled());
}

#[test]
fn env_errors_name_the_variable() {
    let err = Config::load(None, env(&[("TAILSCOPE_INGEST_SHARDS", "many")]), &Overrides::default())
        .expect_err("not a number");
    assert!(err.to_string().contains("TAILSCOPE_INGEST_SHARDS"), "{err}");
    let err = Config::load(None, env(&[("TAILSCOPE_NO_SUCH_THING", "1")]), &Overrides::default())
        .expect_err("unknown");
    assert!(err.to_string().contains("TAILSCOPE_NO_SUCH_THING"), "{err}");
    let err = Config::load(None, env(&[("TAILSCOPE_INGEST_FLUSH_INTERVAL", "often")]), &Overrides::default())
        .expect_err("bad duration");
    assert!(err.to_string().contains("TAILSCOPE_INGEST_FLUSH_INTERVAL"), "{err}");
}

#[test]
fn out_of_range_values_name_the_key() {
    let c = Config {
        histogram: HistogramConfig { significant_digits: 9, ..HistogramConfig::default() },
        ..Config::default()
    };
    assert!(c.validate().expect_err("digits").to_string().contains("histogram"));
    let mut c = Config::default();
    c.ingest.queue_capacity = 1;
    assert!(c.validate().expect_err("capacity").to_string().contains("ingest.queue_capacity"));
}

#[test]
fn the_effective_config_prints_as_toml_that_parses_back() {
    let c = Config::default();
    assert_eq!(Config::from_toml(&c.to_toml(), Path::new("printed")).expect("round trip"), c);
}

#[test]
fn remote_write_targets_parse_and_bad_ones_name_the_key() {
    let text = "[[remote_write]]\nurl = \"http://127.0.0.1:9090/api/v1/write\"\nhistograms = \"both\"\nsend_interval = \"15s\"\n\
                [[remote_write]]\nname = \"mimir\"\nurl = \"https://mimir.example/api/v1/push\"\n";
    let config = Config::from_toml(text, Path::new("t.toml")).expect("parses");
    assert_eq!(config.remote_write.len(), 2);
    assert_eq!(config.remote_write[0].histograms, crate::remote_write::HistogramForm::Both);
    assert_eq!(config.remote_write[0].send_interval, Duration::from_secs(15));
    assert_eq!(config.remote_write[0].display_name(), "127.0.0.1:9090");
    config.validate().expect("valid");
    let twice = Config::from_toml(
        "[[remote_write]]\nurl = \"http://a:1/w\"\n[[remote_write]]\nurl = \"http://a:1/x\"\n",
        Path::new("t.toml"),
    )
    .expect("parses");
    let err = twice.validate().expect_err("same name twice").to_string();
    assert!(err.contains("remote_write") && err.contains("used twice"), "{err}");
    let bad = Config::from_toml(
        "[[remote_write]]\nurl = \"http://a:1/w\"\nnative_schema = 12\n",
        Path::new("t.toml"),
    )
    .expect("parses");
    let err = bad.validate().expect_err("schema").to_string();
    assert!(err.contains("remote_write") && err.contains("native_schema"), "{err}");
    let err = Config::from_toml(
        "[[remote_write]]\nurl = \"http://a:1/w\"\nhistogram = \"native\"\n",
        Path::new("t.toml"),
    )
    .expect_err("unknown key")
    .to_string();
    assert!(err.contains("histogram"), "{err}");
}

use super::*;

/// The server built beside this test binary (`target/<profile>/tailscope-server`).
fn built_server() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    server_bin(Some(&exe.parent().and_then(Path::parent).unwrap().join("tailscope-server"))).unwrap()
}

/// The loader keeps what tailscope has not acknowledged and, when its stream ends in a way that
/// asks for a backoff (here: the server killed mid-load, then back on the same data and ports),
/// resends it from the watermark: every span counted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loader_resends_from_the_watermark_across_a_server_killed_and_restarted() {
    let bin = built_server();
    let dir = tempfile::tempdir().unwrap();
    let mut first = ChildServer::start(&bin, dir.path(), "127.0.0.1:0", "127.0.0.1:0", &[]).unwrap();
    let (grpc, http) = (first.grpc, first.http);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
    let mut ingest = Ingest::connect(grpc).await.unwrap();
    let batches = 40u64;
    let mut restarted = None;
    for b in 0..batches {
        let spans = (0..BATCH_SPANS as i64)
            .map(|i| Span {
                span_id: (b << 32) | i as u64,
                start_unix_nanos: now - 2_000_000_000 + i,
                duration_nanos: 1_000_000 + i * 1_000,
                adjusted_count: 1.0,
                ..Default::default()
            })
            .collect();
        let key =
            SeriesKey { service: "loader".into(), operation: format!("op{}", b % 4), ..Default::default() };
        ingest.push(SeriesGroup { key: Some(key), spans }).await.unwrap();
        if b == batches / 2 {
            // Killed with batches in flight; back a second later on the same data and ports.
            first.kill();
            let (bin, data) = (bin.clone(), dir.path().to_owned());
            restarted = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(1));
                ChildServer::start(&bin, &data, &grpc.to_string(), &http.to_string(), &[]).unwrap()
            }));
        }
    }
    let refusals = ingest.finish().await.unwrap();
    let _second = restarted.unwrap().join().unwrap();
    assert!(refusals > 0, "the loader never backed off");

    let at = (now / 1_000_000_000 + 60).to_string();
    let query = "sum(increase(span_duration_seconds_count[10m]))".to_owned();
    let data = tailscope_load::api::api(
        &reqwest::Client::new(),
        &format!("http://{http}"),
        "/api/v1/query",
        &[("query", query), ("time", at)],
    )
    .await
    .unwrap();
    let counted: f64 =
        data["result"][0]["value"][1].as_str().unwrap_or_else(|| panic!("{data}")).parse().unwrap();
    assert_eq!(
        counted,
        (batches as usize * BATCH_SPANS) as f64,
        "every span once, after {refusals} backoffs"
    );
}

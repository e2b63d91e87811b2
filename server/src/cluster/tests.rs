use super::*;

#[test]
fn a_client_key_is_per_partition_and_never_the_anonymous_client() {
    assert_eq!(client_key(0, 3), 0);
    assert_ne!(client_key(7, 0), client_key(7, 1));
    assert_ne!(client_key(7, 0), 0);
    assert_eq!(client_key(7, 2), client_key(7, 2));
    // One partition's keys are one range, the ranges of two partitions apart.
    for p in [0, 1, 2, 1023] {
        for client in [1, 7, u64::MAX] {
            assert!(clients_of(p).contains(&client_key(client, p)), "client {client}, partition {p}");
        }
    }
    assert_eq!(clients_of(1).end, clients_of(2).start);
    assert!(!clients_of(0).contains(&client_key(7, 1)));
}

#[test]
fn cluster_settings_are_checked_only_when_it_is_on() {
    let off = ClusterConfig { node_id: String::new(), ..ClusterConfig::default() };
    assert!(off.validate().is_ok());
    let on = |f: fn(&mut ClusterConfig)| {
        let mut c = ClusterConfig {
            nats: vec!["nats://127.0.0.1:4222".into()],
            node_id: "a".into(),
            ..ClusterConfig::default()
        };
        f(&mut c);
        c.validate().err().map(|(key, _)| key)
    };
    assert_eq!(on(|_| {}), None);
    assert_eq!(on(|c| c.node_id.clear()), Some("cluster.node_id"));
    assert_eq!(on(|c| c.node_id = "a.b".into()), Some("cluster.node_id"));
    assert_eq!(on(|c| c.partitions = 0), Some("cluster.partitions"));
    assert_eq!(on(|c| c.stream_replicas = 2), Some("cluster.stream_replicas"));
    assert_eq!(on(|c| c.nats = vec!["::nonsense::".into()]), Some("cluster.nats"));
    assert_eq!(on(|c| c.roles.clear()), Some("cluster.roles"));
    assert_eq!(on(|c| c.roles = vec![Role::Gateway]), None);
    assert_eq!(on(|c| c.roles = vec![Role::Store]), None);
    // Query and ruler nodes need no store of their own: they read from the owners.
    assert_eq!(on(|c| c.roles = vec![Role::Gateway, Role::Query]), None);
    assert_eq!(on(|c| c.roles = vec![Role::Ruler]), None);
    assert_eq!(on(|c| c.replication_factor = 0), None);
    assert_eq!(on(|c| c.replication_factor = 65), Some("cluster.replication_factor"));
    assert_eq!(on(|c| c.strong_read_timeout = Duration::ZERO), Some("cluster.strong_read_timeout"));
    assert_eq!(
        on(|c| c.strong_read_timeout = Duration::from_secs(3600)),
        Some("cluster.strong_read_timeout")
    );
    assert_eq!(on(|c| c.strong_read_timeout = Duration::from_millis(250)), None);
    assert_eq!(on(|c| c.drain_timeout = Duration::from_secs(3600)), Some("cluster.drain_timeout"));
    assert_eq!(on(|c| c.drain_timeout = Duration::ZERO), None);
    // How the node proves itself to NATS: whole, and one way at a time.
    assert_eq!(on(|c| c.tls_cert_file = "c.pem".into()), Some("cluster.tls_key_file"));
    assert_eq!(on(|c| c.tls_key_file = "k.pem".into()), Some("cluster.tls_cert_file"));
    fn client_cert(c: &mut ClusterConfig) {
        c.tls_cert_file = "c.pem".into();
        c.tls_key_file = "k.pem".into();
    }
    assert_eq!(on(client_cert), Some("cluster.tls_ca_file"));
    assert_eq!(
        on(|c| {
            client_cert(c);
            c.tls_ca_file = "ca.pem".into();
        }),
        None
    );
    assert_eq!(on(|c| c.tls_ca_file = "ca.pem".into()), None);
    assert_eq!(on(|c| c.user = "ts".into()), Some("cluster.password_file"));
    assert_eq!(on(|c| c.password_file = "p".into()), Some("cluster.user"));
    fn user(c: &mut ClusterConfig) {
        c.user = "ts".into();
        c.password_file = "p".into();
    }
    assert_eq!(on(user), None);
    assert_eq!(on(|c| c.token_file = "t".into()), None);
    assert_eq!(on(|c| c.nkey_seed_file = "s".into()), None);
    assert_eq!(on(|c| c.credentials_file = "n.creds".into()), None);
    assert_eq!(
        on(|c| {
            c.nkey_seed_file = "s".into();
            c.credentials_file = "n.creds".into();
        }),
        Some("cluster.nkey_seed_file")
    );
    assert_eq!(
        on(|c| {
            user(c);
            c.token_file = "t".into();
        }),
        Some("cluster.user")
    );
    assert_eq!(
        on(|c| {
            c.token_file = "t".into();
            c.nkey_seed_file = "s".into();
        }),
        Some("cluster.token_file")
    );
}

#[test]
fn a_member_entry_reads_back_as_it_was_announced() {
    let me = members::Member {
        node_id: "a".into(),
        roles: vec![Role::Gateway, Role::Store],
        grpc: "127.0.0.1:4317".into(),
        http: "127.0.0.1:9090".into(),
        otlp_http: "127.0.0.1:4318".into(),
        version: "0.1.0".into(),
        started_unix_seconds: 1_800_000_000,
        announced_unix_seconds: 1_800_000_003,
        draining: true,
    };
    let json = serde_json::to_value(&me).unwrap();
    assert_eq!(json["roles"], serde_json::json!(["gateway", "store"]));
    assert_eq!(serde_json::from_value::<members::Member>(json.clone()).unwrap(), me);
    // An entry of a release without draining reads as not draining.
    let mut older = json;
    older.as_object_mut().unwrap().remove("draining");
    assert!(!serde_json::from_value::<members::Member>(older).unwrap().draining);
}

#[test]
fn a_partition_counts_only_whole_messages_as_written() {
    use crate::store::LogPosition;
    assert_eq!(whole_messages(LogPosition { seq: 0, records: 0 }), 0);
    assert_eq!(whole_messages(LogPosition { seq: 7, records: 3 }), 6, "message 7 is partly applied");
    assert_eq!(whole_messages(LogPosition { seq: 7, records: u32::MAX }), 7);
}

#[test]
fn a_single_node_plays_every_role_and_a_cluster_node_those_it_names() {
    let single = ClusterConfig::default();
    assert!(Role::ALL.iter().all(|&r| single.has(r)));
    let node = ClusterConfig {
        nats: vec!["nats://127.0.0.1:4222".into()],
        node_id: "a".into(),
        roles: vec![Role::Store, Role::Query],
        ..ClusterConfig::default()
    };
    assert!(node.has(Role::Store) && node.has(Role::Query));
    assert!(!node.has(Role::Gateway) && !node.has(Role::Ruler));
    assert_eq!(node.roles_text(), "[store, query]");
    let toml: ClusterConfig =
        toml::from_str("nats = [\"nats://n:4222\"]\nnode_id = \"b\"\nroles = [\"gateway\"]").unwrap();
    assert_eq!(toml.roles, vec![Role::Gateway]);
    let e = toml::from_str::<ClusterConfig>("roles = [\"reader\"]").unwrap_err().to_string();
    assert!(e.contains("unknown variant `reader`") && e.contains("gateway"), "{e}");
}

use prost::Message;
use tailscope_proto::histogram::Recorder;
use tailscope_proto::v1::{LogRecord, SeriesGroup, SeriesKey, Span};

use crate::pipeline::{GroupRoute, RoutedDelta, ValidatedBatch};
use crate::series::{Kind, SeriesLabels, Status};

fn spans(n: u64, now: i64) -> Vec<Span> {
    (0..n)
        .map(|i| Span {
            start_unix_nanos: now - 1_000_000_000,
            duration_nanos: 1_000_000 * (i as i64 + 1),
            self_nanos: if i % 2 == 0 { 500_000 } else { 0 },
            weight: 1,
            ..Default::default()
        })
        .collect()
}

fn key(service: &str, operation: &str, kind: Kind, peer: &str) -> Option<SeriesKey> {
    Some(SeriesKey {
        service: service.into(),
        operation: operation.into(),
        kind: kind as i32,
        peer: peer.into(),
    })
}

#[test]
fn a_batch_cut_into_records_rebuilds_to_the_series_it_counted_in() {
    let layout = tailscope_proto::histogram::Layout::default();
    let now = 1_700_000_000_000_000_000;
    let partitions = 4;
    // One group as sent, one whose operation went over its cap, one client call to a peer.
    let sent = [
        ("cart", "GET /", Kind::Server, ""),
        ("cart", "GET /x9", Kind::Server, ""),
        ("cart", "charge", Kind::Client, "payments"),
    ];
    let mut groups = Vec::new();
    let mut routes = Vec::new();
    for (i, &(service, operation, kind, peer)) in sent.iter().enumerate() {
        groups
            .push(SeriesGroup { key: key(service, operation, kind, peer), spans: spans(3 + i as u64, now) });
        let counted = if i == 1 { crate::cardinality::OVERFLOW } else { operation };
        routes.push(GroupRoute {
            overflow: i == 1,
            ..GroupRoute::counted(
                crate::series::group_hash(service, counted),
                service,
                counted,
                kind,
                peer,
                &groups[i].spans,
                partitions,
            )
        });
    }
    let mut recorder = Recorder::new(layout);
    recorder.record(2_000_000, 5);
    let histogram = tailscope_proto::histogram::Histogram::decode(&recorder.to_bytes()).unwrap();
    let labels = SeriesLabels { kind: Kind::Server, ..SeriesLabels::new("ledger", "post", Status::Error) };
    let delta_key = crate::series::group_hash("ledger", "post");
    let deltas = vec![RoutedDelta {
        key: delta_key,
        shard: crate::series::partition(delta_key, partitions) as u32,
        series: labels.id(),
        labels: labels.clone(),
        window_start: 1_699_999_990,
        histogram,
    }];
    let mut targets: Vec<u32> =
        routes.iter().map(|r| r.shard).chain(deltas.iter().map(|d| d.shard)).collect();
    targets.sort_unstable();
    targets.dedup();
    let batch = ValidatedBatch {
        client_id: 42,
        seq: 9,
        now,
        batch: tailscope_proto::v1::SpanBatch { client_id: 42, seq: 9, groups, ..Default::default() },
        groups: routes.clone(),
        deltas,
        targets: targets.clone(),
        owner: 0,
    };

    let records = record::split(&batch);
    assert_eq!(
        records.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        targets,
        "one record per partition, in order"
    );
    let shards = 3;
    let mut rebuilt_series = Vec::new();
    let mut rebuilt_deltas = Vec::new();
    // The records, as one log message of them decodes: each as a prost-built record of the
    // same content would encode.
    let payload = record::message("g-1", 7, 5, &records.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>());
    // Compressed as a gateway publishes it, it reads back byte for byte.
    let packed = record::compress(&payload).expect("a batch of spans compresses");
    assert!(packed.len() < payload.len());
    let read = record::decompress(&bytes::Bytes::from(packed), Some(record::SNAPPY)).unwrap();
    assert_eq!(read, payload);
    let message = tailscope_proto::v1::PartitionBatch::decode(payload.as_slice()).unwrap();
    assert_eq!((message.gateway.as_str(), message.gateway_seq, message.partition), ("g-1", 7, 5));
    assert_eq!(message.records.len(), records.len());
    for ((_, bytes), decoded) in records.iter().zip(&message.records) {
        assert_eq!(&LogRecord::decode(bytes.as_slice()).unwrap(), decoded);
        assert_eq!(decoded.encoded_len(), bytes.len(), "no field twice, none left out");
    }
    let spans: usize = message.records.iter().flat_map(|r| &r.groups).map(|g| g.spans.len()).sum();
    assert_eq!(spans, batch.batch.groups.iter().map(|g| g.spans.len()).sum::<usize>());
    for (p, r) in records {
        let r = LogRecord::decode(r.as_slice()).unwrap();
        let v = record::rebuild(r, p, shards).unwrap();
        assert_eq!((v.client_id, v.seq, v.now), (client_key(42, p), 9, now));
        assert!(
            v.groups.iter().all(|g| g.shard < shards as u32) && v.targets.windows(2).all(|w| w[0] < w[1])
        );
        rebuilt_series.extend(v.groups.iter().map(|g| (g.ok_series, g.error_series, g.self_series, g.kind)));
        rebuilt_deltas
            .extend(v.deltas.into_iter().map(|d| (d.series, d.labels, d.window_start, d.histogram.count())));
    }
    let mut expected: Vec<_> =
        routes.iter().map(|g| (g.ok_series, g.error_series, g.self_series, g.kind)).collect();
    expected.sort_unstable();
    rebuilt_series.sort_unstable();
    assert_eq!(rebuilt_series, expected, "the same series, the capped operation as __overflow__");
    assert!(rebuilt_series.iter().any(|s| s.2.is_none()), "a client call has no self-time series");
    assert_eq!(rebuilt_deltas, vec![(labels.id(), labels, 1_699_999_990, 5)]);
}

#[test]
fn a_log_payload_is_read_as_its_header_says_and_a_bad_one_is_named() {
    use record::{decompress, Unreadable, SNAPPY};
    let plain = bytes::Bytes::from_static(b"not compressed at all");
    assert_eq!(decompress(&plain, None).unwrap(), plain);
    // Incompressible bytes are published as they are.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    assert!(record::compress(&noise).is_none());
    // Not Snappy, or claiming more than a message may hold: corrupt, named.
    let err = decompress(&bytes::Bytes::from_static(&[0xff, 0xff, 0xff]), Some(SNAPPY)).unwrap_err();
    assert!(matches!(&err, Unreadable::Corrupt(e) if e.starts_with("snappy: ")), "{err:?}");
    // A varint length of 1 GiB and nothing behind it.
    let bomb = bytes::Bytes::from_static(&[0x80, 0x80, 0x80, 0x80, 0x04]);
    let err = decompress(&bomb, Some(SNAPPY)).unwrap_err();
    assert!(matches!(&err, Unreadable::Corrupt(e) if e.contains("claims 1073741824 bytes")), "{err:?}");
    // An encoding this build does not know is not skipped as corrupt.
    assert_eq!(decompress(&plain, Some("zstd")), Err(Unreadable::UnknownEncoding("zstd".into())));
}

#[test]
fn a_record_that_does_not_hold_together_is_named() {
    let broken = LogRecord {
        client_id: 1,
        seq: 1,
        groups: vec![SeriesGroup { key: None, spans: Vec::new() }],
        ..Default::default()
    };
    assert_eq!(record::rebuild(broken, 0, 2).err().as_deref(), Some("group 0: no key"));
    let bad_histogram = LogRecord {
        client_id: 1,
        seq: 1,
        deltas: vec![tailscope_proto::v1::LoggedDelta {
            key: key("a", "b", Kind::Server, ""),
            histogram: vec![1, 2, 3],
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = record::rebuild(bad_histogram, 0, 2).err().unwrap();
    assert!(e.starts_with("delta 0: "), "{e}");
}

/// A merge per start gives the same histograms whether it adds each start's windows into one
/// dense histogram (a range of at most `DENSE_STARTS` starts) or folds their encodings (a
/// longer range), and both equal the sum of what was written.
#[test]
fn a_range_merged_per_start_is_the_same_dense_or_folded() {
    use crate::series::{SeriesLabels, Status};
    use crate::store::{EpochWrite, Resolution, Store, WindowDelta};
    use tailscope_proto::histogram::{Histogram, Layout};

    const T0: i64 = 1_800_000_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), Layout::default(), &Metrics::new()).expect("open store");
    let series: Vec<u64> =
        (0..3).map(|i| SeriesLabels::new("api", format!("op{i}"), Status::Ok).id()).collect();
    let long = reads::DENSE_STARTS * 10 + 1000;
    let mut want: std::collections::BTreeMap<i64, Histogram> = Default::default();
    // Two epochs, so most windows are two merge operands.
    for epoch in 0..2u64 {
        let mut windows = Vec::new();
        for (i, &s) in series.iter().enumerate() {
            for start in (T0..T0 + long).step_by(10) {
                let mut h = Histogram::new(Layout::default());
                let v = 1_000 + (start - T0) as u64 * 37 + i as u64 * 1_000_003 + epoch * 7_919;
                h.record(v, 1 + epoch + i as u64);
                want.entry(start).or_insert_with(|| Histogram::new(Layout::default())).merge(&h);
                windows.push(WindowDelta { series: s, window_start: start, histogram: h.to_bytes() });
            }
        }
        let write = EpochWrite { windows, series: Vec::new(), ..EpochWrite::default() };
        store.write_epoch(&write).expect("write");
    }
    let merge = |end: i64| {
        let mut read = 0;
        reads::merge_group(&store, Resolution::S10, &series, &[(T0, end)], false, &mut read)
            .expect("merge")
            .into_iter()
            .map(|(start, bytes)| (start, Histogram::decode(&bytes).expect("decode")))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    // The first merge is dense, the second folds.
    let (short, long_end) = (T0 + reads::DENSE_STARTS * 10 - 1, T0 + long);
    assert!(reads::merges_dense(Resolution::S10, &[(T0, short)], false));
    assert!(!reads::merges_dense(Resolution::S10, &[(T0, long_end)], false));
    let dense = merge(short);
    let folded = merge(long_end);
    assert_eq!(dense.len() as i64, reads::DENSE_STARTS);
    assert_eq!(folded.len() as i64, long / 10);
    for (start, h) in &dense {
        assert_eq!(Some(h), folded.get(start), "start {start}");
    }
    assert_eq!(folded, want);
}

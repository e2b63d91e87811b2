use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn limits(max_connections: usize) -> ConnectionLimits {
    ConnectionLimits {
        max_connections,
        header_read_timeout: Duration::from_millis(300),
        handshake_timeout: Duration::from_millis(300),
        shutdown_timeout: Duration::from_secs(5),
    }
}

async fn http_server(limits: ConnectionLimits) -> (std::net::SocketAddr, Arc<Metrics>, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics = Arc::new(Metrics::new());
    let (stop, rx) = watch::channel(false);
    let router = Router::new().route("/", axum::routing::get(|| async { "hello" }));
    tokio::spawn(serve_http(listener, router, limits, metrics.clone(), None, rx));
    (addr, metrics, stop)
}

/// Reads until the peer closes; the outer timeout only keeps a broken build from hanging.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("closed")
        .expect("read");
    out
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let (addr, _, _stop) = http_server(limits(16)).await;
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.expect("write");
    // The server closes it (hyper answers 408 or just closes) once the header timeout passes.
    let answer = read_to_close(&mut slow).await;
    assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&answer));
    // A complete request is still answered.
    let mut ok = TcpStream::connect(addr).await.expect("connect");
    ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    let answer = read_to_close(&mut ok).await;
    assert!(answer.ends_with(b"hello"), "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_one_to_close() {
    let mut l = limits(2);
    l.header_read_timeout = Duration::from_secs(60);
    let (addr, metrics, _stop) = http_server(l).await;
    let first = TcpStream::connect(addr).await.expect("connect");
    let _second = TcpStream::connect(addr).await.expect("connect");
    // With two held, the acceptor is waiting for a permit, and says so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !metrics.encode().contains("tailscope_limit_hits_total{limit=\"server.max_connections\"} 1") {
        assert!(tokio::time::Instant::now() < deadline, "{}", metrics.encode());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut third = TcpStream::connect(addr).await.expect("the kernel's backlog takes it");
    third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    drop(first);
    let answer = read_to_close(&mut third).await;
    assert!(answer.ends_with(b"hello"), "served once a place was free: {}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn a_grpc_connection_without_a_preface_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut incoming = Box::pin(grpc_incoming(listener, limits(4), Arc::new(Metrics::new()), None));
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(b"PRI *").await.expect("write");
    let mut conn = futures::StreamExt::next(&mut incoming).await.expect("a connection").expect("accepted");
    let mut buf = [0u8; 64];
    assert_eq!(conn.read(&mut buf).await.expect("the first bytes"), 5);
    let err = conn.read(&mut buf).await.expect_err("no preface in time");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert!(err.to_string().contains("server.handshake_timeout"), "{err}");
    // A client that sends its preface is left alone.
    let mut good = TcpStream::connect(addr).await.expect("connect");
    good.write_all(&[0u8; PREFACE_BYTES]).await.expect("write");
    let mut conn = futures::StreamExt::next(&mut incoming).await.expect("a connection").expect("accepted");
    let mut got = 0;
    while got < PREFACE_BYTES {
        got += conn.read(&mut buf).await.expect("read");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    good.write_all(b"more").await.expect("write");
    assert_eq!(conn.read(&mut buf).await.expect("still open"), 4);
}

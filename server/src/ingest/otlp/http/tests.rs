use std::io::Write;

use super::*;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("write");
    e.finish().expect("finish")
}

#[test]
fn a_gzip_bomb_is_refused_after_the_limit_not_inflated_whole() {
    // 64 MiB of zeros compress to about 64 KiB.
    let bomb = gzip(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 1 << 20);
    let r = inflate(&bomb, 1 << 20).expect_err("refused");
    assert_eq!(r.status, 413);
    assert!(r.message.contains("inflates to more than 1048576 bytes"), "{}", r.message);
    assert_eq!(inflate(&gzip(b"hello"), 1 << 20).expect("inflates").as_ref(), b"hello");
    let r = inflate(b"not gzip at all", 1 << 20).expect_err("refused");
    assert_eq!(r.status, 400);
}

#[test]
fn errors_answer_in_the_requests_encoding_with_retry_after_when_throttled() {
    let r = Refusal::from_ingest(&IngestError::Overloaded("full".into())).respond(Encoding::Protobuf);
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    assert_eq!(r.headers()[header::CONTENT_TYPE], "application/x-protobuf");
    let r = Refusal::new(400, tonic::Code::InvalidArgument, "bad").respond(Encoding::Json);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    assert!(r.headers().get(header::RETRY_AFTER).is_none());
}

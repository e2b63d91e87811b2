use super::*;

#[test]
fn the_specification_example_decodes() {
    // The shape of the OTLP/JSON example in the OpenTelemetry specification.
    let body = br#"{"resourceSpans":[{"resource":{"attributes":[
        {"key":"service.name","value":{"stringValue":"my.service"}},
        {"key":"host.cpus","value":{"intValue":"8"}}]},
      "scopeSpans":[{"scope":{"name":"my.library","version":"1.0.0"},"spans":[{
        "traceId":"5B8EFFF798038103D269B633813FC60C","spanId":"EEE19B7EC3C1B174",
        "parentSpanId":"EEE19B7EC3C1B173","name":"I'm a server span",
        "startTimeUnixNano":"1544712660000000000","endTimeUnixNano":1544712661000000000,
        "kind":2,"status":{"code":"STATUS_CODE_ERROR"},"traceState":"ot=th:8"}]}]}]}"#;
    let req = export_from_json(body).expect("decodes");
    let rs = &req.resource_spans[0];
    let attrs = &rs.resource.as_ref().expect("resource").attributes;
    assert_eq!(attrs.len(), 1, "only string attributes are kept");
    assert_eq!(attrs[0].key, "service.name");
    let span = &rs.scope_spans[0].spans[0];
    assert_eq!(
        span.trace_id,
        [0x5b, 0x8e, 0xff, 0xf7, 0x98, 0x03, 0x81, 0x03, 0xd2, 0x69, 0xb6, 0x33, 0x81, 0x3f, 0xc6, 0x0c]
    );
    assert_eq!(span.span_id, [0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x74]);
    assert_eq!(span.start_time_unix_nano, 1_544_712_660_000_000_000);
    assert_eq!(span.end_time_unix_nano, 1_544_712_661_000_000_000);
    assert_eq!(span.kind, 2);
    assert_eq!(span.status.as_ref().map(|s| s.code), Some(2));
    assert_eq!(span.trace_state, "ot=th:8");
}

#[test]
fn protobuf_field_names_and_enum_names_are_accepted() {
    let body = br#"{"resource_spans":[{"scope_spans":[{"spans":[{
        "name":"x","start_time_unix_nano":5,"end_time_unix_nano":"9","kind":"SPAN_KIND_CLIENT"}]}]}]}"#;
    let span = &export_from_json(body).expect("decodes").resource_spans[0].scope_spans[0].spans[0];
    assert_eq!((span.start_time_unix_nano, span.end_time_unix_nano, span.kind), (5, 9, 3));
}

#[test]
fn errors_name_the_field() {
    let cases: [(&[u8], &str); 7] = [
        (b"not json", "invalid JSON"),
        (b"[1]", "expected an object"),
        (br#"{"resourceSpans":{}}"#, ".resourceSpans: expected an array"),
        (
            br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"xyz"}]}]}]}"#,
            "resourceSpans[0].scopeSpans[0].spans[0].traceId",
        ),
        (
            br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"startTimeUnixNano":"-5"}]}]}]}"#,
            "startTimeUnixNano",
        ),
        (
            br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"kind":"SPAN_KIND_NONE"}]}]}]}"#,
            "kind: unknown value",
        ),
        (br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"status":{"code":true}}]}]}]}"#, "status.code"),
    ];
    for (body, want) in cases {
        let err = export_from_json(body).expect_err(want);
        assert!(err.contains(want), "{err:?} should name {want:?}");
    }
}

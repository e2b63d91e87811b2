use super::*;

#[test]
fn a_pem_file_gives_its_certificates_and_key_or_says_what_is_wrong_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tailscope_test_support::pki::Pki::new(dir.path(), "");
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();

    let chain = read(&pki.server_cert);
    let ca = read(&pki.ca);
    let both = [chain.clone(), ca.clone()].concat();
    assert_eq!(certificates(&chain).unwrap().len(), 1);
    assert_eq!(certificates(&both).unwrap().len(), 2, "a chain keeps every certificate, in order");
    assert_eq!(certificates(&both).unwrap()[1], certificates(&ca).unwrap()[0]);
    assert_eq!(roots(&both).unwrap().len(), 2);
    assert!(private_key(&read(&pki.server_key)).is_ok());

    let empty = b"# no certificate here\n";
    assert_eq!(certificates(empty).unwrap_err(), "no certificate in it");
    assert_eq!(roots(empty).unwrap_err(), "no certificate in it");
    // A certificate whose base64 is cut short, and a key file that holds a certificate.
    let text = String::from_utf8(chain.clone()).unwrap();
    let cut = format!("{}\n-----END CERTIFICATE-----\n", &text[..text.len() / 2]);
    assert!(!certificates(cut.as_bytes()).unwrap_err().is_empty());
    assert!(!private_key(&chain).unwrap_err().is_empty());
}

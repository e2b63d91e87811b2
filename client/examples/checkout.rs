//! A service instrumented with tailscope: it times its requests with `client.start`, records
//! one measured elsewhere with `client.record`, and shuts down cleanly.
//!
//! Run a server (`cargo run --release -p tailscope-server`), then:
//!
//! ```sh
//! cargo run -p tailscope --example checkout
//! curl -s 'http://127.0.0.1:9797/api/v1/tail?service=checkout'
//! ```

use std::time::Duration;

use tailscope::{Client, Status};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::var("TAILSCOPE_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4317".into());
    let client = Client::builder().endpoint(endpoint).service("checkout").build()?;
    for i in 0..200u64 {
        let mut span = client.start("POST /pay");
        // The work being timed: most requests are quick, a few are slow, some fail.
        let millis = if i % 50 == 0 { 120 } else { 3 + i % 7 };
        tokio::time::sleep(Duration::from_millis(millis)).await;
        if i % 40 == 0 {
            span.error();
        }
        drop(span);
        // A duration measured by someone else (a queue, a proxy log, …).
        client.record("GET /cart", Duration::from_micros(800 + 10 * (i % 30)), Status::Ok);
    }
    match client.shutdown(Duration::from_secs(5)).await {
        Ok(()) => println!("all spans acknowledged: {:?}", client.stats()),
        Err(e) => println!("not everything was acknowledged ({e}): {:?}", client.stats()),
    }
    Ok(())
}

//! The `/metrics` and `/healthz` endpoint's request path: any bytes a client
//! sends get a well-formed HTTP response or a closed connection, within
//! the endpoint's limits, and never a panic.
#![no_main]

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use relay::metrics::{EndpointLimits, Metrics, serve_connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|request: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        let metrics = Arc::new(Metrics::new());
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let limits = EndpointLimits {
            header_read_timeout: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(30),
            ..EndpointLimits::default()
        };
        let asked = Arc::new(AtomicBool::new(false));
        let served =
            tokio::spawn(async move { serve_connection(server, &metrics, &asked, limits).await });
        let _ = client.write_all(request).await;
        let _ = client.shutdown().await;
        let mut response = Vec::new();
        let _ = client.read_to_end(&mut response).await;
        served.await.expect("the connection task does not panic");
        if !response.is_empty() {
            assert!(
                // hyper answers an HTTP/1.0 request in HTTP/1.0.
                response.starts_with(b"HTTP/1.1 ") || response.starts_with(b"HTTP/1.0 "),
                "not an HTTP response: {:?}",
                String::from_utf8_lossy(&response[..response.len().min(64)])
            );
        }
    });
});

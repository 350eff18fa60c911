//! Kafka over TLS and SASL: `--kafka-prop` settings reach librdkafka (built with OpenSSL). A local
//! TCP listener stands in for a managed cluster's broker and looks at the first bytes of every
//! connection livetable opens: each must be a TLS ClientHello naming the broker (SNI), never a
//! plaintext Kafka request. Invalid properties stop the start with librdkafka's own message.

mod common;

use std::time::{Duration, Instant};

use common::*;
use livetable::config::TopicSelection;
use tokio::io::AsyncReadExt;

fn config_with(
    props: &[(&str, &str)],
    brokers: &str,
) -> (livetable::config::Config, tempfile::TempDir) {
    let u = unique("kafkasec");
    let dir = tempdir();
    let mut c = test_config(
        TopicSelection::Names(vec![format!("{u}.public.t")]),
        dir.path(),
        &u,
    );
    c.brokers = brokers.to_string();
    c.shutdown_grace = Duration::from_secs(2);
    c.kafka_props = props
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (c, dir)
}

async fn start_err(props: &[(&str, &str)]) -> String {
    let (c, _dir) = config_with(props, "127.0.0.1:1");
    match livetable::start(c, tokio_util::sync::CancellationToken::new()).await {
        Ok(svc) => {
            svc.shutdown();
            let _ = svc.wait().await;
            panic!("started with {props:?}");
        }
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_kafka_properties_stop_the_start_with_librdkafkas_reason() {
    init_logs();
    let e = start_err(&[("sasl.nonsense", "1")]).await;
    assert!(e.contains("sasl.nonsense"), "{e}");
    let e = start_err(&[("security.protocol", "bogus")]).await;
    assert!(e.contains("security.protocol"), "{e}");
    // the CA file is read when the clients are created
    let e = start_err(&[
        ("security.protocol", "SSL"),
        ("ssl.ca.location", "/nonexistent/ca.pem"),
    ])
    .await;
    assert!(e.contains("ssl.ca.location"), "{e}");
}

/// The first TLS record (or whatever else) of each connection livetable opens to a fake broker
/// within a few seconds, with SASL_SSL settings.
async fn first_bytes_of_connections() -> Vec<Vec<u8>> {
    // a CA file for ssl.ca.location (librdkafka reads it at start)
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempdir();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert.pem()).unwrap();
    let broker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = broker.local_addr().unwrap().port();
    let (c, _data) = config_with(
        &[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "livetable"),
            ("sasl.password", "secret"),
            ("ssl.ca.location", ca_path.to_str().unwrap()),
        ],
        &format!("localhost:{port}"),
    );
    let svc = livetable::start(c, tokio_util::sync::CancellationToken::new())
        .await
        .expect("librdkafka accepts SASL_SSL with SCRAM (built with OpenSSL)");
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let Ok(Ok((mut s, _))) = tokio::time::timeout_at(until.into(), broker.accept()).await
        else {
            break;
        };
        // the first TLS record whole (5 bytes of header, then its length)
        let mut buf = vec![0u8; 4096];
        let mut n = 0;
        let read_until = Instant::now() + Duration::from_secs(3);
        let whole =
            |b: &[u8], n: usize| n >= 5 && n >= 5 + u16::from_be_bytes([b[3], b[4]]) as usize;
        while !whole(&buf, n) && n < buf.len() && Instant::now() < read_until {
            match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf[n..])).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(k)) => n += k,
                Err(_) => {}
            }
        }
        buf.truncate(n);
        out.push(buf);
    }
    svc.shutdown();
    let _ = svc.wait().await;
    out
}

fn is_client_hello_for_localhost(b: &[u8]) -> bool {
    b.len() >= 6
        && b[0] == 0x16
        && b[1] == 0x03
        && b[5] == 0x01
        && b.windows(9).any(|w| w == b"localhost")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_sasl_settings_reach_the_consumer_and_the_producer() {
    init_logs();
    let seen = first_bytes_of_connections().await;
    let tls = seen
        .iter()
        .filter(|b| is_client_hello_for_localhost(b))
        .count();
    assert!(
        tls >= 2,
        "the consumer and the producer speak TLS to the broker (SNI localhost): {tls} of {} connections: {:02x?}",
        seen.len(),
        seen.iter().map(|b| &b[..b.len().min(8)]).collect::<Vec<_>>()
    );
}

/// Every connection (consumer, producers and the admin client that creates topics) speaks TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_sasl_settings_reach_every_kafka_connection() {
    init_logs();
    let seen = first_bytes_of_connections().await;
    assert!(seen.len() >= 2, "{} connection(s)", seen.len());
    for b in &seen {
        assert!(
            is_client_hello_for_localhost(b),
            "a TLS ClientHello, not plaintext Kafka: {:02x?}",
            &b[..b.len().min(16)]
        );
    }
}

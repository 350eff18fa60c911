//! What livetable exposes, with real clients: browser origins on WebSocket upgrades and SSE, CORS
//! on the HTTP API, TLS (rustls) with a certificate the test makes and replaces while clients
//! are connected, and the admin listener (`/metrics`, `/healthz`, `/readyz` off the public one).

mod common;
mod secure;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use livetable::config::security::{parse_origins, TlsFiles};
use livetable::config::{Config, TopicSelection};
use secure::*;
use serde_json::json;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;

async fn setup(
    tweak: impl FnOnce(&mut Config),
) -> (livetable::Service, String, String, tempfile::TempDir) {
    init_logs();
    let u = unique("expo");
    let topic = format!("{u}.public.game_odds");
    create_topic(&topic, 1).await;
    produce(
        &producer(),
        &topic,
        &[row_record(json!({"id": "g1", "odd": "1.5"}))],
    )
    .await;
    let dir = tempdir();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    tweak(&mut c);
    let (svc, base) = start_service(c).await;
    (svc, base, topic, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_checked_on_live_routes_and_cors_answers_the_listed_ones() {
    let (svc, base, _topic, _dir) = setup(|_| {}).await;
    table_at_seq(&base, "game_odds", 1).await;
    let host = base.trim_start_matches("http://").to_string();
    // default: same origin and non-browser clients only
    let err = ws_with(
        &base,
        "/ws?table=game_odds",
        &[("origin", "https://evil.example")],
    )
    .await
    .expect_err("a cross-site WebSocket is refused");
    assert_eq!(err.0, 403, "{err:?}");
    assert!(err.1.contains("origin_not_allowed"), "{err:?}");
    let same = format!("http://{host}");
    let mut ws = ws_with(&base, "/ws?table=game_odds", &[("origin", &same)])
        .await
        .expect("same origin");
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(10)).await["type"],
        "snapshot"
    );
    ws_with(&base, "/ws?table=game_odds", &[])
        .await
        .expect("no Origin: not a browser");
    let (s, e) = get_with(
        &format!("{base}/sse?table=game_odds"),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (403, Some("origin_not_allowed")));
    // the live page itself and the API are not live routes: no refusal (CORS is the browser's)
    assert_eq!(
        get_with(
            &format!("{base}/api/tables"),
            &[("origin", "https://evil.example")]
        )
        .await
        .0,
        200
    );
    // every answer says its type is meant, leaks no URL (tokens) and is kept by nobody else
    for path in [
        "/api/tables",
        "/api/tables/game_odds",
        "/",
        "/livetable.js",
        "/nope",
        "/metrics",
    ] {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        let h = r.headers();
        let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("referrer-policy"), "no-referrer", "{path}");
        assert_eq!(header("cache-control"), "no-store", "{path}");
    }
    let m = metrics_text(&base).await;
    assert!(
        m.contains(r#"livetable_access_denied_total{reason="origin"} 2"#),
        "{m}"
    );
    svc.shutdown();
    svc.wait().await.unwrap();

    let (svc, base, _topic, _dir) = setup(|c| {
        c.security.origins = parse_origins("https://app.example.com").unwrap();
    })
    .await;
    table_at_seq(&base, "game_odds", 1).await;
    let mut ws = ws_with(
        &base,
        "/ws?table=game_odds",
        &[("origin", "https://app.example.com")],
    )
    .await
    .expect("a listed origin");
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(10)).await["type"],
        "snapshot"
    );
    assert_eq!(
        ws_with(
            &base,
            "/ws?table=game_odds",
            &[("origin", "https://app.example.com.evil.example")]
        )
        .await
        .err()
        .map(|e| e.0),
        Some(403)
    );
    let client = reqwest::Client::new();
    let pre = client
        .request(reqwest::Method::OPTIONS, format!("{base}/api/tables"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success(), "{}", pre.status());
    let h = pre.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert!(h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    let get = client
        .get(format!("{base}/api/tables"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        get.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let other = client
        .get(format!("{base}/api/tables"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    svc.shutdown();
    svc.wait().await.unwrap();

    let (svc, base, _topic, _dir) = setup(|c| {
        c.security.origins = parse_origins("*").unwrap();
    })
    .await;
    ws_with(
        &base,
        "/ws?table=game_odds",
        &[("origin", "https://evil.example")],
    )
    .await
    .expect("* allows any origin");
    svc.shutdown();
    svc.wait().await.unwrap();
}

fn tls_client(trusted: &[&rcgen::Certificate]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add(c.der().clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls_connect(
    addr: std::net::SocketAddr,
    trusted: &[&rcgen::Certificate],
) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tls_client(trusted).connect(name, tcp).await
}

/// `GET path` over a TLS connection: (status, body).
async fn https_get(
    addr: std::net::SocketAddr,
    trusted: &[&rcgen::Certificate],
    path: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_connect(addr, trusted).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        text.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default(),
    )
}

fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_https_and_wss_and_a_new_certificate_applies_without_a_restart() {
    let first = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let second = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let certs = tempdir();
    let cert = certs.path().join("cert.pem");
    let key = certs.path().join("key.pem");
    replace(&cert, &first.cert.pem());
    replace(&key, &first.signing_key.serialize_pem());
    let files = TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
    };
    let (svc, base, topic, _dir) = setup(|c| c.security.tls = Some(files)).await;
    let addr = svc.local_addr;
    // HTTPS with a real TLS client that trusts only the first certificate
    let (status, body) = eventually("the table over https", Duration::from_secs(30), || async {
        let (s, b) = https_get(addr, &[&first.cert], "/api/tables/game_odds").await;
        (s == 200 && b.contains("\"g1\"")).then_some((s, b))
    })
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("\"g1\""), "{body}");
    // WSS
    let tls = tls_connect(addr, &[&first.cert]).await.unwrap();
    let (mut wss, _) = tokio_tungstenite::client_async(
        format!("wss://localhost:{}/ws?table=game_odds", addr.port()),
        tls,
    )
    .await
    .unwrap();
    let snap = loop {
        match wss.next().await.unwrap().unwrap() {
            Message::Text(t) => {
                break serde_json::from_str::<serde_json::Value>(t.as_str()).unwrap()
            }
            _ => continue,
        }
    };
    assert_eq!(snap["type"], "snapshot");
    // plain HTTP on the TLS port gets nothing
    let (s, _, _) = raw_http(addr, b"GET /api/tables HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(s, 0, "no plaintext answer on a TLS listener");

    // the certificate is replaced (key first, then the certificate, as a renewal tool may):
    // new handshakes present the new one, the open WSS connection goes on
    replace(&key, &second.signing_key.serialize_pem());
    replace(&cert, &second.cert.pem());
    eventually("the new certificate", Duration::from_secs(15), || async {
        tls_connect(addr, &[&second.cert]).await.ok().map(|_| ())
    })
    .await;
    assert!(
        tls_connect(addr, &[&first.cert]).await.is_err(),
        "the old certificate is no longer presented"
    );
    produce(
        &producer(),
        &topic,
        &[row_record(json!({"id": "g2", "odd": "2.5"}))],
    )
    .await;
    let patch = loop {
        match tokio::time::timeout(Duration::from_secs(20), wss.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => {
                break serde_json::from_str::<serde_json::Value>(t.as_str()).unwrap()
            }
            _ => continue,
        }
    };
    assert_eq!(patch["patch"]["g2"]["odd"], "2.5", "{patch}");
    // a broken file keeps the pair in use
    replace(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
    );
    eventually(
        "the failed reload is counted",
        Duration::from_secs(15),
        || async {
            let (_, m) = https_get(addr, &[&second.cert], "/metrics").await;
            m.contains(r#"livetable_reloads_total{file="tls",result="error"} 1"#)
                .then_some(())
        },
    )
    .await;
    assert_eq!(https_get(addr, &[&second.cert], "/api/tables").await.0, 200);
    wss.send(Message::Close(None)).await.unwrap();
    drop(base);
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_takes_metrics_and_health_off_the_public_one() {
    let (svc, base, _topic, _dir) = setup(|c| {
        c.security.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = format!("http://{}", svc.admin_addr.expect("an admin address"));
    table_at_seq(&base, "game_odds", 1).await;
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (s, e) = get_json(&format!("{base}{path}")).await;
        assert_eq!(s, 404, "{path} is not public: {e}");
        let r = reqwest::get(format!("{admin}{path}")).await.unwrap();
        assert!(
            r.status() == 200 || (path == "/readyz" && r.status() == 503),
            "{path} on the admin listener: {}",
            r.status()
        );
        assert_eq!(
            r.headers()
                .get("x-content-type-options")
                .map(|v| v.as_bytes()),
            Some(&b"nosniff"[..]),
            "{path} on the admin listener"
        );
    }
    assert!(metrics_text(&admin)
        .await
        .contains("livetable_tcp_connections"));
    for path in ["/api/tables", "/ws", "/"] {
        assert_eq!(
            get_json(&format!("{admin}{path}")).await.0,
            404,
            "{path} is not on the admin listener"
        );
    }
    assert_eq!(get_json(&format!("{base}/api/tables")).await.0, 200);
    svc.shutdown();
    svc.wait().await.unwrap();
}

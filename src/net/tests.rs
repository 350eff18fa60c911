use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::Router;
use tokio::sync::Notify;
use tower::ServiceExt;

use super::http_layers;
use crate::metrics::Metrics;

fn refused(m: &Metrics, reason: &str) -> u64 {
    m.http_refused.with_label_values(&[reason]).get()
}

#[tokio::test]
async fn requests_the_layers_refuse_are_counted_by_reason() {
    let metrics = Arc::new(Metrics::new());
    let release = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let (wait, enter) = (release.clone(), entered.clone());
    let app = Router::new()
        .route(
            "/hold",
            get(move || {
                let (wait, enter) = (wait.clone(), enter.clone());
                async move {
                    enter.notify_one();
                    wait.notified().await;
                    "done"
                }
            }),
        )
        .route(
            "/slow",
            get(|| async { std::future::pending::<&str>().await }),
        );
    let app = http_layers(app, Duration::from_secs(3), 1, metrics.clone());
    let req = |path: &str| Request::get(path).body(Body::empty()).unwrap();

    // one request in flight holds the only slot: the next is shed at once
    let held = tokio::spawn(app.clone().oneshot(req("/hold")));
    entered.notified().await;
    let shed = app.clone().oneshot(req("/hold")).await.unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.headers()["retry-after"], "1");
    assert_eq!(shed.headers()["x-content-type-options"], "nosniff");
    assert_eq!(shed.headers()["cache-control"], "no-store");
    assert_eq!(refused(&metrics, "server_busy"), 1);
    release.notify_one();
    assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::OK);

    // a request not answered in time
    let r = app.clone().oneshot(req("/slow")).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused(&metrics, "timeout"), 1);
    assert_eq!(refused(&metrics, "server_busy"), 1);
}

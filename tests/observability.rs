//! Operations artifacts checked for real: promtool on the Prometheus config and rules, the compose
//! file against the Compose specification (docker-compose config) with every mounted file present,
//! docs/metrics.md against /metrics (both ways) after a small load, and a real Prometheus on
//! loopback scraping livetable under that load, evaluating every PromQL expression of the dashboard
//! and of the rules. `./dev/test` installs Debian's prometheus and docker-compose.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use livetable::config::TopicSelection;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (./dev/test installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_config_and_the_rules() {
    let d = root().join("dashboards");
    let out = run(Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(d.join("prometheus.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(d.join("livetable.rules.yml")));
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
}

#[test]
fn the_compose_file_is_valid_and_every_mounted_file_exists() {
    run(Command::new("docker-compose")
        .arg("-f")
        .arg(root().join("docker-compose.yml"))
        .args(["config", "-q"]));
    // bind mounts and build contexts, read with the YAML parser docker-compose itself uses
    let script = r#"
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
for name, svc in doc["services"].items():
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("./") or src.startswith("/"):
            print(src)
    if "build" in svc:
        b = svc["build"]
        print((b if isinstance(b, str) else b.get("context", ".")).rstrip("/") + "/Dockerfile")
"#;
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(root().join("docker-compose.yml")));
    let paths: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert!(paths.len() >= 8, "mounts found: {paths:?}");
    for p in paths {
        assert!(
            !p.starts_with('/'),
            "{p}: no host paths outside the repository"
        );
        assert!(root().join(p).exists(), "{p} is mounted but does not exist");
    }
}

/// The image is built from copied paths: every local path the workspace builds from (members,
/// patched dependencies) must be among them, or `docker build` fails where no test here runs it.
#[test]
fn the_dockerfile_copies_every_local_path_the_workspace_builds_from() {
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap()).unwrap();
    let mut needed: Vec<String> = manifest["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_str())
        .filter(|m| *m != ".")
        .map(String::from)
        .collect();
    needed.extend(["src".to_string(), "Cargo.lock".to_string()]);
    if let Some(patches) = manifest.get("patch").and_then(|p| p.as_table()) {
        for registry in patches.values() {
            for dep in registry.as_table().unwrap().values() {
                needed.push(dep["path"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(
        needed.iter().any(|n| n.starts_with("vendor/")),
        "{needed:?}"
    );
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len() - 1].to_vec()
        })
        .map(|p| p.trim_end_matches('/'))
        .collect();
    for path in &needed {
        assert!(
            copied
                .iter()
                .any(|c| path == c || path.starts_with(&format!("{c}/"))),
            "the Dockerfile does not copy {path} (copies {copied:?})"
        );
        assert!(root().join(path).exists(), "{path} is missing");
    }
}

/// The Dockerfile's `cargo build` names each `--bin` in a package it selects: cargo looks a bin
/// up in the selected packages only (`-p livetable-load --bin livetable` fails with "no bin
/// target named `livetable`"), and no Docker engine runs here to find out.
#[test]
fn the_dockerfile_builds_each_bin_from_a_package_it_selects() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let line = dockerfile
        .lines()
        .find(|l| l.contains("cargo build"))
        .expect("the Dockerfile runs cargo build");
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |flags: &[&str]| -> Vec<String> {
        words
            .windows(2)
            .filter(|w| flags.contains(&w[0]))
            .map(|w| w[1].to_string())
            .collect()
    };
    let packages = after(&["-p", "--package"]);
    let bins = after(&["--bin"]);
    assert!(!bins.is_empty(), "{line}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let owner = |bin: &str| -> Option<String> {
        meta["packages"].as_array()?.iter().find_map(|p| {
            p["targets"]
                .as_array()?
                .iter()
                .any(|t| {
                    t["name"] == bin
                        && t["kind"]
                            .as_array()
                            .is_some_and(|k| k.contains(&Value::from("bin")))
                })
                .then(|| p["name"].as_str().unwrap_or_default().to_string())
        })
    };
    for bin in &bins {
        let pkg = owner(bin).unwrap_or_else(|| panic!("no package has a bin `{bin}`"));
        assert!(
            packages.is_empty() && pkg == "livetable" || packages.contains(&pkg),
            "the Dockerfile builds --bin {bin} of package {pkg} but selects {packages:?}: {line}"
        );
    }
}

/// Starts livetable and drives every code path that creates a labelled series.
async fn service_under_load() -> (livetable::Service, String, String) {
    init_logs();
    let u = unique("obs");
    let topic = format!("{u}.public.game_odds");
    create_topic(&topic, 1).await;
    let mut records = load_fixture("pg_a_envelope_noschema.jsonl"); // undecodable decimals included
    records.push(FixtureRecord {
        key: Some(r#"{"game_id":"gx"}"#.into()),
        value: Some("{not json".into()),
        headers: vec![],
    });
    records.push(FixtureRecord {
        key: None,
        value: Some(r#"{"status":"BEGIN","id":"1"}"#.into()),
        headers: vec![],
    });
    produce(&producer(), &topic, &records).await;
    let dir = tempdir();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    // a declared view, so that the view metrics are exposed too
    c.views = std::sync::Arc::new(
        livetable::views::ViewsFile::parse(
            "[views.top_odds]\nfrom = \"game_odds\"\ntop_n = { order_by = [\"odd1 desc\", \"game_id\"], limit = 3 }\n",
        )
        .unwrap()
        .views,
    );
    let (svc, base) = start_service(c).await;
    std::mem::forget(dir); // the data directory outlives this helper; the OS cleans /tmp
    table_at_seq(&base, "game_odds", 12).await;
    let ws_url = format!("{}/ws?table=game_odds", base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    let snap: Value = match ws.next().await.unwrap().unwrap() {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("{other:?}"),
    };
    ws.send(Message::text("nonsense")).await.unwrap();
    let (mut ws2, _) = tokio_tungstenite::connect_async(format!(
        "{ws_url}&since={}:{}",
        snap["epoch"].as_str().unwrap(),
        snap["seq"]
    ))
    .await
    .unwrap();
    let _ = ws2.next().await;
    ws2.close(None).await.unwrap();
    // keep patches flowing to the open client for the rates
    let extra = FixtureRecord {
        key: Some(r#"{"game_id":"g9"}"#.into()),
        value: Some(format!(
            r#"{{"before":null,"after":{{"game_id":"g9","odd1":"1.000"}},"source":{{"table":"game_odds","ts_ms":{}}},"op":"c"}}"#,
            now_ms()
        )),
        headers: vec![],
    };
    produce(&producer(), &topic, &[extra]).await;
    table_at_seq(&base, "game_odds", 13).await;
    tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
    (svc, base, topic)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn documented_metrics() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("livetable_") || n.starts_with("process_"))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_docs_match_metrics_and_prometheus_evaluates_every_expression() {
    let (svc, base, topic) = service_under_load().await;

    // docs/metrics.md <-> /metrics, both ways
    let text = metrics_text(&base).await;
    let exposed: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect();
    // the patch written to the open client was measured from the commit and from its poll
    // (livetable's own share): both histograms counted it
    eventually(
        "the patch's latencies observed",
        Duration::from_secs(20),
        || {
            let base = base.clone();
            async move {
                let text = metrics_text(&base).await;
                let count = |name| metric_value(&text, name).unwrap_or(0.0);
                (count("livetable_ingest_to_socket_seconds_count") >= 1.0
                    && count("livetable_freshness_seconds_count") >= 1.0)
                    .then_some(())
            }
        },
    )
    .await;
    let documented = documented_metrics();
    let undocumented: Vec<_> = exposed.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&exposed).collect();
    assert!(
        undocumented.is_empty(),
        "on /metrics but not in docs/metrics.md: {undocumented:?}"
    );
    assert!(
        missing.is_empty(),
        "in docs/metrics.md but not on /metrics after the load: {missing:?}"
    );
    // the service ingested, so its consumer was given partitions after some time
    let join = metric_value(&text, "livetable_group_join_seconds").unwrap_or(0.0);
    assert!(join > 0.0 && join < 60.0, "group join {join} s");

    // a real Prometheus on loopback scrapes livetable and evaluates the rules
    let dir = tempdir();
    let prom_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{rules:?}]\nscrape_configs:\n  - job_name: livetable\n    static_configs: [{{targets: [\"{target}\"]}}]\n",
        rules = root().join("dashboards/livetable.rules.yml").display().to_string(),
        target = base.trim_start_matches("http://"),
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (./dev/test installs Debian's package)");
    let api = format!("http://127.0.0.1:{prom_port}/api/v1");
    let query = |q: String| {
        let api = api.clone();
        async move {
            let resp = reqwest::Client::new()
                .get(format!("{api}/query"))
                .query(&[("query", q.as_str())])
                .send()
                .await
                .ok()?;
            resp.json::<Value>().await.ok()
        }
    };
    // scraped several times, with changes flowing in between, so rates over 1m have samples
    let p = producer();
    for i in 0..8 {
        let rec = FixtureRecord {
            key: Some(r#"{"game_id":"g9"}"#.into()),
            value: Some(format!(
                r#"{{"before":null,"after":{{"game_id":"g9","odd1":"{i}.500"}},"source":{{"table":"game_odds","ts_ms":{}}},"op":"u"}}"#,
                now_ms()
            )),
            headers: vec![],
        };
        produce(&p, &topic, &[rec]).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    eventually(
        "prometheus scraped livetable a few times",
        Duration::from_secs(60),
        || async move {
            let v = query("count_over_time(up{job=\"livetable\"}[1m])".into()).await?;
            let n: f64 = v["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
            (n >= 5.0).then_some(())
        },
    )
    .await;

    // every panel expression of the dashboard: valid, and at least one series
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("dashboards/livetable-overview.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue; // a row only groups the panels below it
        }
        for t in panel["targets"].as_array().unwrap() {
            exprs.push((
                panel["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            // label_values(metric, label) -> the metric selector must have series
            let inner = q
                .trim_start_matches("label_values(")
                .rsplit_once(',')
                .map(|(m, _)| m.to_string())
                .unwrap();
            exprs.push((format!("variable {}", v["name"]), inner));
        }
    }
    assert!(exprs.len() >= 25, "{} expressions", exprs.len());
    for (title, expr) in &exprs {
        let q = expr
            .replace("$instance", ".*")
            .replace("$table", ".*")
            .replace("$__rate_interval", "1m");
        let v = query(q.clone()).await.unwrap_or(Value::Null);
        assert_eq!(v["status"], "success", "{title}: `{q}` is invalid: {v}");
        let n = v["data"]["result"].as_array().map_or(0, Vec::len);
        assert!(n > 0, "{title}: `{q}` returns no series");
    }

    // every rule: loaded, evaluated without error, and its measured side has series
    let rules: Value = reqwest::get(format!("{api}/rules"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list: Vec<Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect();
    assert_eq!(list.len(), 8);
    let comparison = regex::Regex::new(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.]+\s*$").unwrap();
    for r in &list {
        let name = r["name"].as_str().unwrap();
        let expr = r["query"].as_str().unwrap();
        eventually(
            &format!("rule {name} evaluated"),
            Duration::from_secs(20),
            || async {
                let rules: Value = reqwest::get(format!("{api}/rules"))
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let r = rules["data"]["groups"][0]["rules"]
                    .as_array()?
                    .iter()
                    .find(|x| x["name"] == name)?
                    .clone();
                (r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001")))
                .then_some(())
            },
        )
        .await;
        let rules: Value = reqwest::get(format!("{api}/rules"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let r = rules["data"]["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap()
            .clone();
        assert_eq!(r["health"], "ok", "rule {name}: {}", r["lastError"]);
        let measured = comparison
            .replace(expr.split(" and ").next().unwrap(), "")
            .to_string();
        let v = query(measured.clone()).await.unwrap();
        assert_eq!(v["status"], "success", "{name}: `{measured}`: {v}");
        assert!(
            !v["data"]["result"].as_array().unwrap().is_empty(),
            "rule {name}: `{measured}` returns no series"
        );
    }
    let _ = prom.kill();
    let _ = prom.wait();
    svc.shutdown();
    svc.wait().await.unwrap();
}

//! livetable processes for multi-process tests (the real binary, killed with SIGKILL when asked),
//! and live clients that check what they see: a key's value never goes back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::{brokers, eventually, get_json};

/// The livetable binary cargo built for these tests.
pub fn livetable_bin() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_livetable") {
        Some(p) => PathBuf::from(p),
        // a test of another crate of the workspace: the binary of the same profile
        None => super::repo_root().join("target/debug/livetable"),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A livetable process.
pub struct Node {
    pub name: String,
    pub child: Option<Child>,
    pub port: u16,
    pub base: String,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Node {
    /// Starts `livetable --role <role>` for deployment `group` on a free port; `extra` are more
    /// flags. Logs go to `<logs>/<name>.log`.
    pub fn spawn(
        name: &str,
        role: &str,
        group: &str,
        topics: &str,
        data_dir: &Path,
        logs: &Path,
        extra: &[&str],
    ) -> Node {
        Node::spawn_with_brokers(name, role, group, topics, data_dir, logs, &brokers(), extra)
    }

    /// (Re)starts the process with the same arguments (appending to its log).
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(livetable_bin())
            .args(&self.args)
            // LIVETABLE_TEST_LOG: another filter for the nodes' logs (e.g. to debug a test)
            .env(
                "LIVETABLE_LOG",
                std::env::var("LIVETABLE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("RUST_LOG")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 20 s).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// Whether the process has exited, and how.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub async fn wait_ready(&self, deadline: Duration) {
        let base = self.base.clone();
        eventually(
            &format!("{} ready (log {})", self.name, self.log.display()),
            deadline,
            || {
                let base = base.clone();
                async move {
                    let (status, _) = get_json_quiet(&format!("{base}/readyz")).await?;
                    (status == 200).then_some(())
                }
            },
        )
        .await
    }

    /// The value of an unlabelled metric.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = super::http()
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        super::metric_value(&text, name)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `GET` that tolerates a process that is not listening yet.
pub async fn get_json_quiet(url: &str) -> Option<(u16, Value)> {
    let resp = super::http().get(url).send().await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.json().await.unwrap_or(Value::Null)))
}

/// What a live client saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// `{key: row}` as the client holds it.
    pub state: BTreeMap<String, Value>,
    pub snapshots: usize,
    pub patches: usize,
    /// The last complete position (resume token).
    pub pos: Option<String>,
    /// Every time a key's `n` went back.
    pub regressions: Vec<String>,
    /// The highest `n` each key ever showed, through deletes.
    pub max_ever: BTreeMap<String, i64>,
    /// Every time a key showed an `n` below one it had shown before, a delete in between or not
    /// (where `n` grows along the stream, a re-created key's too).
    pub older_than_ever: Vec<String>,
    pub closed: bool,
}

/// A WebSocket client of one table that checks, message by message, that no key's `n` column
/// ever goes back (snapshots included), until it is aborted or its connection ends.
pub struct Watcher {
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Connects to `base` (`/ws?table=..`, resuming from `since` when given).
    pub async fn connect(base: &str, table: &str, since: Option<&str>) -> Watcher {
        let mut url = format!("{}/ws?table={table}", base.replace("http://", "ws://"));
        if let Some(s) = since {
            url.push_str(&format!("&since={s}"));
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut complete = false;
            while let Some(msg) = ws.next().await {
                let Ok(Message::Text(t)) = msg else {
                    if matches!(msg, Ok(Message::Ping(_)) | Ok(Message::Pong(_))) {
                        continue;
                    }
                    break;
                };
                let m: Value = serde_json::from_str(t.as_str()).unwrap();
                let mut seen = s.lock().unwrap();
                let (kind, rows) = match m["type"].as_str() {
                    Some("snapshot") => {
                        seen.snapshots += 1;
                        complete = m["more"] != Value::Bool(true);
                        ("snapshot", m["rows"].clone())
                    }
                    Some("patch") => {
                        seen.patches += 1;
                        if m["more"] != Value::Bool(true) {
                            complete = true;
                        }
                        ("patch", m["patch"].clone())
                    }
                    _ => continue,
                };
                let Value::Object(rows) = rows else { continue };
                let fresh = kind == "snapshot";
                let mut next = if fresh {
                    BTreeMap::new()
                } else {
                    seen.state.clone()
                };
                let touched: Vec<String> = rows.keys().cloned().collect();
                for (k, v) in rows {
                    if v.is_null() {
                        next.remove(&k);
                        continue;
                    }
                    let mut row = next.get(&k).cloned().unwrap_or(Value::Null);
                    livetable::patch::merge(&mut row, &v);
                    next.insert(k, row);
                }
                // no key's n goes back, not even across a snapshot
                for (k, row) in &next {
                    let (Some(new), Some(old)) = (
                        row["n"].as_i64(),
                        seen.state.get(k).and_then(|r| r["n"].as_i64()),
                    ) else {
                        continue;
                    };
                    if new < old {
                        let r = format!("{k}: {old} -> {new} ({kind})");
                        seen.regressions.push(r);
                    }
                }
                for k in &touched {
                    let Some(n) = next.get(k).and_then(|r| r["n"].as_i64()) else {
                        continue;
                    };
                    let max = seen.max_ever.get(k).copied().unwrap_or(i64::MIN);
                    if n < max {
                        seen.older_than_ever
                            .push(format!("{k}: {max} -> {n} ({kind})"));
                    }
                    seen.max_ever.insert(k.clone(), n.max(max));
                }
                seen.state = next;
                if complete {
                    seen.pos = m["pos"].as_str().map(String::from);
                }
            }
            s.lock().unwrap().closed = true;
        });
        Watcher { seen, task }
    }

    pub fn abort(&self) {
        self.task.abort();
    }

    /// Waits until the client's rows equal `want` (`{key: n}`).
    pub async fn until_state(&self, want: &BTreeMap<String, i64>, deadline: Duration, what: &str) {
        let seen = self.seen.clone();
        eventually(what, deadline, || {
            let seen = seen.clone();
            async move {
                let s = seen.lock().unwrap();
                let have: BTreeMap<String, i64> = s
                    .state
                    .iter()
                    .filter_map(|(k, v)| v["n"].as_i64().map(|n| (k.clone(), n)))
                    .collect();
                (have == *want).then_some(())
            }
        })
        .await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `table` of the node at `base` serves exactly `want` (see [`api_state`]); panics
/// with `what` after `deadline`.
pub async fn until_api_state(
    base: &str,
    table: &str,
    want: &BTreeMap<String, i64>,
    deadline: Duration,
    what: &str,
) {
    super::eventually(what, deadline, || async {
        (api_state(base, table).await.as_ref() == Some(want)).then_some(())
    })
    .await;
}

/// `{key: n}` of a table as the HTTP API serves it.
pub async fn api_state(base: &str, table: &str) -> Option<BTreeMap<String, i64>> {
    let (status, body) = get_json(&format!("{base}/api/tables/{table}")).await;
    if status != 200 {
        return None;
    }
    Some(
        body["rows"]
            .as_object()?
            .iter()
            .filter_map(|(k, v)| v["n"].as_i64().map(|n| (k.clone(), n)))
            .collect(),
    )
}

impl Node {
    /// As [`Node::spawn`], against `brokers` instead of the tests' broker (a test's own
    /// [`super::OwnBroker`]): `--brokers` may be given only once.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_with_brokers(
        name: &str,
        role: &str,
        group: &str,
        topics: &str,
        data_dir: &Path,
        logs: &Path,
        brokers: &str,
        extra: &[&str],
    ) -> Node {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "--role".into(),
            role.into(),
            "--brokers".into(),
            brokers.into(),
            "--topics".into(),
            topics.into(),
            "--group-id".into(),
            group.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data_dir.to_str().unwrap().into(),
            "--kafka-prop".into(),
            "session.timeout.ms=6000".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut n = Node {
            name: name.into(),
            child: None,
            port,
            base: format!("http://127.0.0.1:{port}"),
            log: logs.join(format!("{name}.log")),
            args,
        };
        n.start();
        n
    }

    /// The process's resident memory (`VmRSS` of `/proc/<pid>/status`), when it runs.
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }
}

//! What the scenarios run against: the broker (started with dev/broker when none answers), livetable
//! processes (the release binary beside this one, pinned to a core), and the load tools.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// Where binaries and scripts are, how processes are pinned, what was run.
pub struct Env {
    pub bin_dir: PathBuf,
    pub repo: PathBuf,
    pub brokers: String,
    pub server_cpu: Option<String>,
    pub tools_cpu: Option<String>,
    pub work: tempfile::TempDir,
    pub run_id: String,
    pub commands: std::sync::Mutex<Vec<String>>,
    started_broker: bool,
}

fn has_taskset() -> bool {
    Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

impl Env {
    pub fn new(
        brokers: &str,
        server_cpu: Option<String>,
        tools_cpu: Option<String>,
    ) -> anyhow::Result<Env> {
        let exe = std::env::current_exe()?;
        let bin_dir = exe.parent().context("binary directory")?.to_path_buf();
        let repo = exe
            .ancestors()
            .find(|p| p.join("dev/broker").is_file())
            .context("bench must run from the repository's target/ directory (dev/broker not found above it)")?
            .to_path_buf();
        let pin = has_taskset();
        if !pin && (server_cpu.is_some() || tools_cpu.is_some()) {
            eprintln!("bench: taskset not found: processes are not pinned");
        }
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let mut env = Env {
            bin_dir,
            repo,
            brokers: brokers.to_string(),
            server_cpu: server_cpu.filter(|_| pin),
            tools_cpu: tools_cpu.filter(|_| pin),
            // BENCH_KEEP=1 keeps the work directory (livetable's logs and data) after the run
            work: tempfile::Builder::new()
                .prefix("livetable-bench")
                .disable_cleanup(std::env::var_os("BENCH_KEEP").is_some())
                .tempdir()?,
            run_id: format!("b{t}"),
            commands: std::sync::Mutex::new(Vec::new()),
            started_broker: false,
        };
        env.ensure_broker()?;
        Ok(env)
    }

    /// The last `lines` lines of every livetable log written since `since`, for a failed
    /// scenario's error output (the work directory is deleted after the run unless BENCH_KEEP).
    pub fn log_tails_since(&self, since: std::time::SystemTime, lines: usize) -> String {
        let Ok(dir) = std::fs::read_dir(self.work.path()) else {
            return String::new();
        };
        let mut logs: Vec<PathBuf> = dir
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("livetable-") && n.ends_with(".log"))
            })
            .filter(|p| {
                std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t >= since)
            })
            .collect();
        logs.sort();
        let mut out = String::new();
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "==> {} (last {} of {} lines)\n",
                p.display(),
                lines.min(all.len()),
                all.len()
            ));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn ensure_broker(&mut self) -> anyhow::Result<()> {
        let addr: std::net::SocketAddr = self
            .brokers
            .split(',')
            .next()
            .unwrap_or_default()
            .parse()
            .context("--brokers must be HOST:PORT on loopback")?;
        anyhow::ensure!(addr.ip().is_loopback(), "bench only uses loopback brokers");
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return Ok(());
        }
        eprintln!("bench: no broker on {addr}: starting one with dev/broker");
        let st = Command::new(self.repo.join("dev/broker"))
            .arg("start")
            .env("BROKER_ADDR", addr.to_string())
            .status()?;
        anyhow::ensure!(st.success(), "dev/broker start failed");
        self.started_broker = true;
        Ok(())
    }

    pub fn topic(&self, scenario: &str) -> String {
        format!("{}.{scenario}.game_odds", self.run_id)
    }

    fn pinned(&self, cpu: &Option<String>, program: &Path) -> Command {
        let mut c = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu).arg(program);
                c
            }
            None => Command::new(program),
        };
        c.stdin(Stdio::null());
        c
    }

    fn record(&self, c: &Command) {
        let line = std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|s| {
                let s = s.to_string_lossy();
                let s = s.replace(&*self.bin_dir.to_string_lossy(), "target/release");
                let s = s.replace(&*self.work.path().to_string_lossy(), "$WORK");
                if s.contains([' ', '^', '*', '\\']) {
                    format!("'{s}'")
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        if let Ok(mut v) = self.commands.lock() {
            v.push(line);
        }
    }

    /// Runs a load tool (cdc-gen, ws-swarm) to the end; returns its JSON summary.
    pub fn tool(&self, name: &str, args: &[String]) -> anyhow::Result<Value> {
        self.spawn_tool(name, args)?.finish()
    }

    pub fn spawn_tool(&self, name: &str, args: &[String]) -> anyhow::Result<Tool> {
        let mut c = self.pinned(&self.tools_cpu, &self.bin_dir.join(name));
        c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        self.record(&c);
        Ok(Tool {
            name: name.to_string(),
            child: c.spawn().with_context(|| {
                format!("{name}: build it with cargo build --release -p livetable-load")
            })?,
        })
    }

    /// Starts livetable for `topic` with a data directory of its own; waits until HTTP answers.
    pub fn livetable(&self, name: &str, topic: &str, extra: &[&str]) -> anyhow::Result<Livetable> {
        // BENCH_LOG=info (say) for the single-node scenarios' logs; warn by default
        let level = std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into());
        let mut args: Vec<String> = vec!["--log".into(), level];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_livetable(name, name, topic, self.server_cpu.clone(), args)
    }

    /// Starts node `name` of deployment `deployment` (its group id and topics derive from the
    /// deployment) in `--role role`, pinned to `cpu`; logs at info level as JSON lines (the
    /// scale-out scenarios read the rebalance times from them); waits until HTTP answers.
    pub fn node(
        &self,
        deployment: &str,
        name: &str,
        role: &str,
        topic: &str,
        cpu: Option<String>,
        extra: &[&str],
    ) -> anyhow::Result<Livetable> {
        let mut args: Vec<String> = vec![
            "--role".into(),
            role.into(),
            "--kafka-prop".into(),
            "session.timeout.ms=6000".into(),
            "--log".into(),
            "info".into(),
            "--log-format".into(),
            "json".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_livetable(
            deployment,
            &format!("{deployment}-{name}"),
            topic,
            cpu,
            args,
        )
    }

    fn spawn_livetable(
        &self,
        deployment: &str,
        name: &str,
        topic: &str,
        cpu: Option<String>,
        extra: Vec<String>,
    ) -> anyhow::Result<Livetable> {
        let port = free_port()?;
        let data_dir = self.work.path().join(format!("data-{name}"));
        let mut l = Livetable {
            base: format!("http://127.0.0.1:{port}"),
            data_dir,
            args: vec![
                "--brokers".into(),
                self.brokers.clone(),
                "--topics".into(),
                topic.into(),
                "--group-id".into(),
                format!("{}-{deployment}", self.run_id),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--changelog-prefix".into(),
                format!("{}.{deployment}.table.", self.run_id),
                "--dlq-topic".into(),
                format!("{}.{deployment}.dlq", self.run_id),
                // the load tools connect from a few loopback addresses: the per-IP cap (1,000
                // by default) would refuse all but a few thousand of their clients
                "--max-connections-per-ip".into(),
                "0".into(),
            ],
            cpu,
            child: None,
            log: self.work.path().join(format!("livetable-{name}.log")),
        };
        l.args.extend(extra);
        self.start(&mut l)?;
        Ok(l)
    }

    pub fn start(&self, l: &mut Livetable) -> anyhow::Result<()> {
        let mut c = self.pinned(&l.cpu, &self.bin_dir.join("livetable"));
        // livetable logs to stdout (tracing's default), start-up errors go to stderr
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&l.log)?;
        c.args(&l.args)
            .arg("--data-dir")
            .arg(&l.data_dir)
            .stdout(log.try_clone()?)
            .stderr(log);
        self.record(&c);
        l.child = Some(
            c.spawn()
                .context("livetable: build it with cargo build --release")?,
        );
        let until = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(l.base.trim_start_matches("http://")).is_err() {
            if let Some(st) = l.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("livetable exited: {st} (log {})", l.log.display());
            }
            anyhow::ensure!(
                Instant::now() < until,
                "livetable did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.started_broker {
            let _ = Command::new(self.repo.join("dev/broker"))
                .arg("stop")
                .env("BROKER_ADDR", &self.brokers)
                .status();
        }
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running load tool.
pub struct Tool {
    name: String,
    child: Child,
}

impl Tool {
    /// Ends the tool before it finishes (SIGKILL), its summary discarded.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn finish(self) -> anyhow::Result<Value> {
        let out = self.child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok());
        match summary {
            Some(v) if out.status.success() => Ok(v),
            _ => bail!(
                "{} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ")
            ),
        }
    }
}

/// A livetable process under test.
pub struct Livetable {
    pub base: String,
    pub data_dir: PathBuf,
    args: Vec<String>,
    /// The CPU list it is pinned to (taskset -c); None = not pinned.
    cpu: Option<String>,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Livetable {
    /// The CPU list it is pinned to at its next start (None: not pinned).
    pub fn set_cpu(&mut self, cpu: Option<String>) {
        self.cpu = cpu;
    }

    pub fn cpu(&self) -> Option<&str> {
        self.cpu.as_deref()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident set size in bytes (from /proc).
    pub fn rss(&self) -> anyhow::Result<u64> {
        let pid = self.pid().context("not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("VmRSS")?;
        Ok(kb * 1024)
    }

    /// CPU seconds used so far (utime + stime from /proc).
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        let pid = self.pid().context("not running")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let rest = stat.rsplit_once(')').context("stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        Ok(ticks / 100.0)
    }

    /// SIGTERM, wait for the exit (graceful shutdown).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let until = Instant::now() + Duration::from_secs(30);
            while c.try_wait()?.is_none() {
                if Instant::now() > until {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// SIGKILL, and the exit reaped.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

impl Drop for Livetable {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

//! The processes the suite runs and breaks: the broker (Tansu, with its data in an S3 store held by
//! a separate moto server when one can be installed, so that the broker can be killed and
//! restarted without losing anything), livetable nodes, PostgreSQL and Kafka Connect (through the
//! repository's dev/ scripts), and a small tmpfs for a data directory that can be filled up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// moto's S3 server: Tansu's `s3://` storage engine keeps every topic, offset and group there.
pub const MOTO_VERSION: &str = "5.2.5";

pub fn log(msg: impl AsRef<str>) {
    let t = chrono_like_now();
    eprintln!("[chaos {t}] {}", msg.as_ref());
}

fn chrono_like_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .is_ok()
}

pub fn wait_port(port: u16, deadline: Duration, what: &str) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    while !port_open(port) {
        if Instant::now() > until {
            bail!("{what} did not listen on 127.0.0.1:{port} within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Resident set size of a process in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A child process with its log file, killed when dropped.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Proc {
    pub fn new(name: &str, program: &Path, args: Vec<String>, logs: &Path) -> Proc {
        Proc {
            child: None,
            log: logs.join(format!("{name}.log")),
            program: program.into(),
            args,
            envs: Vec::new(),
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> Proc {
        self.envs.push((k.into(), v.into()));
        self
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; the exit status when it exited by itself.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        signal(c.id(), "TERM");
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// The exit status when the process ended by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(st)
    }

    /// What the process logged since it was last started (its log after the last line
    /// containing `start_line`).
    pub fn log_since(&self, start_line: &str) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        match text.rfind(start_line) {
            Some(i) => text[i..].to_string(),
            None => text,
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // a stopped process cannot die until it is continued
            signal(pid, "CONT");
        }
        self.kill9();
    }
}

/// The repository (for dev/ scripts), found above the running binary or the working directory.
pub fn repo_root() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let cwd = std::env::current_dir()?;
    exe.ancestors()
        .chain(cwd.ancestors())
        .find(|p| p.join("dev/broker").is_file())
        .map(Path::to_path_buf)
        .context("the repository (dev/broker) is not above the binary nor the working directory")
}

/// Runs a dev/ script; its output goes to the log file; fails with the log's tail.
pub fn dev_script(
    repo: &Path,
    script: &str,
    args: &[&str],
    envs: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<String> {
    let out = Command::new(repo.join("dev").join(script))
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        use std::io::Write;
        let _ = writeln!(f, "$ dev/{script} {}\n{text}", args.join(" "));
    }
    if !out.status.success() {
        bail!("dev/{script} {} failed: {text}", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// How the broker keeps its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// `memory://`: a restart loses every topic, so the broker-restart fault is not run.
    Memory { why: String },
    /// `s3://` on a moto server (a separate process): the broker can be killed and restarted.
    S3 { moto: PathBuf },
}

/// Finds or installs moto's server in a virtualenv under the livetable cache.
pub fn ensure_moto(logs: &Path) -> Result<PathBuf, String> {
    let cache = std::env::var("LIVETABLE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
            PathBuf::from(home).join(".cache/livetable")
        });
    let venv = cache.join(format!("moto-{MOTO_VERSION}"));
    let server = venv.join("bin/moto_server");
    if server.is_file() && venv.join(".complete").is_file() {
        return Ok(server);
    }
    log(format!(
        "installing moto[server]=={MOTO_VERSION} from PyPI into {}",
        venv.display()
    ));
    let run = |c: &mut Command| -> Result<(), String> {
        let out = c.output().map_err(|e| e.to_string())?;
        let _ = std::fs::write(logs.join("moto-install.log"), &out.stderr);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .to_string())
        }
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .map_err(|e| format!("python3 -m venv failed: {e}"))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        &format!("moto[server]=={MOTO_VERSION}"),
    ]))
    .map_err(|e| format!("pip install moto[server] failed: {e}"))?;
    let _ = std::fs::write(venv.join(".complete"), "");
    Ok(server)
}

/// The broker: Tansu listening on `port`, advertising `advertised` (the proxy), and its storage.
pub struct Broker {
    pub tansu: Proc,
    /// Holds the S3 store's process (killed when the broker is dropped).
    pub _moto: Option<Proc>,
    pub storage: Storage,
    pub port: u16,
}

impl Broker {
    pub fn start(
        repo: &Path,
        port: u16,
        advertised: u16,
        moto_port: u16,
        want_s3: bool,
        logs: &Path,
    ) -> anyhow::Result<Broker> {
        let bin = dev_script(repo, "broker", &["path"], &[], &logs.join("dev.log"))?;
        let bin = PathBuf::from(bin.lines().last().unwrap_or_default());
        anyhow::ensure!(
            !port_open(port),
            "127.0.0.1:{port} is in use: the suite runs its own broker there"
        );
        let storage = if want_s3 {
            match ensure_moto(logs) {
                Ok(moto) => Storage::S3 { moto },
                Err(why) => Storage::Memory { why },
            }
        } else {
            Storage::Memory {
                why: "Tansu keeps memory:// topics in the process, a restart loses them all; its only other engine here, s3:// (on moto), fails fetches with UnknownServerError under this load (try --broker-storage s3)".into(),
            }
        };
        let mut moto = None;
        let url = match &storage {
            Storage::S3 { moto: server } => {
                anyhow::ensure!(!port_open(moto_port), "127.0.0.1:{moto_port} is in use");
                let mut m = Proc::new(
                    "moto",
                    server,
                    vec![
                        "-H".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        moto_port.to_string(),
                    ],
                    logs,
                );
                m.start()?;
                wait_port(moto_port, Duration::from_secs(30), "moto_server")?;
                create_bucket(moto_port)?;
                moto = Some(m);
                "s3://tansu/".to_string()
            }
            Storage::Memory { .. } => "memory://tansu/".to_string(),
        };
        let mut tansu = Proc::new(
            "broker",
            &bin,
            vec![
                "broker".into(),
                "--listener-url".into(),
                format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url".into(),
                format!("tcp://127.0.0.1:{advertised}"),
                "--storage-engine".into(),
                url,
            ],
            logs,
        )
        .env("RUST_LOG", "warn")
        .env("AWS_ACCESS_KEY_ID", "chaos")
        .env("AWS_SECRET_ACCESS_KEY", "chaos")
        .env("AWS_DEFAULT_REGION", "eu-west-2")
        .env("AWS_ENDPOINT", &format!("http://127.0.0.1:{moto_port}"))
        .env("AWS_ALLOW_HTTP", "true");
        tansu.start()?;
        wait_port(port, Duration::from_secs(30), "the broker")?;
        Ok(Broker {
            tansu,
            _moto: moto,
            storage,
            port,
        })
    }

    pub fn restartable(&self) -> bool {
        matches!(self.storage, Storage::S3 { .. })
    }

    pub fn storage_text(&self) -> String {
        match &self.storage {
            Storage::S3 { .. } => format!(
                "s3:// (Tansu's dynostore engine) on a moto {MOTO_VERSION} server, a separate process: topics, offsets and groups survive a broker kill -9"
            ),
            Storage::Memory { why } => format!("memory:// (no restart fault: {why})"),
        }
    }
}

/// Creates the bucket with a plain S3 `PUT /tansu` (moto accepts unsigned requests).
fn create_bucket(port: u16) -> anyhow::Result<()> {
    let body = "<CreateBucketConfiguration><LocationConstraint>eu-west-2</LocationConstraint></CreateBucketConfiguration>";
    let resp = reqwest::blocking::Client::new()
        .put(format!("http://127.0.0.1:{port}/tansu"))
        .body(body)
        .send()?;
    anyhow::ensure!(
        resp.status().is_success(),
        "create bucket: {}",
        resp.status()
    );
    Ok(())
}

/// A tmpfs of `mib` MiB mounted at `dir` (needs root); unmounted when dropped.
pub struct SmallFs {
    pub dir: PathBuf,
    pub mib: u64,
}

impl SmallFs {
    pub fn mount(dir: &Path, mib: u64) -> Result<SmallFs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallFs {
            dir: dir.into(),
            mib,
        })
    }

    /// Writes a ballast file until the filesystem is full; returns the bytes written.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let Ok(mut f) = std::fs::File::create(self.dir.join("ballast")) else {
            return 0;
        };
        let chunk = vec![0xA5u8; 1 << 20];
        let mut total = 0u64;
        while f.write_all(&chunk).is_ok() {
            total += chunk.len() as u64;
            if total > (self.mib + 1) << 20 {
                break;
            }
        }
        // the last partial megabyte
        let small = vec![0u8; 4096];
        while f.write_all(&small).is_ok() {
            total += 4096;
            if total > (self.mib + 2) << 20 {
                break;
            }
        }
        let _ = f.flush();
        total
    }

    pub fn free(&self) {
        let _ = std::fs::remove_file(self.dir.join("ballast"));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// PostgreSQL and a Debezium worker through dev/postgres and dev/connect, on their own port and
/// names.
pub struct Debezium {
    pub repo: PathBuf,
    pub pg_port: u16,
    pub name: String,
    pub table: String,
    pub prefix: String,
    pub brokers: String,
    pub log: PathBuf,
}

impl Debezium {
    /// Why the PostgreSQL part cannot run here, if it cannot.
    pub fn missing() -> Option<String> {
        let has = |c: &str| {
            Command::new("sh")
                .args(["-c", &format!("command -v {c}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !has("java") || !has("javac") {
            return Some("Java 17 (java, javac) is not installed".into());
        }
        let pg = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| d.path().join("bin/initdb").is_file());
        if !pg {
            return Some(
                "the PostgreSQL server binaries (Debian's postgresql) are not installed".into(),
            );
        }
        None
    }

    fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PG_PORT", self.pg_port.to_string()),
            ("CONNECT_NAME", self.name.clone()),
            ("TOPIC_PREFIX", self.prefix.clone()),
            ("PG_TABLE", format!("public.{}", self.table)),
            ("SLOT_NAME", self.name.clone()),
            ("BROKER_ADDR", self.brokers.clone()),
        ]
    }

    pub fn start_postgres(&self) -> anyhow::Result<()> {
        dev_script(&self.repo, "postgres", &["start"], &self.envs(), &self.log)?;
        self.sql(&format!(
            "drop table if exists {t}; create table {t} (id text primary key, n bigint not null, price numeric(10,3)); \
             alter table {t} replica identity full;",
            t = self.table
        ))?;
        Ok(())
    }

    pub fn sql(&self, q: &str) -> anyhow::Result<String> {
        dev_script(
            &self.repo,
            "postgres",
            &["psql", "-tAc", q],
            &self.envs(),
            &self.log,
        )
    }

    pub fn start_connect(&self) -> anyhow::Result<()> {
        dev_script(&self.repo, "connect", &["start"], &self.envs(), &self.log)?;
        Ok(())
    }

    pub fn connect_pid(&self) -> Option<u32> {
        let f = self.repo.join(format!(".run/connect-{}.pid", self.name));
        std::fs::read_to_string(f).ok()?.trim().parse().ok()
    }

    /// Stops the Kafka Connect worker (if its pid file is there) and PostgreSQL (a no-op when it
    /// is not running), without touching the database: for an interrupted run.
    pub fn stop_processes(&self) {
        if self.connect_pid().is_some() {
            let _ = dev_script(&self.repo, "connect", &["stop"], &self.envs(), &self.log);
        }
        let _ = dev_script(&self.repo, "postgres", &["stop"], &self.envs(), &self.log);
    }

    pub fn stop(&self) {
        let _ = dev_script(&self.repo, "connect", &["stop"], &self.envs(), &self.log);
        let _ = self.sql(&format!(
            "select pg_drop_replication_slot('{}') from pg_replication_slots where slot_name = '{}'",
            self.name, self.name
        ));
        let _ = self.sql(&format!("drop table if exists {}", self.table));
        let _ = dev_script(&self.repo, "postgres", &["stop"], &self.envs(), &self.log);
    }
}

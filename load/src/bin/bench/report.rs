//! The report: machine, revision, commands, results; as JSON and as a Markdown section.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::measure::{human, Scenario};
use crate::stack::Env;

#[derive(Serialize)]
pub struct Report {
    pub date: String,
    pub quick: bool,
    pub machine: Machine,
    pub revision: String,
    pub pinning: String,
    pub seconds: f64,
    pub scenarios: Vec<Scenario>,
    pub commands: Vec<String>,
}

#[derive(Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

fn read(p: &str) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn sh(cmd: &str, args: &[&str], dir: &Path) -> String {
    Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Machine {
    fn detect() -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        let kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        }
    }
}

impl Report {
    pub fn new(env: &Env, quick: &bool, seconds: f64, scenarios: Vec<Scenario>) -> Report {
        let mut revision = sh("git", &["rev-parse", "--short=12", "HEAD"], &env.repo);
        if !sh(
            "git",
            &["status", "--porcelain", "--untracked-files=no"],
            &env.repo,
        )
        .is_empty()
        {
            revision.push_str(" (with uncommitted changes)");
        }
        Report {
            date: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"], &env.repo),
            quick: *quick,
            machine: Machine::detect(),
            revision,
            pinning: match (&env.server_cpu, &env.tools_cpu) {
                (Some(s), Some(t)) => {
                    format!("livetable on CPU {s}, load tools on CPU {t} (taskset)")
                }
                (Some(s), None) => format!("livetable on CPU {s} (taskset), tools not pinned"),
                _ => "not pinned".into(),
            },
            seconds,
            scenarios,
            commands: env.commands.lock().map(|c| c.clone()).unwrap_or_default(),
        }
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut o = String::new();
        o.push_str(&format!(
            "Run of {}{}: revision `{}`, {} ({} cores), {} GiB, Linux {}; {}; took {:.0} s.\n\n",
            self.date,
            if self.quick {
                " (--quick: smoke sizes, not a measurement)"
            } else {
                ""
            },
            self.revision,
            m.cpu,
            m.cores,
            m.memory_gib,
            m.kernel,
            self.pinning,
            self.seconds
        ));
        o.push_str("| scenario | measure | value | goal | |\n|---|---|---|---|---|\n");
        for s in &self.scenarios {
            if let Some(e) = &s.error {
                o.push_str(&format!(
                    "| {} | FAILED | {} | | |\n",
                    s.name,
                    e.replace('|', "/")
                ));
            }
            for me in &s.measures {
                let (goal, verdict) = match me.goal {
                    Some(g) => (
                        g.text(),
                        if g.met(me.value) {
                            "met"
                        } else {
                            "**not met**"
                        },
                    ),
                    None => (String::new(), ""),
                };
                o.push_str(&format!(
                    "| {} | {} | {} {} | {} | {} |\n",
                    s.name,
                    me.name,
                    human(me.value),
                    me.unit,
                    goal,
                    verdict
                ));
            }
        }
        o.push('\n');
        for s in &self.scenarios {
            o.push_str(&format!("- **{}**: {}", s.name, s.setup));
            for n in &s.notes {
                o.push_str(&format!("; {n}"));
            }
            o.push('\n');
        }
        o.push_str("\nCommands the run executed (`$WORK` is its temporary directory):\n\n```sh\n");
        for c in &self.commands {
            o.push_str(c);
            o.push('\n');
        }
        o.push_str("```\n");
        o
    }
}

const BEGIN: &str = "<!-- bench:results:begin (written by target/release/bench) -->";
const END: &str = "<!-- bench:results:end -->";

/// Replaces the results section of a Markdown file (created when missing), keeping the rest.
pub fn write_section(path: &Path, section: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{BEGIN}\n{section}{}", &old[..b], &old[e..]),
        _ => format!(
            "{old}{}{BEGIN}\n{section}{END}\n",
            if old.is_empty() { "" } else { "\n" }
        ),
    };
    std::fs::write(path, new)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_results_section_is_replaced_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("B.md");
        std::fs::write(&p, "# Head\n\nanalysis\n").unwrap();
        write_section(&p, "one\n").unwrap();
        write_section(&p, "two\n").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("# Head\n\nanalysis\n"));
        assert!(text.contains("two\n") && !text.contains("one\n"));
        assert_eq!(text.matches(BEGIN).count(), 1);
    }
}

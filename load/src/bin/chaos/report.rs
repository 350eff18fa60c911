//! The report: faults by kind with their recovery times (p50/p99), changes and clients checked,
//! the counts that must be 0 (lost, reordered-visible, stale-after-recovery values), the process
//! memory over the run, and every failed check. JSON for tools, markdown for people.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::clients::Kind;
use crate::phase::{FaultKind, MemStat, PhaseReport};

pub struct Inputs<'a> {
    pub run_id: &'a str,
    pub seed: u64,
    pub command: String,
    pub long: bool,
    pub storage: String,
    pub out: &'a Path,
    pub duration: Duration,
    pub phases: &'a [PhaseReport],
    pub memory: &'a BTreeMap<String, MemStat>,
    pub skipped: &'a [String],
    pub rate: u64,
    pub keys: usize,
    pub partitions: i32,
}

pub struct Report {
    pub json: Value,
}

fn pct(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied()
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kb| (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_gib": mem_gib,
        "loadavg_at_end": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

fn git_rev(out: &Path) -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(out)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Report {
    pub fn build(i: Inputs<'_>) -> Report {
        let mut by_kind: BTreeMap<FaultKind, (usize, Vec<u64>, usize)> = BTreeMap::new();
        let mut failures: Vec<String> = Vec::new();
        let (mut lost, mut reordered, mut stale) = (0usize, 0u64, 0u64);
        let (mut stale_behind, mut replay_after_stale) = (0u64, 0u64);
        let mut lost_after_cl_deleted = 0usize;
        let mut view_topics_unwritten = 0usize;
        let (mut history_merged, mut history_skipped) = (0usize, 0usize);
        let mut deleted_behind = 0u64;
        let (mut changes, mut clients, mut values) = (0u64, 0usize, 0u64);
        let mut crashes = Vec::new();
        for p in i.phases {
            let t = p
                .topology
                .map(|t| serde_json::to_value(t).unwrap_or_default())
                .unwrap_or_default();
            let t = t.as_str().unwrap_or("?").to_string();
            changes += p.changes + p.pg_rows_written;
            for f in &p.faults {
                let e = by_kind.entry(f.kind).or_default();
                e.0 += 1;
                if let Some(ms) = f.recovery_ms {
                    e.1.push(ms);
                } else if !matches!(f.kind, FaultKind::Kill9Quick) {
                    e.2 += 1;
                }
            }
            for c in &p.clients {
                clients += 1;
                values += c.values_checked;
                reordered += c.reordered_visible;
                stale += c.stale_after_recovery;
                stale_behind += c.stale_behind_position;
                replay_after_stale += c.replay_after_stale;
                deleted_behind += c.deleted_behind;
                let replay = c.replay_after_stale;
                if replay > 0 {
                    failures.push(format!(
                        "[{t}] client {}: {replay} values went back in live patches replayed after a snapshot behind the client's position, e.g. {:?}",
                        c.name,
                        c.examples.iter().find(|e| e.contains("replay-after-stale"))
                    ));
                }
                if c.reordered_visible > replay {
                    failures.push(format!(
                        "[{t}] client {}: {} values went back in live patches, e.g. {:?}",
                        c.name,
                        c.reordered_visible - replay,
                        c.examples.iter().find(|e| e.contains("reordered-visible")
                            && !e.contains("replay-after-stale"))
                    ));
                }
                // told apart so that a known bug (BUG-2) cannot hide another one
                let behind = c.stale_behind_position;
                let other = c.stale_after_recovery - behind;
                if behind > 0 {
                    failures.push(format!(
                        "[{t}] client {}: {behind} values went back in snapshots behind the client's position after a recovery, e.g. {:?}",
                        c.name,
                        c.examples.iter().find(|e| e.contains("behind-position"))
                    ));
                }
                if other > 0 && c.kind == Some(Kind::WsRows) {
                    failures.push(format!(
                        "[{t}] client {}: {other} values went back in the rows of a new connection (format=rows, no position), e.g. {:?}",
                        c.name,
                        c.examples.iter().find(|e| e.contains("stale-after-recovery"))
                    ));
                } else if other > 0 {
                    failures.push(format!(
                        "[{t}] client {}: {other} values went back in snapshots at or past the client's position, e.g. {:?}",
                        c.name,
                        c.examples
                            .iter()
                            .find(|e| e.contains("stale-after-recovery") && !e.contains("behind-position"))
                    ));
                }
                if !c.final_equal {
                    failures.push(format!(
                        "[{t}] client {}: final state != oracle ({} keys), {:?}",
                        c.name,
                        c.lost,
                        c.examples.last()
                    ));
                }
            }
            for tc in &p.tables {
                let l = tc.api_lost.max(tc.changelog_lost).max(tc.clients_lost);
                // what deleting the changelog breaks is counted apart
                if tc.table.contains("after the changelog was deleted") {
                    lost_after_cl_deleted += l;
                } else {
                    lost += l;
                }
                view_topics_unwritten += tc.view_topic_unwritten;
                history_merged += tc.history_merged;
                history_skipped += tc.history_skipped;
                for d in &tc.details {
                    failures.push(format!("[{t}] table {}: {d}", tc.table));
                }
            }
            for f in &p.failures {
                failures.push(format!("[{t}] {f}"));
            }
            for c in &p.crashes {
                crashes.push(format!("[{t}] {c}"));
            }
        }
        let faults: Value = by_kind
            .iter()
            .map(|(k, (n, rec, not))| {
                let mut rec = rec.clone();
                rec.sort();
                (
                    serde_json::to_value(k)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                    json!({
                        "count": n,
                        "recovered": rec.len(),
                        "not_recovered": not,
                        "recovery_ms_p50": pct(&rec, 0.5),
                        "recovery_ms_p99": pct(&rec, 0.99),
                        "recovery_ms_max": rec.last(),
                    }),
                )
            })
            .collect::<serde_json::Map<String, Value>>()
            .into();
        let json = json!({
            "tool": "chaos",
            "run_id": i.run_id,
            "seed": i.seed,
            "long": i.long,
            "command": i.command,
            "git_rev": git_rev(i.out),
            "machine": machine(),
            "broker_storage": i.storage,
            "workload": {"rate_per_sec": i.rate, "keys": i.keys, "partitions": i.partitions},
            "duration_secs": (i.duration.as_secs_f64() * 10.0).round() / 10.0,
            "out_dir": i.out.display().to_string(),
            "totals": {
                "faults": by_kind.values().map(|v| v.0).sum::<usize>(),
                "changes": changes,
                "clients_checked": clients,
                "values_checked": values,
                "lost": lost,
                "lost_after_changelog_deleted": lost_after_cl_deleted,
                "view_topics_unwritten": view_topics_unwritten,
                "history_keys_merged": history_merged,
                "history_changes_skipped": history_skipped,
                "history_deleted_behind": deleted_behind,
                "reordered_visible": reordered,
                "stale_after_recovery": stale,
                "stale_behind_position": stale_behind,
                "replay_after_stale": replay_after_stale,
                "crashes": crashes.len(),
                "failures": failures.len(),
            },
            "faults_by_kind": faults,
            "memory_mib": i.memory,
            "skipped": i.skipped,
            "failures": failures,
            "crashes": crashes,
            "phases": i.phases,
        });
        Report { json }
    }

    pub fn failures(&self) -> usize {
        self.json["totals"]["failures"].as_u64().unwrap_or(0) as usize
    }

    pub fn markdown(&self) -> String {
        let j = &self.json;
        let t = &j["totals"];
        let mut s = String::new();
        s.push_str(&format!(
            "# chaos run {} (seed {})\n\n`{}`\n\nrevision {}, {} s; machine: {} cpus ({}), {} GiB, load at the end {}.\nBroker storage: {}.\nWorkload: {} changes/s over {} keys on {} partitions, plus PostgreSQL transactions through Debezium when present.\n\n",
            j["run_id"].as_str().unwrap_or(""),
            j["seed"],
            j["command"].as_str().unwrap_or(""),
            j["git_rev"].as_str().unwrap_or(""),
            j["duration_secs"],
            j["machine"]["cpus"],
            j["machine"]["cpu"].as_str().unwrap_or(""),
            j["machine"]["memory_gib"],
            j["machine"]["loadavg_at_end"].as_str().unwrap_or(""),
            j["broker_storage"].as_str().unwrap_or(""),
            j["workload"]["rate_per_sec"],
            j["workload"]["keys"],
            j["workload"]["partitions"],
        ));
        s.push_str("## Totals\n\n| what | count |\n|---|---|\n");
        for k in [
            "faults",
            "changes",
            "clients_checked",
            "values_checked",
            "lost",
            "lost_after_changelog_deleted",
            "view_topics_unwritten",
            "history_keys_merged",
            "history_changes_skipped",
            "history_deleted_behind",
            "reordered_visible",
            "stale_after_recovery",
            "stale_behind_position",
            "replay_after_stale",
            "crashes",
            "failures",
        ] {
            s.push_str(&format!("| {k} | {} |\n", t[k]));
        }
        s.push_str("\n## Faults by kind (recovery: end of the fault -> new probe values on every serving node's API)\n\n| fault | count | recovered | not recovered | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|\n");
        if let Some(m) = j["faults_by_kind"].as_object() {
            for (k, v) in m {
                s.push_str(&format!(
                    "| {k} | {} | {} | {} | {} | {} | {} |\n",
                    v["count"],
                    v["recovered"],
                    v["not_recovered"],
                    v["recovery_ms_p50"],
                    v["recovery_ms_p99"],
                    v["recovery_ms_max"]
                ));
            }
        }
        s.push_str("\n## Phases\n\n");
        if let Some(ps) = j["phases"].as_array() {
            for p in ps {
                s.push_str(&format!(
                    "### {} ({} s): {}\n\n{} changes ({} deletes, {} re-creates), PostgreSQL: {} transactions, {} rows.\n\n",
                    p["topology"].as_str().unwrap_or("?"),
                    p["duration_secs"],
                    p["nodes"].as_array().map(|n| n.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
                    p["changes"],
                    p["deletes"],
                    p["recreates"],
                    p["pg_transactions"],
                    p["pg_rows_written"],
                ));
                s.push_str("| client | connects | resumes | snapshots | rows closes (4409) | values checked | reordered | stale after recovery | final == oracle |\n|---|---|---|---|---|---|---|---|---|\n");
                for c in p["clients"].as_array().into_iter().flatten() {
                    s.push_str(&format!(
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                        c["name"].as_str().unwrap_or(""),
                        c["connects"],
                        c["resumes"],
                        c["snapshots"],
                        c["rows_resyncs"],
                        c["values_checked"],
                        c["reordered_visible"],
                        c["stale_after_recovery"],
                        c["final_equal"]
                    ));
                }
                s.push_str("\n| table | oracle rows | API keys differing | changelog keys differing | client keys differing | input topic keys differing |\n|---|---|---|---|---|---|\n");
                for tc in p["tables"].as_array().into_iter().flatten() {
                    s.push_str(&format!(
                        "| {} | {} | {} | {} | {} | {} |\n",
                        tc["table"].as_str().unwrap_or(""),
                        tc["oracle_rows"],
                        tc["api_lost"],
                        tc["changelog_lost"],
                        tc["clients_lost"],
                        tc["input_lost"]
                    ));
                }
                s.push_str("\nFaults in order:\n\n");
                for f in p["faults"].as_array().into_iter().flatten() {
                    s.push_str(&format!(
                        "- t={}s {} on {}: recovery {} ms{}\n",
                        f["at_secs"],
                        f["kind"].as_str().unwrap_or(""),
                        f["target"].as_str().unwrap_or(""),
                        f["recovery_ms"],
                        f["note"]
                            .as_str()
                            .filter(|n| !n.is_empty())
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    ));
                }
                for sd in p["shutdown"].as_array().into_iter().flatten() {
                    s.push_str(&format!("- shutdown: {}\n", sd.as_str().unwrap_or("")));
                }
                s.push('\n');
            }
        }
        s.push_str("## Memory (resident, MiB)\n\n| process | first | max | last | samples |\n|---|---|---|---|---|\n");
        if let Some(m) = j["memory_mib"].as_object() {
            for (k, v) in m {
                s.push_str(&format!(
                    "| {k} | {:.1} | {:.1} | {:.1} | {} |\n",
                    v["first_mib"].as_f64().unwrap_or(0.0),
                    v["max_mib"].as_f64().unwrap_or(0.0),
                    v["last_mib"].as_f64().unwrap_or(0.0),
                    v["samples"]
                ));
            }
        }
        let list = |title: &str, v: &Value, s: &mut String| {
            let items = v.as_array().cloned().unwrap_or_default();
            s.push_str(&format!("\n## {title} ({})\n\n", items.len()));
            for x in items {
                s.push_str(&format!(
                    "- {}\n",
                    x.as_str().unwrap_or("").replace('\n', "\n  ")
                ));
            }
        };
        list("Failed checks", &j["failures"], &mut s);
        list("Processes that exited by themselves", &j["crashes"], &mut s);
        list("Skipped", &j["skipped"], &mut s);
        s.push_str(&format!(
            "\nLogs of every process: `{}/logs/`.\n",
            j["out_dir"].as_str().unwrap_or("")
        ));
        s
    }
}

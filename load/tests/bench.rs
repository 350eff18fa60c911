//! Smoke run of `bench --quick` against the real broker: every scenario runs end to end (real
//! livetable processes, cdc-gen, ws-swarm) without error and reports non-zero figures, so the
//! benchmark keeps working as the code changes. The figures themselves are not asserted.

use std::process::Command;

use serde_json::Value;

fn brokers() -> String {
    std::env::var("LIVETABLE_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A scenario of the report, which ran without error.
fn scenario<'a>(report: &'a Value, name: &str) -> &'a Value {
    let sc = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("scenario {name} missing"));
    assert!(sc["error"].is_null(), "{name} failed: {}", sc["error"]);
    sc
}

fn measure(report: &Value, scenario_name: &str, name: &str) -> f64 {
    let sc = scenario(report, scenario_name);
    sc["measures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"].as_str().unwrap().starts_with(name))
        .unwrap_or_else(|| panic!("{scenario_name}: no measure {name}: {sc}"))["value"]
        .as_f64()
        .unwrap()
}

#[test]
fn bench_quick_runs_every_scenario_with_nonzero_results() {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_bench"));
    let livetable = bin.with_file_name("livetable");
    assert!(
        livetable.exists(),
        "{} missing: bench runs the livetable binary beside it (cargo test --workspace builds it)",
        livetable.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let (json, md) = (dir.path().join("b.json"), dir.path().join("B.md"));
    let out = Command::new(&bin)
        .args(["--quick", "--brokers", &brokers()])
        .arg("--json-out")
        .arg(&json)
        .arg("--markdown-out")
        .arg(&md)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench --quick failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(report["machine"]["cores"].as_u64().unwrap() > 0);
    assert!(!report["revision"].as_str().unwrap().is_empty());
    assert!(report["commands"].as_array().unwrap().len() > 5);
    for (scenario, name) in [
        ("ingest", "changes/s"),
        ("snapshot", "SSE first byte"),
        ("snapshot", "WebSocket connect"),
        ("snapshot", "storm: clients served"),
        ("recovery", "restart -> ready"),
        ("recovery", "empty data dir"),
        (
            "recovery",
            "empty data dir -> restored from the changelog and ready, on every core",
        ),
        ("fanout", "row updates/s delivered"),
        ("fanout", "server: patch messages"),
        ("light", "latency p50"),
        ("light", "broker delivery p50"),
        ("light", "broker delivery p99"),
        ("latency", "latency p50"),
        ("latency", "broker delivery p50"),
        ("latency-few-clients", "latency p50"),
        ("connections", "connections open"),
        ("connections", "RSS per idle connection"),
        ("connections-snapshot", "connections open"),
        ("connections-snapshot", "RSS per idle connection"),
        (
            "auth",
            "connect -> snapshot (3 keys), jwt table + key claims",
        ),
        ("auth", "connect -> snapshot, jwt row filter"),
        ("auth", "fan-out, jwt key claims: row updates/s delivered"),
        ("auth", "fan-out: server CPU per row update, jwt / no auth"),
        ("scale-out-ingest", "1 materialiser: changes/s"),
        ("scale-out-ingest", "2 materialisers on one core: changes/s"),
        ("scale-out-clients", "1 gateway: row updates/s delivered"),
        ("scale-out-clients", "2 gateways: row updates/s delivered"),
        ("scale-out-clients", "2 gateways: CPU of gateway 2"),
        ("scale-out-failover", "kill -9 -> every key"),
        ("scale-out-failover", "part: kill -> the survivor assigned"),
        ("scale-out-failover", "keys that waited"),
        ("scale-out-failover", "join: a member starts -> it is ready"),
        (
            "scale-out-failover",
            "kill -9 + restart without --instance-id -> the restarted member ready",
        ),
        (
            "scale-out-failover",
            "kill -9 + restart with --instance-id -> the restarted member ready",
        ),
        ("scale-out-resume", "connect with since="),
        ("scale-out-resume", "resume hits"),
        ("publish", "acknowledged publishes/s"),
        ("publish", "ack latency p99 at"),
        ("publish", "sampled acks whose record"),
    ] {
        let v = measure(&report, scenario, name);
        assert!(v > 0.0 && v.is_finite(), "{scenario}/{name} = {v}");
    }
    // a resume on the other gateway is a hit: no snapshot
    assert_eq!(
        measure(&report, "scale-out-resume", "snapshots sent"),
        0.0,
        "a resume on another gateway sent a snapshot"
    );
    // clients attached during the rebalances: nothing goes back, they end with the gateway's rows
    for name in [
        "clients during the rebalances (",
        "clients during the rebalances: seq went back",
        "clients during the rebalances: keys whose final value differs",
    ] {
        assert_eq!(measure(&report, "scale-out-failover", name), 0.0, "{name}");
    }
    // the rate scenarios: every configuration ran, its clients got (nearly) every change, with
    // latencies; the verdict rows are there
    for name in ["clients-1k", "clients-100-max"] {
        let sc = scenario(&report, name);
        let scenario = name;
        let measures = sc["measures"].as_array().unwrap();
        // by the end of the name: "latency p99" is not "latency p99 beyond the broker (...)",
        // which is a difference of two p99s and can be below zero
        let named = |end: &str| -> Vec<f64> {
            measures
                .iter()
                .filter(|m| m["name"].as_str().unwrap().ends_with(end))
                .map(|m| m["value"].as_f64().unwrap())
                .collect()
        };
        let delivered: Vec<f64> = [
            ": delivered",
            ": delivered (row updates / changes x clients)",
        ]
        .iter()
        .flat_map(|e| named(e))
        .collect();
        assert!(!delivered.is_empty(), "{scenario}: {sc}");
        for d in delivered {
            // a light load on a quick run: every client gets every change
            assert!((0.9..=1.05).contains(&d), "{scenario}: delivered {d}: {sc}");
        }
        let p99 = named(": latency p99");
        assert!(!p99.is_empty(), "{scenario}: {sc}");
        assert!(
            p99.iter().all(|v| *v > 0.0 && v.is_finite()),
            "{scenario}: {sc}"
        );
    }
    assert!(measure(&report, "clients-100-max", "highest rate sustained").is_finite());
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(text.contains("| ingest | changes/s"), "{text}");
    assert!(text.contains("| clients-1k |"), "{text}");
}

//! The auth scenario (issue 13; README, "Deploying on the internet"): what `--auth jwt` costs a
//! client on connect and the server on fan-out. Every figure is paired: the same table and load on a livetable without
//! auth and on one with `--auth jwt` (HS256), medians over `auth_runs` runs, configurations
//! alternating within each run.
//!
//! - connect: `auth_connects` WebSocket connections one after another, each timed from the TCP
//!   connect to its snapshot, with a few keys (`keys=g1,g2,g3`; with auth the token grants the
//!   table and the key glob `g*`), and with a row-filter token (`game_id = sub`, one row); the
//!   server's CPU per connection over the same connections;
//! - fan-out: `auth_clients` clients (ws-swarm, no state) watch the whole table while cdc-gen
//!   changes it at `auth_rate`/s; with auth every client's token grants the key glob `g*`, so every
//!   row of every patch passes the claim check and both configurations deliver the same rows.
//!   Each run has a livetable and a topic of its own.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::client;
use crate::measure::{median, Scenario};
use crate::probe;
use crate::scenarios::{paced, prefill, s, swarm_connected, Sizes, TABLE};
use crate::stack::{Env, Livetable};

const SECRET: &str = "livetable-bench-hs256-secret-of-32-bytes!";

/// An HS256 token for `sub` with `grants` in livetable's claim, valid for two hours.
fn token(sub: &str, grants: Value) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 7200;
    let claims = json!({"sub": sub, "exp": exp, "livetable": grants});
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )?)
}

/// Starts livetable `name` on `topic` and waits until its table holds `rows` rows, read from its
/// metrics (with `--auth jwt` the data routes need a token).
fn loaded(
    env: &Env,
    name: &str,
    topic: &str,
    rows: u64,
    args: &[&str],
) -> anyhow::Result<Livetable> {
    let lt = env.livetable(name, topic, args)?;
    let label = format!("table=\"{TABLE}\"");
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let have = probe::metric_where(&probe::metrics(&lt.base), "livetable_table_rows", &label);
        if have >= rows as f64 {
            return Ok(lt);
        }
        anyhow::ensure!(
            Instant::now() < until,
            "{name}: {have} of {rows} rows after 30 s ({})",
            lt.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Median connect time (ms) and server CPU per connection (µs) of `n` connections.
fn connects(lt: &Livetable, query: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let cpu0 = lt.cpu_secs()?;
    let times = client::connect_times(&lt.base, query, n)?;
    let cpu = lt.cpu_secs()? - cpu0;
    Ok((median(times), cpu / n as f64 * 1e6))
}

/// One fan-out run against a fresh livetable: row updates/s delivered, freshness p50 and p99 (ms),
/// server CPU per row update delivered (µs), snapshots sent again (a client fell behind its
/// channel) and clients closed as slow consumers.
fn fanout(
    env: &Env,
    z: &Sizes,
    name: &str,
    lt_args: &[&str],
    token: Option<&str>,
) -> anyhow::Result<[f64; 6]> {
    // a topic per run: a fresh livetable on a topic earlier runs added to would still be applying
    // their (old-stamped) changes while its clients connect
    let topic = &env.topic(name);
    prefill(env, topic, z.auth_rows, z.auth_rows)?;
    let max = (z.auth_clients + 100).to_string();
    let mut args = vec!["--max-connections", &max];
    args.extend_from_slice(lt_args);
    let lt = loaded(env, name, topic, z.auth_rows, &args)?;
    let ramp = 2_000u64;
    let secs = z.auth_secs;
    let extra: Vec<String> = token.map(|t| vec![s("--token"), s(t)]).unwrap_or_default();
    let (swarm, connected) = swarm_connected(
        env,
        &lt,
        z.auth_clients,
        ramp,
        z.auth_clients / ramp + 1 + secs + 8,
        z,
        &extra,
    )?;
    anyhow::ensure!(
        connected >= z.auth_clients as f64,
        "{name}: {connected} of {} clients connected ({})",
        z.auth_clients,
        lt.log_tail()
    );
    let cpu0 = lt.cpu_secs()?;
    let t0 = Instant::now();
    paced(env, topic, z.auth_rows, z.auth_rate, secs)?;
    let load_secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let cpu = lt.cpu_secs()? - cpu0;
    let out = swarm.finish()?;
    let rows = out["row_updates"].as_f64().unwrap_or(0.0);
    anyhow::ensure!(rows > 0.0, "{name}: the clients received no row update");
    let p = |k: &str| out["freshness_ms"][k].as_f64().unwrap_or(f64::NAN);
    let m = probe::metrics(&lt.base);
    Ok([
        rows / load_secs,
        p("p50"),
        p("p99"),
        cpu / rows * 1e6,
        probe::metric(&m, "livetable_resnapshots_total"),
        probe::metric(&m, "livetable_slow_client_disconnects_total"),
    ])
}

pub fn auth(env: &Env, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    let topic = env.topic("auth");
    prefill(env, &topic, z.auth_rows, z.auth_rows)?;
    let secret = env.work.path().join("auth-hs256.secret");
    std::fs::write(&secret, SECRET)?;
    let secret = secret
        .to_str()
        .context("the work directory's path is not UTF-8")?;
    let jwt = ["--auth", "jwt", "--jwt-secret-file", secret];
    let keys_token = token("bench", json!({"tables": [TABLE], "keys": {TABLE: ["g*"]}}))?;
    let row_token = token(
        "g7",
        json!({"tables": [TABLE], "rows": {TABLE: {"game_id": "sub"}}}),
    )?;
    let few = format!("table={TABLE}&keys=g1,g2,g3");

    // connect: both livetables up at once, idle but for the connections measured
    let none = loaded(env, "auth-connect-none", &topic, z.auth_rows, &[])?;
    let with = loaded(env, "auth-connect-jwt", &topic, z.auth_rows, &jwt)?;
    let n = z.auth_connects;
    let (mut plain, mut keyed, mut rowed) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..z.auth_runs {
        plain.push(connects(&none, &few, n)?);
        keyed.push(connects(
            &with,
            &format!("{few}&access_token={keys_token}"),
            n,
        )?);
        rowed.push(connects(
            &with,
            &format!("table={TABLE}&access_token={row_token}"),
            n,
        )?);
    }
    drop((none, with));
    let med = |v: &[(f64, f64)], i: usize| {
        median(v.iter().map(|r| if i == 0 { r.0 } else { r.1 }).collect())
    };
    let (p_ms, k_ms, r_ms) = (med(&plain, 0), med(&keyed, 0), med(&rowed, 0));
    sc.add(
        "connect -> snapshot (3 keys), no auth: median",
        p_ms,
        "ms",
        None,
    );
    sc.add(
        "connect -> snapshot (3 keys), jwt table + key claims: median",
        k_ms,
        "ms",
        None,
    );
    sc.add(
        "connect -> snapshot, jwt row filter (1 row): median",
        r_ms,
        "ms",
        None,
    );
    sc.add("connect: jwt / no auth", k_ms / p_ms, "x", None);
    let (p_cpu, k_cpu) = (med(&plain, 1), med(&keyed, 1));
    sc.add("server CPU per connection, no auth", p_cpu, "µs", None);
    sc.add(
        "server CPU per connection, jwt table + key claims",
        k_cpu,
        "µs",
        None,
    );
    sc.add(
        "server CPU per connection, jwt row filter",
        med(&rowed, 1),
        "µs",
        None,
    );

    // fan-out: one livetable at a time, configurations alternating
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for r in 0..z.auth_runs {
        off.push(fanout(env, z, &format!("auth-fanout-none-{r}"), &[], None)?);
        on.push(fanout(
            env,
            z,
            &format!("auth-fanout-jwt-{r}"),
            &jwt,
            Some(&keys_token),
        )?);
    }
    let m = |v: &[[f64; 6]], i: usize| median(v.iter().map(|r| r[i]).collect());
    for (label, v) in [("no auth", &off), ("jwt key claims", &on)] {
        sc.add(
            &format!("fan-out, {label}: row updates/s delivered"),
            m(v, 0),
            "rows/s",
            None,
        );
        sc.add(
            &format!("fan-out, {label}: freshness p50"),
            m(v, 1),
            "ms",
            None,
        );
        sc.add(
            &format!("fan-out, {label}: freshness p99"),
            m(v, 2),
            "ms",
            None,
        );
        sc.add(
            &format!("fan-out, {label}: server CPU per row update delivered"),
            m(v, 3),
            "µs",
            None,
        );
        sc.add(
            &format!("fan-out, {label}: snapshots sent again (clients behind their channel)"),
            m(v, 4),
            "snapshots",
            None,
        );
        sc.add(
            &format!("fan-out, {label}: clients closed as slow consumers"),
            m(v, 5),
            "clients",
            None,
        );
    }
    sc.add(
        "fan-out: server CPU per row update, jwt / no auth",
        m(&on, 3) / m(&off, 3),
        "x",
        None,
    );
    Ok(())
}

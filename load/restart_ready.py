#!/usr/bin/env python3
"""Time from kill -9 to /readyz 200 of an all-in-one node with 100,000 rows (BENCHMARKS.md,
"Where a restart with --instance-id spends its time").

    cargo build --bin livetable -p livetable-load --bins
    python3 load/restart_ready.py [--instance-id n1] [--kills 3] [--brokers 127.0.0.1:19092]

Needs a running broker (./dev/broker start). Produces 100,000 changes of 100,000 keys to a new
4-partition topic with cdc-gen, starts the node, then kills and restarts it --kills times. Every
loop is bounded (300 s to the first ready, 120 s per restart). The node's log and data directory
stay in the printed directory.
"""
import argparse, os, signal, subprocess, tempfile, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--brokers", default="127.0.0.1:19092")
ap.add_argument("--instance-id", default="")
ap.add_argument("--kills", type=int, default=3)
ap.add_argument("--port", type=int, default=18080)
ap.add_argument("--bin-dir", default="target/debug")
ap.add_argument("extra", nargs="*", help="more livetable flags (after --)")
a = ap.parse_args()

run = f"rs{int(time.time())}"
topic = f"{run}.public.odds"
subprocess.run([f"{a.bin_dir}/cdc-gen", "--brokers", a.brokers, "--topic", topic, "--partitions", "4",
                "--keys", "100000", "--count", "100000"], check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
d = tempfile.mkdtemp(prefix=f"{run}-")
args = [f"{a.bin_dir}/livetable", "--brokers", a.brokers, "--topics", topic, "--group-id", "g" + run,
        "--data-dir", d + "/data", "--listen", f"127.0.0.1:{a.port}",
        "--kafka-prop", "session.timeout.ms=6000"] + a.extra
if a.instance_id:
    args += ["--instance-id", a.instance_id]
log = open(d + "/node.log", "ab")


def start():
    return subprocess.Popen(args, stdout=log, stderr=log, env=dict(os.environ, LIVETABLE_LOG="info"))


def ready(timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{a.port}/readyz", timeout=1).status == 200:
                return round(time.time() - t0, 2)
        except Exception:
            pass
        time.sleep(0.05)
    return None


p = start()
print("first start ready after (s):", ready(300))
time.sleep(5)
for i in range(a.kills):
    p.send_signal(signal.SIGKILL)
    p.wait()
    log.write(f"\n===== KILL9 at {time.strftime('%H:%M:%S')} =====\n".encode())
    log.flush()
    p = start()
    print(f"restart {i}: ready after kill -9 (s):", ready(120))
    time.sleep(3)
p.send_signal(signal.SIGTERM)
p.wait()
print("log:", d + "/node.log")

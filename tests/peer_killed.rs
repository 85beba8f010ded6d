//! A real process killed by SIGKILL (DESIGN.md fault model row 3, transport part): its peer
//! reports `PeerUnreachable` once the configured deadline has passed, and never hangs.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const UNREACHABLE_MS: u64 = 1000;
const HEARTBEAT_MS: u64 = 50;

struct Proc {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[String]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .arg("node")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start phalanx node");
    let stdout = child.stdout.take().expect("stdout");
    let stdin = child.stdin.take().expect("stdin");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    Proc { child, stdin, lines }
}

fn wait_for(p: &Proc, limit: Duration, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match p.lines.recv_timeout(left) {
            Ok(v) if pred(&v) => return v,
            Ok(v) => seen.push(v),
            Err(_) => panic!("no {what} within {limit:?}; saw {seen:?}"),
        }
    }
}

fn timers() -> Vec<String> {
    vec![
        "--heartbeat-ms".into(),
        HEARTBEAT_MS.to_string(),
        "--link-timeout-ms".into(),
        "400".into(),
        "--unreachable-ms".into(),
        UNREACHABLE_MS.to_string(),
    ]
}

#[test]
fn sigkilled_peer_is_reported_unreachable_within_the_configured_deadline() {
    let mut b_args = vec!["--rank".into(), "1".into(), "--tcp-listen".into(), "127.0.0.1:0".into()];
    b_args.extend(timers());
    let mut b = spawn(&b_args);
    let listening = wait_for(&b, Duration::from_secs(20), "listening line", |v| v["event"] == "listening");
    let addr = listening["tcp"][0].as_str().expect("tcp address").to_string();
    let mut a_args = vec!["--rank".into(), "0".into()];
    for _ in 0..2 {
        a_args.push("--path".into());
        a_args.push(format!("1=tcp://{addr}"));
    }
    a_args.extend(timers());
    let mut a = spawn(&a_args);
    let mut ups = 0;
    wait_for(&a, Duration::from_secs(20), "two links up", |v| {
        ups += (v["event"] == "link_up") as u32;
        ups == 2
    });
    // Traffic in flight when the peer dies.
    writeln!(a.stdin, "send 1 64MiB").unwrap();
    wait_for(&b, Duration::from_secs(20), "first bytes at the victim", |v| v["event"] == "link_up");
    b.child.kill().expect("SIGKILL the peer");
    b.child.wait().unwrap();
    let ev = wait_for(&a, Duration::from_secs(20), "peer_unreachable", |v| v["event"] == "peer_unreachable");
    assert_eq!(ev["peer"], 1);
    let since = ev["since_ms"].as_f64().unwrap();
    let at = ev["at_ms"].as_f64().unwrap();
    let waited = at - since;
    assert!(waited >= UNREACHABLE_MS as f64 - 1.0, "reported after {waited:.0} ms, before the deadline");
    // Reported within the deadline plus one timer tick (and process scheduling slack).
    assert!(
        waited <= (UNREACHABLE_MS + 4 * HEARTBEAT_MS) as f64,
        "reported {waited:.0} ms after the outage began; deadline {UNREACHABLE_MS} ms"
    );
    writeln!(a.stdin, "exit").unwrap();
    let status = a.child.wait().unwrap();
    assert!(status.success(), "the survivor exits cleanly: {status}");
    drop(b);
}

//! A real process killed by SIGKILL (DESIGN.md fault model row 3, transport part): its peer
//! reports `PeerUnreachable` once the configured deadline has passed, and never hangs.

mod support;

use std::time::Duration;

use support::process::NodeProcess;

const UNREACHABLE_MS: u64 = 1000;
const HEARTBEAT_MS: u64 = 50;

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
    let mut b = NodeProcess::start("rank 1", &[], &b_args);
    let listening = b.wait_for(Duration::from_secs(20), "listening line", |v| v["event"] == "listening");
    let addr = listening["tcp"][0].as_str().expect("tcp address").to_string();
    let mut a_args = vec!["--rank".into(), "0".into()];
    for _ in 0..2 {
        a_args.push("--path".into());
        a_args.push(format!("1=tcp://{addr}"));
    }
    a_args.extend(timers());
    let mut a = NodeProcess::start("rank 0", &[], &a_args);
    let mut ups = 0;
    a.wait_for(Duration::from_secs(20), "two links up", |v| {
        ups += (v["event"] == "link_up") as u32;
        ups == 2
    });
    // Traffic in flight when the peer dies.
    a.command("send 1 64MiB");
    b.wait_for(Duration::from_secs(20), "the victim's links", |v| v["event"] == "link_up");
    b.child.kill().expect("SIGKILL the peer");
    b.child.wait().unwrap();
    let ev = a.wait_for(Duration::from_secs(20), "peer_unreachable", |v| v["event"] == "peer_unreachable");
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
    a.command("exit");
    let status = a.child.wait().unwrap();
    assert!(status.success(), "the survivor exits cleanly: {status}");
    drop(b);
}

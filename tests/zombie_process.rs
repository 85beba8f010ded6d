//! A zombie with real processes: three `phalanx train-worker` ranks and an embedded
//! coordinator; one rank is paused with SIGSTOP past its failure timeout, the others move to a
//! new epoch without it; resumed with SIGCONT, it is told it was declared failed (fenced) and
//! stops — it never reports a step in the new epoch — while the others train on.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use phalanx_node::coordinator::{run_coordinator, ServerConfig};
use serde_json::Value;

const SECRET: &str = "zombie-process-test";

fn free_addr() -> SocketAddr {
    phalanx_net::free_loopback_addr().expect("a free port")
}

struct Worker {
    child: Child,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a line from `lines` matching `pred`; fails the test after `limit`.
fn wait_for(
    lines: &mpsc::Receiver<(usize, Value)>,
    limit: Duration,
    what: &str,
    mut pred: impl FnMut(usize, &Value) -> bool,
) -> (usize, Value) {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((i, v)) if pred(i, &v) => return (i, v),
            Ok(_) => {}
            Err(_) => panic!("no {what} within {limit:?}"),
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid; no memory is shared.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "signal {sig} delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_paused_past_its_failure_timeout_is_fenced_when_it_resumes() {
    support::init_log();
    let dir = std::env::temp_dir().join(format!("phalanx-zombie-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let coordinators = vec![(1u64, free_addr())];
    let mut config = ServerConfig::new(1, coordinators.clone(), dir.clone(), SECRET.as_bytes().to_vec());
    config.tick = Duration::from_millis(20);
    config.failure_timeout = Duration::from_millis(1500);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run_coordinator(config, |_| {}, async {
        let _ = stopped.await;
    }));

    let (tx, lines) = mpsc::channel::<(usize, Value)>();
    let mut workers = Vec::new();
    for i in 0..3usize {
        let mut child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
            .arg("train-worker")
            .args(["--coordinators", &format!("1={}", coordinators[0].1), "--secret", SECRET])
            .args(["--dc", &(i % 2).to_string(), "--host", &format!("z-{i}")])
            .args(["--listen", &free_addr().to_string(), "--state-listen", &free_addr().to_string()])
            .args(["--start-world", "3", "--steps", "100000", "--every", "10", "--report-every", "5"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("a worker starts");
        let out = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send((i, v)).is_err() {
                        break;
                    }
                }
            }
        });
        workers.push(Worker { child });
    }
    // Training runs; then worker 2 is paused.
    wait_for(&lines, Duration::from_secs(60), "progress", |i, v| {
        i == 2 && v["event"] == "step" && v["step"].as_u64() >= Some(20)
    });
    signal(&workers[2].child, libc::SIGSTOP);
    // The others move to an epoch without it.
    let (_, ev) = wait_for(&lines, Duration::from_secs(60), "an epoch without the paused rank", |i, v| {
        i != 2 && v["event"] == "epoch" && v["world"] == 2
    });
    let new_epoch = ev["epoch"].as_u64().expect("epoch");
    signal(&workers[2].child, libc::SIGCONT);
    // Resumed, the zombie learns it was fenced and stops; it never reports a step of the new
    // epoch. The others go on training.
    let mut fenced = false;
    let mut others_after = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !(fenced && others_after >= 2) {
        let Ok((i, v)) = lines.recv_timeout(Duration::from_millis(500)) else { continue };
        if i == 2 {
            assert!(
                !(v["event"] == "step" && v["epoch"].as_u64() >= Some(new_epoch)),
                "the zombie reported a step in the new epoch: {v}"
            );
            if v["event"] == "fenced" {
                fenced = true;
            }
        } else if v["event"] == "step" && v["epoch"].as_u64() >= Some(new_epoch) {
            others_after += 1;
        }
    }
    assert!(fenced, "the resumed rank was told it had been declared failed");
    assert!(others_after >= 2, "the others trained on in epoch {new_epoch}");
    let status = workers[2].child.wait().expect("the zombie exits");
    assert!(!status.success(), "a fenced rank exits with an error (a supervisor restarts it to rejoin)");
    drop(workers);
    let _ = stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}

//! Collectives across real processes on loopback (`phalanx node --world 4`): a 64 MiB
//! all-reduce over TCP and over QUIC; a rank SIGKILLed mid-all-reduce under `Abort` and under
//! `Shrink`; a straggler past the quorum deadline whose contribution comes back `Late` and is
//! carried into the next round, so that the sum over all rounds equals everything offered.

mod support;

use std::time::Duration;

use phalanx_net::tls::ClusterCa;
use serde_json::Value;
use support::process::NodeProcess;

const WORLD: usize = 4;

/// The tests of this file run one at a time: each is four processes on a small machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}
const PATIENCE: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Tcp,
    Quic,
}

/// Starts `WORLD` ranks, highest first (each dials the ranks above it).
fn start_ranks(kind: Kind, tls_dir: Option<&std::path::Path>) -> Vec<NodeProcess> {
    let mut procs: Vec<NodeProcess> = Vec::new();
    let mut addrs: Vec<(usize, String)> = Vec::new();
    for r in (0..WORLD).rev() {
        let mut args: Vec<String> = vec![
            "--rank".into(),
            r.to_string(),
            "--world".into(),
            WORLD.to_string(),
            "--heartbeat-ms".into(),
            "50".into(),
            "--link-timeout-ms".into(),
            "600".into(),
            "--unreachable-ms".into(),
            "1500".into(),
        ];
        match kind {
            Kind::Tcp => args.extend(["--tcp-listen".into(), "127.0.0.1:0".into()]),
            Kind::Quic => {
                args.extend(["--quic-listen".into(), "127.0.0.1:0".into()]);
                args.extend(["--tls-dir".into(), tls_dir.expect("QUIC needs TLS").display().to_string()]);
            }
        }
        let scheme = if kind == Kind::Tcp { "tcp" } else { "quic" };
        for (peer, addr) in &addrs {
            args.extend(["--path".into(), format!("{peer}={scheme}://{addr}")]);
        }
        let p = NodeProcess::start(&format!("rank {r}"), &[], &args);
        let l = p.wait_for(Duration::from_secs(30), "listening", |v| v["event"] == "listening");
        let addr = match kind {
            Kind::Tcp => l["tcp"][0].as_str().expect("a TCP address").to_string(),
            Kind::Quic => l["quic"].as_str().expect("a QUIC address").to_string(),
        };
        addrs.push((r, addr));
        procs.push(p);
    }
    procs.reverse();
    procs
}

/// What `contribution(rank, round, count)` of `phalanx node` sums to.
fn contribution_sum(rank: usize, round: usize, count: usize) -> f64 {
    (0..count).map(|j| ((rank + 1) * (round + 1) + j % 7) as f64).sum()
}

fn round_line(p: &NodeProcess, i: usize) -> Value {
    p.wait_for(PATIENCE, &format!("round {i}"), |v| v["event"] == "round" && v["i"] == i)
}

fn participants(v: &Value) -> Vec<usize> {
    v["participants"].as_array().expect("participants").iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

fn all_reduce_64mib(kind: Kind) {
    let dir = std::env::temp_dir().join(format!("phalanx-coll-{}-{}", std::process::id(), kind as u8));
    if kind == Kind::Quic {
        std::fs::create_dir_all(&dir).unwrap();
        let names: Vec<String> = (0..WORLD).map(|r| format!("rank-{r}")).collect();
        ClusterCa::generate("collectives-test").unwrap().write_dir(&dir, &names).unwrap();
    }
    let mut procs = start_ranks(kind, Some(&dir));
    let count: usize = std::env::var("COLL_COUNT").ok().and_then(|v| v.parse().ok()).unwrap_or(16 << 20); // 64 MiB of f32
    for p in &mut procs {
        p.command(&format!("allreduce 1 {count} abort 100000"));
    }
    let want: f64 = (0..WORLD).map(|r| contribution_sum(r, 0, count)).sum();
    let mut crcs = Vec::new();
    for (r, p) in procs.iter().enumerate() {
        let v = round_line(p, 0);
        assert_eq!(v["outcome"], "done", "rank {r}: {v}");
        assert_eq!(v["sum"].as_f64(), Some(want), "rank {r}");
        assert_eq!(participants(&v), (0..WORLD).collect::<Vec<_>>());
        crcs.push(v["crc32c"].clone());
    }
    assert!(crcs.windows(2).all(|w| w[0] == w[1]), "bit-identical results: {crcs:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn all_reduce_of_64_mib_is_correct_and_identical_on_4_processes_over_tcp() {
    let _serial = serial();
    all_reduce_64mib(Kind::Tcp);
}

#[test]
fn all_reduce_of_64_mib_is_correct_and_identical_on_4_processes_over_quic() {
    let _serial = serial();
    all_reduce_64mib(Kind::Quic);
}

/// Rank 3 is SIGKILLed once it has reported round 2 (it is then inside round 3).
fn kill_mid_run(policy: &str) -> (Vec<NodeProcess>, usize) {
    let mut procs = start_ranks(Kind::Tcp, None);
    let count = 1 << 18;
    for p in &mut procs {
        p.command(&format!("allreduce 12 {count} {policy} 20000"));
    }
    let victim = 3;
    round_line(&procs[victim], 2);
    procs[victim].child.kill().expect("SIGKILL");
    (procs, count)
}

#[test]
fn a_rank_killed_mid_all_reduce_fails_the_survivors_under_abort_naming_it() {
    let _serial = serial();
    let (procs, _) = kill_mid_run("abort");
    for (r, p) in procs.iter().enumerate().take(3) {
        let v = p.wait_for(PATIENCE, "an error round", |v| v["event"] == "round" && v["outcome"] == "error");
        let i = v["i"].as_u64().unwrap();
        assert!(i >= 2, "rank {r} failed in round {i}, before the kill");
        assert!(v["ms"].as_f64().unwrap() < 20_000.0, "rank {r} returned within the deadline: {v}");
        // The lost rank is named (or, if the deadline came first, the error says whom it waited for).
        assert!(v["lost"] == 3 || v["error"].as_str().unwrap().contains('3'), "rank {r}: {v}");
        let done = p.wait_for(PATIENCE, "rounds_done", |v| v["event"] == "rounds_done");
        assert_eq!(done["counters"]["dropped"], 1, "rank {r}: {done}");
    }
}

#[test]
fn a_rank_killed_mid_all_reduce_leaves_the_survivors_a_result_over_themselves_under_shrink() {
    let _serial = serial();
    let (procs, count) = kill_mid_run("shrink");
    let survivors = vec![0, 1, 2];
    let mut shrunk_rounds = 0;
    for i in 0..12 {
        let lines: Vec<Value> = procs.iter().take(3).map(|p| round_line(p, i)).collect();
        let first = &lines[0];
        for (r, v) in lines.iter().enumerate() {
            assert_eq!(v["outcome"], "done", "round {i}, rank {r}: {v}");
            assert_eq!(v["participants"], first["participants"], "round {i}: ranks agree on who took part");
            assert_eq!(v["crc32c"], first["crc32c"], "round {i}: bit-identical results");
        }
        let who = participants(first);
        assert!(who == survivors || who == (0..WORLD).collect::<Vec<_>>(), "round {i}: {who:?}");
        let want: f64 = who.iter().map(|r| contribution_sum(*r, i, count)).sum();
        assert_eq!(first["sum"].as_f64(), Some(want), "round {i}: the sum over exactly the participants");
        if who == survivors {
            shrunk_rounds += 1;
        }
        if i < 3 {
            assert_eq!(who.len(), WORLD, "round {i} was before the kill");
        }
    }
    assert!(shrunk_rounds >= 8, "after the kill the survivors go on without it ({shrunk_rounds} rounds)");
}

#[test]
fn a_straggler_past_the_quorum_deadline_gets_its_contribution_back_and_it_is_counted_next_round() {
    let _serial = serial();
    let mut procs = start_ranks(Kind::Tcp, None);
    let count = 4096;
    let step = |p: &mut NodeProcess| p.command(&format!("allreduce 1 {count} quorum:3:1500 30000"));
    let everyone = (0..WORLD).collect::<Vec<_>>();
    // Round 0: everyone.
    procs.iter_mut().for_each(step);
    for p in &procs {
        assert_eq!(participants(&round_line(p, 0)), everyone);
    }
    // Round 1: rank 0 (the coordinator, whose driver keeps coordinating while its trainer is
    // busy) is held back until the others have finished without it.
    procs.iter_mut().skip(1).for_each(step);
    for (r, p) in procs.iter().enumerate().skip(1) {
        let v = round_line(p, 1);
        assert_eq!((v["outcome"].as_str(), participants(&v)), (Some("done"), vec![1, 2, 3]), "rank {r}: {v}");
    }
    step(&mut procs[0]);
    let late = round_line(&procs[0], 1);
    assert_eq!(late["outcome"], "late", "{late}");
    assert_eq!(late["late_sum"].as_f64(), Some(contribution_sum(0, 1, count)));
    assert_eq!(participants(&late), vec![1, 2, 3]);
    // Round 2: rank 0 is back, its late contribution folded into this one.
    procs.iter_mut().for_each(step);
    for (r, p) in procs.iter().enumerate() {
        let v = round_line(p, 2);
        assert_eq!(participants(&v), everyone, "rank {r}: the next round includes rank 0: {v}");
    }
    // Everything offered was applied exactly once: rank 1 took part in every round.
    let done: Vec<Value> = procs
        .iter()
        .map(|p| {
            // The last command's `rounds_done` (earlier ones were passed over while waiting
            // for rounds).
            p.wait_for(PATIENCE, "rounds_done", |v| v["event"] == "rounds_done")
        })
        .collect();
    let offered: f64 = done.iter().map(|d| d["offered_sum"].as_f64().unwrap()).sum();
    assert_eq!(done[1]["applied_sum"].as_f64(), Some(offered), "the sum over all rounds is everything offered");
    for (r, d) in done.iter().enumerate() {
        let c = &d["counters"];
        let n = |k: &str| c[k].as_u64().unwrap();
        assert_eq!(n("offered"), n("applied") + n("late") + n("dropped"), "rank {r}: {c}");
        assert_eq!(n("late"), u64::from(r == 0), "rank {r}: {c}");
    }
}

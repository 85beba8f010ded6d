//! `phalanx launch` with real child processes: environment handed to each rank, a rank killed
//! by SIGKILL restarted with backoff, a rank that keeps failing given up on (exit status 1).

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

fn launch(args: &[&str]) -> (i32, Vec<String>, Vec<Value>) {
    let out = Command::new(env!("CARGO_BIN_EXE_phalanx")).arg("launch").args(args).output().expect("phalanx runs");
    let stdout = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    let events = String::from_utf8_lossy(&out.stderr).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    (out.status.code().unwrap_or(-1), stdout, events)
}

#[test]
fn ranks_get_their_place_and_a_killed_rank_is_restarted() {
    // Local rank 1 kills itself on its first start; the launcher restarts it.
    let script = r#"if [ "$PHALANX_RESTART_COUNT" = 0 ] && [ "$PHALANX_LOCAL_RANK" = 1 ]; then kill -9 $$; fi
echo "$PHALANX_RANK $PHALANX_LOCAL_RANK $PHALANX_WORLD $PHALANX_RESTART_COUNT $PHALANX_COORDINATORS $PHALANX_INCARNATION""#;
    let (code, stdout, events) = launch(&[
        "--nprocs",
        "3",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--coordinator",
        "127.0.0.1:7101",
        "--max-restarts",
        "2",
        "--backoff-ms",
        "10",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(code, 0, "events: {events:?}");
    let lines: BTreeSet<String> =
        stdout.iter().map(|l| l.rsplit_once(' ').map_or(l.clone(), |(a, _)| a.to_string())).collect();
    let expected: BTreeSet<String> =
        ["3 0 6 0 1=127.0.0.1:7101", "4 1 6 1 1=127.0.0.1:7101", "5 2 6 0 1=127.0.0.1:7101"]
            .into_iter()
            .map(String::from)
            .collect();
    assert_eq!(lines, expected);
    let incarnations: BTreeSet<&str> = stdout.iter().filter_map(|l| l.rsplit_once(' ').map(|(_, i)| i)).collect();
    assert_eq!(incarnations.len(), 3, "every start has its own incarnation");
    let restarted: Vec<&Value> = events.iter().filter(|e| e["launcher"] == "restarting").collect();
    assert_eq!(restarted.len(), 1);
    assert_eq!(restarted[0]["local_rank"], 1);
    let killed = events.iter().any(|e| e["launcher"] == "exited" && e["how"] == "killed by signal 9");
    assert!(killed, "the SIGKILL was seen: {events:?}");
    assert!(events.iter().any(|e| e["launcher"] == "done"));
}

#[test]
fn a_rank_failing_past_its_restarts_fails_the_launch_with_growing_backoff() {
    let (code, _, events) = launch(&[
        "--nprocs",
        "1",
        "--coordinator",
        "1=127.0.0.1:7101",
        "--max-restarts",
        "2",
        "--backoff-ms",
        "5",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(code, 1);
    let backoffs: Vec<u64> =
        events.iter().filter(|e| e["launcher"] == "restarting").filter_map(|e| e["backoff_ms"].as_u64()).collect();
    assert_eq!(backoffs, vec![5, 10], "two restarts, backoff doubling");
    assert!(events.iter().any(|e| e["launcher"] == "gave_up" && e["restarts"] == 2));
}

#[test]
fn bad_launch_arguments_are_usage_errors() {
    assert_eq!(launch(&["--nprocs", "0", "--coordinator", "127.0.0.1:1", "--", "true"]).0, 2);
    assert_eq!(launch(&["--nprocs", "1", "--coordinator", "nonsense", "--", "true"]).0, 2);
    assert_eq!(launch(&["--nprocs", "1", "--coordinator", "127.0.0.1:1"]).0, 2, "no command");
}

//! The command line contract: subcommands listed, bad input refused with exit status 2 and a
//! message that names what was wrong.

use std::process::Command;

fn phalanx(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phalanx")).args(args).output().expect("run phalanx");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_subcommand() {
    let (code, out, _) = phalanx(&["--help"]);
    assert_eq!(code, 0);
    for sub in ["demo", "bench", "node", "sim"] {
        assert!(out.contains(sub), "--help does not mention {sub}:\n{out}");
    }
}

#[test]
fn unknown_subcommands_and_bad_flags_exit_with_status_2_and_say_why() {
    let cases: &[(&[&str], &str)] = &[
        (&["frobnicate"], "frobnicate"),
        (&["bench", "p2p", "--bytes", "12XB"], "12XB"),
        (&["bench", "allgatherv"], "allgatherv"),
        (&["bench", "allreduce", "--world", "0"], "--world"),
        (&["bench", "p2p", "--world", "3"], "2 ranks"),
        (&["bench", "p2p", "--paths", "0"], "--paths"),
        (&["bench", "allreduce", "--segment", "8"], "--segment"),
        (&["bench", "allreduce", "--algorithm", "tree"], "tree"),
        (&["demo", "--messages", "many"], "many"),
        (&["node", "--rank", "0", "--path", "1=udp://1.2.3.4:5"], "scheme"),
    ];
    for (args, needle) in cases {
        let (code, _, err) = phalanx(args);
        assert_eq!(code, 2, "phalanx {args:?} exited {code}: {err}");
        assert!(err.contains(needle), "phalanx {args:?}: error does not mention {needle:?}:\n{err}");
    }
}

#[test]
fn sim_refuses_bad_scenarios_naming_file_line_and_field() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let bad = dir.join("bad-scenario.toml");
    std::fs::write(&bad, "name = \"x\"\n[topology]\nhosts_per_dc = 0\nnic_gbit_s = 10\n[workload]\nkind = \"data_parallel\"\nbytes = 8\nsteps = 1\n")
        .expect("write");
    let (code, _, err) = phalanx(&["sim", bad.to_str().expect("utf-8 path"), "--quiet"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad-scenario.toml:3: field `topology.hosts_per_dc`"), "{err}");
    let (code, _, err) = phalanx(&["sim", "/nonexistent/scenario.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/scenario.toml: cannot read"), "{err}");
}

#[test]
fn sim_writes_the_report_trace_and_plot() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sim-outputs");
    std::fs::create_dir_all(&dir).expect("dir");
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/scenarios/rank-crashes.toml");
    let (json, trace, plot) = (dir.join("r.json"), dir.join("t.json"), dir.join("p.svg"));
    let (code, _, err) = phalanx(&[
        "sim",
        scenario,
        "--seed",
        "5",
        "--quiet",
        "--json",
        json.to_str().expect("utf-8"),
        "--trace",
        trace.to_str().expect("utf-8"),
        "--plot",
        plot.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("json");
    for key in [
        "scenario",
        "seed",
        "ranks",
        "sim_time_s",
        "wall_time_s",
        "events",
        "trace_hash",
        "steps_completed",
        "steps_target",
        "goodput",
    ] {
        assert!(r.get(key).is_some(), "report lacks {key}: {r}");
    }
    for (table, key) in [
        ("collectives", "completed"),
        ("collectives", "failed"),
        ("collectives", "hung"),
        ("collectives", "wrong_results"),
        ("contributions", "applied"),
        ("contributions", "dropped_reported"),
        ("contributions", "lost"),
        ("recovery_s", "p50"),
        ("recovery_s", "max"),
    ] {
        assert!(r[table].get(key).is_some(), "report lacks {table}.{key}: {r}");
    }
    assert_eq!(r["seed"], 5);
    assert_eq!(r["faults_injected"]["crash"], 2);
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).expect("trace")).expect("json");
    let spans = t["traceEvents"].as_array().expect("events").iter().filter(|e| e["ph"] == "X").count();
    assert!(spans > 0, "a span per collective call");
    let svg = std::fs::read_to_string(&plot).expect("plot");
    assert!(svg.starts_with("<svg") && svg.contains("crash"), "an SVG with the faults marked");
}

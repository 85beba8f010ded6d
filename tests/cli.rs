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
    for sub in ["demo", "bench", "node"] {
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
        (&["demo", "--messages", "many"], "many"),
        (&["node", "--rank", "0", "--path", "1=udp://1.2.3.4:5"], "scheme"),
    ];
    for (args, needle) in cases {
        let (code, _, err) = phalanx(args);
        assert_eq!(code, 2, "phalanx {args:?} exited {code}: {err}");
        assert!(err.contains(needle), "phalanx {args:?}: error does not mention {needle:?}:\n{err}");
    }
}

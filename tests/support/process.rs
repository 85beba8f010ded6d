//! `phalanx node` processes driven from tests: stdin commands in, JSON lines out.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running `phalanx node` (killed when dropped).
pub struct NodeProcess {
    pub child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
    name: String,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProcess {
    /// Starts `prefix… phalanx node args…` (a prefix such as `ip netns exec NS`).
    pub fn start(name: &str, prefix: &[&str], args: &[String]) -> NodeProcess {
        let bin = env!("CARGO_BIN_EXE_phalanx");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .arg("node")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdin = child.stdin.take().expect("stdin is piped");
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
        NodeProcess { child, stdin, lines, name: name.to_string() }
    }

    /// Sends one stdin command.
    pub fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap_or_else(|e| panic!("{}: cannot write {line:?}: {e}", self.name));
    }

    /// Waits for a line matching `pred`; fails the test after `limit`, listing what it saw.
    pub fn wait_for(&self, limit: Duration, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(v) => seen.push(v),
                Err(_) => panic!("{}: no {what} within {limit:?}; saw {seen:?}", self.name),
            }
        }
    }

    /// Asks for counters and returns the `counters` line.
    pub fn counters(&mut self) -> Value {
        self.command("counters");
        self.wait_for(Duration::from_secs(10), "counters", |v| v["event"] == "counters")
    }
}

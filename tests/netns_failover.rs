//! Real link failure between real processes in network namespaces (DESIGN.md fault model rows 1
//! and 2, see docs/faults.md): three hosts A, B, C, each pair joined by two veth links on
//! separate /24 subnets, one `phalanx node` per host.
//!
//! * `ip link set … down` on one of the two A-B links in the middle of a 256 MiB transfer: the
//!   message still arrives once and intact, A reports the link failed and counts a failover.
//! * Both A-B links down in the middle of a 128 MiB transfer: the rest of the message is relayed
//!   through C and arrives intact; once the links are up again A dials B directly and the next
//!   message no longer goes through C.
//!
//! Requires root and iproute2 (`ip netns`, veth; `.ci/run` installs iproute2). If the namespaces
//! cannot be created the tests fail with the failing `ip` command and its error; they never pass
//! silently. The namespaces (and with them the veths) are deleted when a test ends, passing or
//! failing, and every node process is killed.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const HEARTBEAT_MS: u64 = 50;
/// Bound on every wait; the tests normally take a few seconds.
const LIMIT: Duration = Duration::from_secs(30);

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// The six veth links, as indices into [`Hosts::links`].
const AB1: usize = 0;
const AB2: usize = 1;
const AC1: usize = 2;
const AC2: usize = 3;
const BC1: usize = 4;
const BC2: usize = 5;
/// The two hosts each link joins, in the order above.
const ENDS: [(usize, usize); 6] = [(A, B), (A, B), (A, C), (A, C), (B, C), (B, C)];

// ---------------------------------------------------------------------------------------------
// Namespaces and veth links
// ---------------------------------------------------------------------------------------------

/// Runs `ip ARGS…`; panics with the command, its error output and what the test needs.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `ip {}`: {e} (network-namespace tests need root and iproute2)", args.join(" "))
    });
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {} (network-namespace tests need root and iproute2: `ip netns add` and veth links)",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// One veth link: a device in each of the two hosts it joins, on its own /24.
struct Veth {
    hosts: (usize, usize),
    dev: [String; 2],
    addr: [String; 2],
}

/// Hosts A, B, C as network namespaces, each pair joined by two veth links. Deleting the
/// namespaces on drop deletes the veths with them.
struct Hosts {
    ns: [String; 3],
    /// Namespaces made so far (a failure halfway still cleans up what exists).
    made: Vec<String>,
    links: Vec<Veth>,
}

impl Hosts {
    /// `tag` keeps the names of tests running side by side apart.
    fn new(tag: &str) -> Hosts {
        let pid = std::process::id();
        let ns = ["a", "b", "c"].map(|h| format!("phx{pid}{tag}{h}"));
        let mut hosts = Hosts { ns: ns.clone(), made: Vec::new(), links: Vec::new() };
        for n in &ns {
            ip(&["netns", "add", n]);
            hosts.made.push(n.clone());
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        let letter = ["a", "b", "c"];
        let mut nth = [[0u32; 3]; 3];
        for (k, &(x, y)) in ENDS.iter().enumerate() {
            nth[x][y] += 1;
            let n = nth[x][y];
            // Device names are per namespace: `ab1` in A is the end of A-B link 1, `ba1` in B the other.
            let dev = [format!("{}{}{n}", letter[x], letter[y]), format!("{}{}{n}", letter[y], letter[x])];
            // A test-only private range; these addresses exist only inside the namespaces.
            let addr = [format!("10.77.{}.1", k + 1), format!("10.77.{}.2", k + 1)];
            ip(&["-n", &ns[x], "link", "add", &dev[0], "type", "veth", "peer", "name", &dev[1], "netns", &ns[y]]);
            for (end, host) in [(0, x), (1, y)] {
                ip(&["-n", &ns[host], "addr", "add", &format!("{}/24", addr[end]), "dev", &dev[end]]);
                ip(&["-n", &ns[host], "link", "set", &dev[end], "up"]);
            }
            hosts.links.push(Veth { hosts: (x, y), dev, addr });
        }
        hosts
    }

    /// `ip -n NS link set DEV up|down` on the first host's end of `link`.
    fn set_link(&self, link: usize, up: bool) {
        let l = &self.links[link];
        ip(&["-n", &self.ns[l.hosts.0], "link", "set", &l.dev[0], if up { "up" } else { "down" }]);
    }

    /// The address of `host`'s end of `link`.
    fn addr(&self, link: usize, host: usize) -> &str {
        let l = &self.links[link];
        if l.hosts.0 == host {
            &l.addr[0]
        } else {
            assert_eq!(l.hosts.1, host, "link {link} does not reach host {host}");
            &l.addr[1]
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.made {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Node processes
// ---------------------------------------------------------------------------------------------

/// `ip netns exec NS phalanx node …`: commands on stdin, JSON lines on stdout (read by a
/// thread into a channel, stderr too as `{"event":"stderr"}`). Killed when dropped.
struct Rank {
    name: String,
    child: Child,
    stdin: ChildStdin,
    rx: Receiver<Value>,
    /// Every line received so far; waits scan it from a given index.
    log: Vec<Value>,
}

impl Drop for Rank {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The failing wait shows one rank; the others' last lines often say why.
            self.mark();
            eprintln!("{}: last lines:\n{}", self.name, self.lines(self.log.len().saturating_sub(40)));
        }
    }
}

impl Rank {
    fn start(name: &str, ns: &str, args: &[String]) -> Rank {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_phalanx"), "node"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} in {ns}: {e} (needs root and iproute2)"));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let out_tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str::<Value>(&line).unwrap_or_else(|_| json!({"event": "text", "line": line}));
                if out_tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(json!({"event": "stderr", "line": line})).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take().expect("piped stdin");
        Rank { name: name.to_string(), child, stdin, rx, log: Vec::new() }
    }

    fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap_or_else(|e| panic!("{}: cannot send {line:?}: {e}", self.name));
    }

    /// Takes in the lines that have arrived; returns how many there are, a mark for later waits.
    fn mark(&mut self) -> usize {
        while let Ok(v) = self.rx.try_recv() {
            self.log.push(v);
        }
        self.log.len()
    }

    /// Waits for the first line at index `from` or later for which `pred` holds (each line is
    /// shown to `pred` once, in order, so it may count). Panics after `limit`, with the lines seen.
    fn wait_for(
        &mut self,
        from: usize,
        limit: Duration,
        what: &str,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> (usize, Value) {
        let deadline = Instant::now() + limit;
        let mut i = from;
        loop {
            while i < self.log.len() {
                if pred(&self.log[i]) {
                    return (i, self.log[i].clone());
                }
                i += 1;
            }
            match self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(v) => self.log.push(v),
                Err(e) => {
                    let why = match e {
                        RecvTimeoutError::Timeout => format!("within {limit:?}"),
                        RecvTimeoutError::Disconnected => format!("before it exited ({:?})", self.child.try_wait()),
                    };
                    panic!("{}: no {what} {why}; lines since the wait began:\n{}", self.name, self.lines(from));
                }
            }
        }
    }

    /// Waits until `pred` has held for `n` lines from `from` on; returns the index of the last.
    fn wait_count(&mut self, from: usize, n: usize, what: &str, mut pred: impl FnMut(&Value) -> bool) -> usize {
        let mut seen = 0;
        self.wait_for(from, LIMIT, what, |v| {
            seen += pred(v) as usize;
            seen >= n
        })
        .0
    }

    /// Sends `counters` and returns the answer.
    fn counters(&mut self) -> Value {
        let from = self.mark();
        self.command("counters");
        self.wait_for(from, LIMIT, "counters line", |v| v["event"] == "counters").1
    }

    /// The lines from `from` on, `progress` lines thinned to the last few, for failure messages.
    fn lines(&self, from: usize) -> String {
        let lines = &self.log[from.min(self.log.len())..];
        let progress: Vec<usize> = (0..lines.len()).filter(|&i| lines[i]["event"] == "progress").collect();
        let keep_from = progress.len().saturating_sub(3);
        let dropped = &progress[..keep_from];
        let mut s = String::new();
        if !dropped.is_empty() {
            s += &format!("  ({} progress lines left out, all but the last 3)\n", dropped.len());
        }
        for (i, v) in lines.iter().enumerate() {
            if dropped.binary_search(&i).is_err() {
                s += &format!("  {v}\n");
            }
        }
        s
    }
}

fn is(v: &Value, event: &str) -> bool {
    v["event"] == event
}

fn link_up_with(v: &Value, peer: usize) -> bool {
    is(v, "link_up") && v["peer"] == peer
}

/// Starts C, then B, then A, each once the one before prints `listening`:
/// C (rank 2) listens on its four addresses; B (rank 1) listens on its two A-B addresses and
/// dials C over both B-C links; A (rank 0) dials B over both A-B links (paths 0 and 1) and C
/// over both A-C links (paths 2 and 3). Every dial binds to the dialer's end of its link.
fn start_ranks(h: &Hosts) -> [Rank; 3] {
    let timers = [
        "--heartbeat-ms".to_string(),
        HEARTBEAT_MS.to_string(),
        "--link-timeout-ms".into(),
        "400".into(),
        "--unreachable-ms".into(),
        "10000".into(),
        "--progress-ms".into(),
        "20".into(),
    ];
    let start = |host: usize, name: &str, listen: &[usize], dial: &[(usize, usize, &str)]| {
        let mut args = vec!["--rank".to_string(), host.to_string()];
        args.extend(timers.iter().cloned());
        for &link in listen {
            args.push("--tcp-listen".into());
            args.push(format!("{}:0", h.addr(link, host)));
        }
        for &(peer, link, remote) in dial {
            args.push("--path".into());
            args.push(format!("{peer}=tcp://{remote}@{}:0", h.addr(link, host)));
        }
        let name = format!("{name} in {}", h.ns[host]);
        let mut r = Rank::start(&name, &h.ns[host], &args);
        let (_, l) = r.wait_for(0, LIMIT, "listening line", |v| is(v, "listening"));
        let tcp: Vec<String> =
            l["tcp"].as_array().expect("tcp addresses").iter().map(|a| a.as_str().unwrap().to_string()).collect();
        assert_eq!(tcp.len(), listen.len(), "{name} listens on every address it was given: {l}");
        (r, tcp)
    };
    let (c, c_tcp) = start(C, "C (rank 2)", &[AC1, AC2, BC1, BC2], &[]);
    let (b, b_tcp) = start(B, "B (rank 1)", &[AB1, AB2], &[(C, BC1, &c_tcp[2]), (C, BC2, &c_tcp[3])]);
    let (a, _) = start(
        A,
        "A (rank 0)",
        &[],
        &[(B, AB1, &b_tcp[0]), (B, AB2, &b_tcp[1]), (C, AC1, &c_tcp[0]), (C, AC2, &c_tcp[1])],
    );
    [a, b, c]
}

/// Waits until `r` has reported, from line `from` on, `n` links up with each `(peer, n)`.
fn wait_links_up(r: &mut Rank, from: usize, want: &[(usize, usize)]) {
    let mut seen = vec![0; want.len()];
    r.wait_for(from, LIMIT, &format!("link_up lines {want:?} (peer, count)"), |v| {
        for (s, &(peer, _)) in seen.iter_mut().zip(want) {
            *s += link_up_with(v, peer) as usize;
        }
        seen.iter().zip(want).all(|(s, &(_, n))| *s >= n)
    });
}

/// Waits for B's `progress` line reporting more than `bytes` received.
fn wait_received(b: &mut Rank, from: usize, bytes: u64) {
    b.wait_for(from, LIMIT, &format!("progress past {bytes} bytes received"), |v| {
        is(v, "progress") && v["bytes_received"].as_u64().unwrap_or(0) > bytes
    });
}

/// Fails if B already has the message: then the links went down after the transfer, not during.
fn assert_not_delivered_yet(b: &mut Rank, from: usize) {
    let now = b.mark();
    let done = b.log[from..now].iter().find(|v| is(v, "message"));
    assert!(
        done.is_none(),
        "the message arrived before the link went down ({done:?}); the transfer is too quick for this test to break it midway"
    );
    let last = b.log[from..now].iter().rev().find(|v| is(v, "progress"));
    eprintln!("{}: links down after {}", b.name, last.unwrap_or(&Value::Null));
}

/// Sends `send …` to `a` and returns the CRC32C of the payload from its `sent` line.
fn send(a: &mut Rank, cmd: &str) -> Value {
    let from = a.mark();
    a.command(cmd);
    let (_, sent) = a.wait_for(from, LIMIT, "sent line", |v| is(v, "sent") || is(v, "error"));
    assert!(is(&sent, "sent"), "{cmd:?} refused: {sent}");
    sent["crc32c"].clone()
}

/// Waits for B's `message` line from A of `bytes` bytes and checks its CRC32C.
fn expect_message(b: &mut Rank, from: usize, bytes: u64, crc: &Value) {
    let (_, m) = b.wait_for(from, LIMIT, &format!("{bytes}-byte message from A"), |v| {
        is(v, "message") && v["from"] == A && v["bytes"] == bytes
    });
    assert_eq!(&m["crc32c"], crc, "the payload arrived intact: {m}");
    eprintln!("{}: {m}", b.name);
}

#[test]
fn one_veth_link_down_mid_transfer_fails_over_to_the_other() {
    let hosts = Hosts::new("f");
    let [mut a, mut b, _c] = start_ranks(&hosts);
    wait_links_up(&mut a, 0, &[(B, 2)]);

    let (a0, b0) = (a.mark(), b.mark());
    let crc = send(&mut a, "send 1 256MiB 0 7");
    wait_received(&mut b, b0, 32 << 20);
    hosts.set_link(AB1, false);
    assert_not_delivered_yet(&mut b, b0);

    expect_message(&mut b, b0, 256 << 20, &crc);
    a.wait_for(a0, LIMIT, "link_failed for B", |v| is(v, "link_failed") && v["peer"] == B);
    let counters = a.counters();
    eprintln!("{}: {counters}", a.name);
    assert!(counters["failovers"].as_u64().expect("failovers") >= 1, "frames moved off the dead link: {counters}");
}

#[test]
fn both_a_b_links_down_relays_through_c() {
    let hosts = Hosts::new("r");
    let [mut a, mut b, mut c] = start_ranks(&hosts);
    wait_links_up(&mut a, 0, &[(B, 2), (C, 2)]);
    wait_links_up(&mut b, 0, &[(A, 2), (C, 2)]);
    wait_links_up(&mut c, 0, &[(A, 2), (B, 2)]);
    // A learns from C's heartbeats that C reaches B: let a few heartbeat intervals pass, on A's clock.
    let from = a.mark();
    let (i, first) = a.wait_for(from, LIMIT, "progress line", |v| is(v, "progress"));
    let t0 = first["at_ms"].as_f64().expect("at_ms");
    a.wait_for(i + 1, LIMIT, "progress line 5 heartbeats later", |v| {
        is(v, "progress") && v["at_ms"].as_f64().unwrap_or(0.0) >= t0 + 5.0 * HEARTBEAT_MS as f64
    });

    let (a0, b0) = (a.mark(), b.mark());
    let crc = send(&mut a, "send 1 128MiB 0 8");
    wait_received(&mut b, b0, 16 << 20);
    hosts.set_link(AB1, false);
    hosts.set_link(AB2, false);
    assert_not_delivered_yet(&mut b, b0);

    expect_message(&mut b, b0, 128 << 20, &crc);
    a.wait_count(a0, 2, "link_failed for both links to B", |v| is(v, "link_failed") && v["peer"] == B);
    let relayed = c.counters()["relayed_bytes"].as_u64().expect("relayed_bytes");
    assert!(relayed > 0, "C relayed A's frames to B (relayed_bytes {relayed})");

    // Links back: A redials B directly and the next message does not go through C.
    let a1 = a.mark();
    hosts.set_link(AB1, true);
    hosts.set_link(AB2, true);
    wait_links_up(&mut a, a1, &[(B, 2)]);
    let before = c.counters()["relayed_bytes"].as_u64().expect("relayed_bytes");
    let b1 = b.mark();
    let crc = send(&mut a, "send 1 16MiB 0 9");
    expect_message(&mut b, b1, 16 << 20, &crc);
    let after = c.counters();
    eprintln!("{}: {after}", c.name);
    assert_eq!(
        after["relayed_bytes"].as_u64(),
        Some(before),
        "with the direct links back, C relays nothing more (relayed {relayed} while the links were down, \
         {before} once they were back up); C: {after}"
    );
}

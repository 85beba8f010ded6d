//! Real link failure in network namespaces (DESIGN.md fault model rows 1 and 2): three hosts,
//! each pair joined by two veth links on separate subnets. `ip link set … down` on one link
//! mid-transfer → failover; both links between A and B down → relay through C; links up again
//! → back on the direct path. Needs root and iproute2 (`.ci/run` installs it); if namespaces
//! cannot be made, the test fails and says why.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::process::NodeProcess;

const PORT: u16 = 7000;
const LIMIT: Duration = Duration::from_secs(60);

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e} (these tests need iproute2 and root)", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed: {} (these tests need root and iproute2: network namespaces and veth)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn tc(ns: &str, dev: &str, rate: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate])
        .args(["burst", "256kb", "latency", "100ms"])
        .output()
        .expect("run tc");
    assert!(out.status.success(), "tc tbf on {dev}: {}", String::from_utf8_lossy(&out.stderr).trim());
}

/// One veth link between two hosts.
struct Veth {
    /// Device names on the two ends.
    dev: [String; 2],
    /// Addresses on the two ends.
    addr: [String; 2],
}

/// Three namespaces A, B, C; two veth links per pair. Deleted on drop (which removes the veths).
struct Hosts {
    ns: [String; 3],
    /// Links in the order AB1, AB2, AC1, AC2, BC1, BC2.
    links: Vec<Veth>,
}

impl Hosts {
    fn new(tag: &str, subnet_base: u8) -> Hosts {
        let id = std::process::id() % 100_000;
        let ns = ["a", "b", "c"].map(|h| format!("phx{id}{tag}{h}"));
        let mut hosts = Hosts { ns: ns.clone(), links: Vec::new() };
        for n in &ns {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        for (k, (x, y)) in [(0, 1), (0, 1), (0, 2), (0, 2), (1, 2), (1, 2)].into_iter().enumerate() {
            let subnet = subnet_base + k as u8;
            let dev = [format!("p{id}{tag}{k}x"), format!("p{id}{tag}{k}y")];
            let addr = [format!("10.77.{subnet}.1"), format!("10.77.{subnet}.2")];
            ip(&["link", "add", &dev[0], "type", "veth", "peer", "name", &dev[1]]);
            for (end, host) in [(0, x), (1, y)] {
                ip(&["link", "set", &dev[end], "netns", &ns[host]]);
                ip(&["-n", &ns[host], "addr", "add", &format!("{}/24", addr[end]), "dev", &dev[end]]);
                ip(&["-n", &ns[host], "link", "set", &dev[end], "up"]);
            }
            hosts.links.push(Veth { dev, addr });
        }
        hosts
    }

    fn set_link(&self, link: usize, up: bool) {
        let host = match link {
            0..=3 => 0,
            _ => 1,
        };
        ip(&["-n", &self.ns[host], "link", "set", &self.links[link].dev[0], if up { "up" } else { "down" }]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// The three ranks: C (rank 2) listens on its four addresses, B (rank 1) listens on its A-B
/// addresses and dials C over both B-C links, A (rank 0) dials B and C over both links each.
fn start_ranks(h: &Hosts) -> [NodeProcess; 3] {
    let timers =
        ["--heartbeat-ms", "50", "--link-timeout-ms", "400", "--unreachable-ms", "20000", "--progress-ms", "20"];
    let args = |rank: u32, listen: &[usize], dial: &[(u32, usize)]| {
        let mut a: Vec<String> = vec!["--rank".into(), rank.to_string()];
        a.extend(timers.iter().map(|s| s.to_string()));
        for &l in listen {
            a.push("--tcp-listen".into());
            a.push(format!("{}:{PORT}", h.links[l].addr[1]));
        }
        for &(peer, l) in dial {
            a.push("--path".into());
            a.push(format!("{peer}=tcp://{}:{PORT}@{}:0", h.links[l].addr[1], h.links[l].addr[0]));
        }
        a
    };
    let start = |host: usize, name: &str, args: Vec<String>| {
        let p = NodeProcess::start(name, &["ip", "netns", "exec", &h.ns[host]], &args);
        p.wait_for(LIMIT, "listening", |v| v["event"] == "listening");
        p
    };
    let c = start(2, "C", args(2, &[2, 3, 4, 5], &[]));
    let b = start(1, "B", args(1, &[0, 1], &[(2, 4), (2, 5)]));
    let a = start(0, "A", args(0, &[], &[(1, 0), (1, 1), (2, 2), (2, 3)]));
    [a, b, c]
}

/// Waits until `p` has seen `n` links come up to each `(peer, n)`, counted together (lines
/// are consumed as they are read).
fn count_link_ups(p: &NodeProcess, want: &[(u64, usize)]) {
    let mut seen = vec![0usize; want.len()];
    p.wait_for(LIMIT, &format!("links up {want:?}"), |v| {
        for (i, (peer, _)) in want.iter().enumerate() {
            seen[i] += (v["event"] == "link_up" && v["peer"] == *peer) as usize;
        }
        want.iter().zip(&seen).all(|((_, n), s)| s >= n)
    });
}

fn sent_crc(a: &mut NodeProcess, cmd: &str) -> Value {
    a.command(cmd);
    a.wait_for(LIMIT, "sent", |v| v["event"] == "sent")["crc32c"].clone()
}

fn progress_past(b: &NodeProcess, bytes: u64) {
    b.wait_for(LIMIT, &format!("{bytes} bytes received"), |v| {
        v["event"] == "progress" && v["bytes_received"].as_u64().unwrap_or(0) > bytes
    });
}

fn message(b: &NodeProcess, bytes: u64) -> Value {
    b.wait_for(LIMIT, &format!("a {bytes}-byte message"), |v| v["event"] == "message" && v["bytes"] == bytes)
}

#[test]
fn one_veth_link_down_mid_transfer_fails_over_to_the_other() {
    let h = Hosts::new("f", 10);
    // Cap A's side of both A-B links so the transfer lasts long enough to break it midway.
    tc(&h.ns[0], &h.links[0].dev[0], "800mbit");
    tc(&h.ns[0], &h.links[1].dev[0], "800mbit");
    let [mut a, b, _c] = start_ranks(&h);
    count_link_ups(&a, &[(1, 2)]);
    let crc = sent_crc(&mut a, "send 1 256MiB 0 7");
    progress_past(&b, 32 << 20);
    h.set_link(0, false);
    let got = message(&b, 256 << 20);
    assert_eq!(got["crc32c"], crc, "intact");
    a.wait_for(LIMIT, "link_failed", |v| v["event"] == "link_failed" && v["peer"] == 1);
    let c = a.counters();
    assert!(c["failovers"].as_u64().unwrap() >= 1, "frames moved off the dead link: {c}");
}

#[test]
fn both_a_b_links_down_relays_through_c_and_returns_when_they_come_back() {
    let h = Hosts::new("r", 20);
    tc(&h.ns[0], &h.links[0].dev[0], "800mbit");
    tc(&h.ns[0], &h.links[1].dev[0], "800mbit");
    let [mut a, b, mut c] = start_ranks(&h);
    count_link_ups(&a, &[(1, 2), (2, 2)]);
    count_link_ups(&c, &[(1, 2)]);
    // A few heartbeats, so A learns that C reaches B.
    progress_past(&b, 0);
    b.wait_for(LIMIT, "heartbeats", |v| v["event"] == "progress" && v["at_ms"].as_f64().unwrap_or(0.0) > 300.0);
    let crc = sent_crc(&mut a, "send 1 128MiB 0 8");
    progress_past(&b, 16 << 20);
    h.set_link(0, false);
    h.set_link(1, false);
    let got = message(&b, 128 << 20);
    assert_eq!(got["crc32c"], crc, "intact after relaying");
    let relayed = c.counters()["relayed_bytes"].as_u64().unwrap();
    assert!(relayed > 0, "C forwarded A's frames");

    h.set_link(0, true);
    h.set_link(1, true);
    count_link_ups(&a, &[(1, 1)]);
    let crc = sent_crc(&mut a, "send 1 16MiB 0 9");
    let got = message(&b, 16 << 20);
    assert_eq!(got["crc32c"], crc);
    assert_eq!(c.counters()["relayed_bytes"].as_u64().unwrap(), relayed, "back on the direct path");
}

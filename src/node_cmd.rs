//! `phalanx node`: one transport rank as a process, driven by commands on stdin and reporting
//! JSON lines on stdout. Used by the multi-process tests (SIGKILL, network namespaces) and by
//! operators poking at a link by hand.
//!
//! Commands (one per line): `send PEER BYTES [CHANNEL] [SEED]`, `cut PATH`, `restore PATH`,
//! `counters`, `exit`. PATH is the index of a `--path` argument.
//! Events: `listening`, `message` (with CRC32C of the payload), `link_failed`,
//! `peer_unreachable`, `peer_reachable`, `peer_restarted`, `progress`, `counters`, `error`.
//!
//! With `--world N` the node is a rank of a communicator instead (see [`collective_command`]):
//! `allreduce ROUNDS COUNT POLICY DEADLINE_MS`, `exit`; events `round`, `rounds_done`, `error`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use phalanx_net::{LinkKind, Node, NodeConfig, PathFaults, PathSpec};
use phalanx_proto::{ChannelId, Event, RankId, TransportConfig};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use crate::size::parse_size;
use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_node::{AllReduceAlgorithm, CallOptions, CommError, Communicator, FaultPolicy, Op, Outcome};
use phalanx_proto::harness::pattern;

/// Arguments of `phalanx node`.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// This rank's id.
    #[arg(long)]
    pub rank: u32,
    /// Cluster secret (every link proves it holds the same).
    #[arg(long, default_value = "phalanx-dev-secret")]
    pub secret: String,
    /// TCP address to accept links on (repeatable; port 0 picks one).
    #[arg(long = "tcp-listen")]
    pub tcp_listen: Vec<SocketAddr>,
    /// UDP address to accept QUIC links on.
    #[arg(long = "quic-listen")]
    pub quic_listen: Option<SocketAddr>,
    /// A path to dial: `PEER=tcp://ADDR[@BIND]` or `PEER=quic://ADDR[@BIND]` (repeatable).
    #[arg(long = "path", value_parser = parse_path)]
    pub paths: Vec<(u32, LinkKind, SocketAddr, Option<SocketAddr>)>,
    /// Directory with `ca.pem`, `rank-R.cert.pem`, `rank-R.key.pem` (needed for QUIC).
    #[arg(long = "tls-dir")]
    pub tls_dir: Option<PathBuf>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// A link silent this long is declared dead (milliseconds).
    #[arg(long, default_value_t = 1500)]
    pub link_timeout_ms: u64,
    /// A peer without route this long is reported unreachable (milliseconds).
    #[arg(long, default_value_t = 5000)]
    pub unreachable_ms: u64,
    /// Print a `progress` line with bytes received this often (milliseconds; 0: never).
    #[arg(long, default_value_t = 0)]
    pub progress_ms: u64,
    /// Run as rank `--rank` of a communicator of this many ranks (collective commands).
    #[arg(long)]
    pub world: Option<usize>,
}

fn parse_path(s: &str) -> Result<(u32, LinkKind, SocketAddr, Option<SocketAddr>), String> {
    let (peer, rest) = s.split_once('=').ok_or_else(|| format!("path {s:?}: expected PEER=tcp://ADDR[@BIND]"))?;
    let peer: u32 = peer.parse().map_err(|_| format!("path {s:?}: peer {peer:?} is not a rank number"))?;
    let (kind, addrs) = if let Some(a) = rest.strip_prefix("tcp://") {
        (LinkKind::Tcp, a)
    } else if let Some(a) = rest.strip_prefix("quic://") {
        (LinkKind::Quic, a)
    } else {
        return Err(format!("path {s:?}: scheme must be tcp:// or quic://"));
    };
    let (remote, bind) = match addrs.split_once('@') {
        Some((r, b)) => (r, Some(b)),
        None => (addrs, None),
    };
    let remote: SocketAddr = remote.parse().map_err(|_| format!("path {s:?}: bad address {remote:?}"))?;
    let bind =
        bind.map(|b| b.parse::<SocketAddr>().map_err(|_| format!("path {s:?}: bad bind address {b:?}"))).transpose()?;
    Ok((peer, kind, remote, bind))
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

/// Runs the node until `exit` or end of stdin.
pub async fn run(args: NodeArgs) -> Result<(), String> {
    let mut cfg = NodeConfig::new(RankId(args.rank), args.secret.clone().into_bytes());
    cfg.transport = TransportConfig {
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms.max(1)),
        link_timeout: Duration::from_millis(args.link_timeout_ms),
        unreachable_after: Duration::from_millis(args.unreachable_ms),
        ..TransportConfig::default()
    };
    cfg.transport.validate().map_err(|e| format!("invalid timers: {e}"))?;
    cfg.redial_max = Duration::from_millis(args.heartbeat_ms.max(50) * 2);
    cfg.connect_timeout = Duration::from_millis(args.link_timeout_ms.max(200));
    cfg.tcp_listen = args.tcp_listen.clone();
    cfg.quic_listen = args.quic_listen;
    if let Some(dir) = &args.tls_dir {
        cfg.tls = Some(
            phalanx_net::tls::TlsIdentity::load_dir(dir, &format!("rank-{}", args.rank)).map_err(|e| e.to_string())?,
        );
    }
    let faults: Vec<PathFaults> = args.paths.iter().map(|_| PathFaults::new()).collect();
    for ((peer, kind, remote, bind), f) in args.paths.iter().zip(&faults) {
        cfg.paths.push(PathSpec { peer: RankId(*peer), kind: *kind, remote: *remote, bind: *bind, faults: f.clone() });
    }
    let mut node = Node::start(cfg).await.map_err(|e| e.to_string())?;
    let handle = node.handle();
    emit(json!({
        "event": "listening",
        "rank": args.rank,
        "tcp": node.tcp_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "quic": node.quic_addr().map(|a| a.to_string()),
    }));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    if let Some(world) = args.world {
        if args.rank as usize >= world {
            return Err(format!("--rank {} outside --world {world}", args.rank));
        }
        let mut comm = Communicator::new(node, args.rank as usize, world);
        let mut rounds = Rounds::default();
        while let Ok(Some(l)) = lines.next_line().await {
            if !collective_command(&l, &mut comm, &mut rounds).await {
                break;
            }
        }
        comm.flush(Duration::from_secs(5)).await;
        return Ok(());
    }
    // Times are on the endpoint's clock, the same base as `since` in its events.
    let clock = handle.clone();
    let ms = move || clock.now().as_nanos() as f64 / 1e6;
    let mut progress = tokio::time::interval(Duration::from_millis(args.progress_ms.max(1)));
    let mut stdin_open = true;
    loop {
        tokio::select! {
            ev = node.next_event() => {
                let Some(ev) = ev else { return Ok(()) };
                match ev {
                    Event::Message(m) => emit(json!({"event": "message", "from": m.from.0, "channel": m.channel.0,
                        "bytes": m.payload.len(), "crc32c": m.payload.crc32c(), "at_ms": ms()})),
                    Event::LinkUp { link, peer } => emit(json!({"event": "link_up", "link": link.0, "peer": peer.0, "at_ms": ms()})),
                    Event::LinkFailed { link, peer, reason } => emit(json!({"event": "link_failed", "link": link.0,
                        "peer": peer.0, "reason": format!("{reason:?}"), "at_ms": ms()})),
                    Event::PeerUnreachable { peer, since } => emit(json!({"event": "peer_unreachable", "peer": peer.0,
                        "since_ms": since.as_nanos() as f64 / 1e6, "at_ms": ms()})),
                    Event::PeerReachable { peer } => emit(json!({"event": "peer_reachable", "peer": peer.0, "at_ms": ms()})),
                    Event::PeerRestarted { peer, undelivered_messages } => emit(json!({"event": "peer_restarted",
                        "peer": peer.0, "undelivered": undelivered_messages})),
                    Event::StaleEpochRefused { from, epoch, .. } => emit(json!({"event": "stale_epoch", "from": from.0, "epoch": epoch.0})),
                }
            }
            line = lines.next_line(), if stdin_open => {
                match line {
                    Ok(Some(l)) => {
                        if !command(&l, &handle, &faults).await {
                            return Ok(());
                        }
                    }
                    _ => stdin_open = false,
                }
            }
            _ = progress.tick(), if args.progress_ms > 0 => {
                if let Ok((c, _)) = handle.counters().await {
                    emit(json!({"event": "progress", "bytes_received": c.bytes_received, "bytes_sent": c.bytes_sent, "at_ms": ms()}));
                }
            }
        }
    }
}

/// Executes one stdin command; returns false on `exit`.
async fn command(line: &str, handle: &phalanx_net::NodeHandle, faults: &[PathFaults]) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    let path = |i: Option<&&str>| i.and_then(|s| s.parse::<usize>().ok()).and_then(|i| faults.get(i));
    match words.as_slice() {
        ["send", peer, bytes, rest @ ..] => {
            let (Ok(peer), Ok(len)) = (peer.parse::<u32>(), parse_size(bytes)) else {
                emit(json!({"event": "error", "error": format!("bad send command {line:?}")}));
                return true;
            };
            let channel = rest.first().and_then(|c| c.parse().ok()).unwrap_or(0);
            let seed = rest.get(1).and_then(|c| c.parse().ok()).unwrap_or(1);
            let payload = pattern(len as usize, seed);
            let crc = phalanx_proto::checksum::crc32c(&payload);
            match handle.send(RankId(peer), ChannelId(channel), payload).await {
                Ok(()) => emit(json!({"event": "sent", "peer": peer, "bytes": len, "crc32c": crc})),
                Err(e) => emit(json!({"event": "error", "error": e.to_string()})),
            }
        }
        ["cut", _] => match path(words.get(1)) {
            Some(f) => f.cut(),
            None => emit(json!({"event": "error", "error": format!("no path {:?}", words.get(1))})),
        },
        ["restore", _] => match path(words.get(1)) {
            Some(f) => f.restore(),
            None => emit(json!({"event": "error", "error": format!("no path {:?}", words.get(1))})),
        },
        ["counters"] => {
            if let Ok((c, links)) = handle.counters().await {
                emit(json!({"event": "counters", "bytes_sent": c.bytes_sent, "bytes_received": c.bytes_received,
                    "retransmits": c.retransmits, "failovers": c.failovers, "relayed_bytes": c.relayed_bytes,
                    "relayed_out_bytes": c.relayed_out_bytes, "checksum_failures": c.checksum_failures,
                    "auth_failures": handle.auth_failures(), "links": links.len()}));
            }
        }
        ["exit"] => return false,
        [] => {}
        _ => emit(json!({"event": "error", "error": format!("unknown command {line:?}")})),
    }
    true
}

/// `abort`, `shrink` or `quorum:MIN:WAIT_MS`, each optionally with `+verify`.
fn parse_policy(s: &str) -> Result<CallOptions, String> {
    let (p, verify) = match s.strip_suffix("+verify") {
        Some(p) => (p, true),
        None => (s, false),
    };
    let policy = match p.split(':').collect::<Vec<_>>().as_slice() {
        ["abort"] => FaultPolicy::Abort,
        ["shrink"] => FaultPolicy::Shrink,
        ["quorum", min, wait] => FaultPolicy::Quorum {
            min: min.parse().map_err(|_| format!("policy {s:?}: bad quorum size {min:?}"))?,
            wait: Duration::from_millis(wait.parse().map_err(|_| format!("policy {s:?}: bad wait {wait:?}"))?),
        },
        _ => return Err(format!("policy {s:?}: expected abort, shrink or quorum:MIN:WAIT_MS [+verify]")),
    };
    Ok(CallOptions { policy, verify })
}

/// Rank `rank`'s contribution to round `round`: small integers, so f32 sums are exact.
fn contribution(rank: usize, round: usize, count: usize) -> Vec<f32> {
    (0..count).map(|j| ((rank + 1) * (round + 1) + j % 7) as f32).collect()
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn element_sum(b: &[u8]) -> f64 {
    b.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).sum()
}

/// The training-like loop of the communicator mode, kept across commands.
#[derive(Default)]
struct Rounds {
    /// The next round's index.
    next: usize,
    /// A contribution handed back late, added to the next round's.
    carry: Option<Vec<u8>>,
    /// Element sum of every contribution made (not counting carries twice).
    offered: f64,
    /// Element sum of every result received.
    applied: f64,
}

/// Executes one command of the communicator mode; returns false on `exit`.
///
/// `allreduce ROUNDS COUNT POLICY DEADLINE_MS` runs the next ROUNDS rounds: f32 sum
/// all-reduces of COUNT elements (this rank's contribution: [`contribution`]). A contribution
/// handed back late is added to the next round's. Each round prints `round` (outcome `done`
/// with participants, element sum and CRC32C of the result; `late`; or `error` with the error),
/// then `rounds_done` with the sums of everything this rank offered and of every result it got
/// so far, and its counters. An error ends the command.
async fn collective_command(line: &str, comm: &mut Communicator, state: &mut Rounds) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["allreduce", rounds, count, policy, deadline_ms] => {
            let parsed = (|| -> Result<_, String> {
                let rounds: usize = rounds.parse().map_err(|_| format!("bad ROUNDS {rounds:?}"))?;
                let count: usize = count.parse().map_err(|_| format!("bad COUNT {count:?}"))?;
                let deadline: u64 = deadline_ms.parse().map_err(|_| format!("bad DEADLINE_MS {deadline_ms:?}"))?;
                Ok((rounds, count, parse_policy(policy)?, Duration::from_millis(deadline)))
            })();
            let (rounds, count, options, deadline) = match parsed {
                Ok(p) => p,
                Err(e) => {
                    emit(json!({"event": "error", "error": format!("{line:?}: {e}")}));
                    return true;
                }
            };
            for i in state.next..state.next + rounds {
                let mut mine = contribution(comm.rank(), i, count);
                state.offered += mine.iter().map(|x| f64::from(*x)).sum::<f64>();
                if let Some(c) = state.carry.take().filter(|c| c.len() == count * 4) {
                    for (x, b) in mine.iter_mut().zip(c.chunks_exact(4)) {
                        *x += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
                let started = std::time::Instant::now();
                let op = Op::AllReduce { algorithm: AllReduceAlgorithm::Auto, op: ReduceOp::Sum };
                match comm.collective(op, DType::F32, to_bytes(&mine), options, deadline).await {
                    Ok(Outcome::Done { data, participants }) => {
                        let sum = element_sum(&data);
                        state.applied += sum;
                        emit(json!({"event": "round", "i": i, "outcome": "done", "participants": participants,
                            "sum": sum, "crc32c": phalanx_proto::checksum::crc32c(&data),
                            "ms": started.elapsed().as_secs_f64() * 1e3}));
                    }
                    Ok(Outcome::Late { contribution, participants }) => {
                        emit(json!({"event": "round", "i": i, "outcome": "late", "participants": participants,
                            "late_sum": element_sum(&contribution), "ms": started.elapsed().as_secs_f64() * 1e3}));
                        state.carry = Some(contribution);
                    }
                    Err(e) => {
                        let lost = match &e {
                            CommError::PeerLost { rank, .. } => Some(*rank),
                            _ => None,
                        };
                        emit(json!({"event": "round", "i": i, "outcome": "error", "error": e.to_string(),
                            "lost": lost, "ms": started.elapsed().as_secs_f64() * 1e3}));
                        break;
                    }
                }
            }
            state.next += rounds;
            let c = comm.counters().await.unwrap_or_default();
            emit(json!({"event": "rounds_done", "offered_sum": state.offered, "applied_sum": state.applied,
                "counters": {"offered": c.offered, "applied": c.applied, "late": c.late, "dropped": c.dropped,
                    "retries": c.retries}}));
        }
        ["exit"] => return false,
        [] => {}
        _ => emit(json!({"event": "error", "error": format!("unknown command {line:?}")})),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_arguments_parse_and_bad_ones_say_why() {
        let (p, k, r, b) = parse_path("2=tcp://127.0.0.1:9000@127.0.0.2:0").unwrap();
        assert_eq!((p, k, r.port(), b.map(|b| b.port())), (2, LinkKind::Tcp, 9000, Some(0)));
        assert_eq!(parse_path("1=quic://[::1]:5").unwrap().1, LinkKind::Quic);
        assert!(parse_path("x=tcp://1.2.3.4:5").unwrap_err().contains("rank number"));
        assert!(parse_path("1=udp://1.2.3.4:5").unwrap_err().contains("scheme"));
        assert!(parse_path("1=tcp://nowhere").unwrap_err().contains("bad address"));
    }

    #[test]
    fn policies_parse_and_bad_ones_say_why() {
        assert_eq!(parse_policy("shrink").unwrap(), CallOptions::policy(FaultPolicy::Shrink));
        let q = parse_policy("quorum:3:250+verify").unwrap();
        assert_eq!(q.policy, FaultPolicy::Quorum { min: 3, wait: Duration::from_millis(250) });
        assert!(q.verify);
        assert!(parse_policy("quorum:x:1").unwrap_err().contains("quorum size"));
        assert!(parse_policy("maybe").unwrap_err().contains("expected"));
    }
}

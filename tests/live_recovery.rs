//! Live recovery of training state from healthy peers (issue #5), with real processes: three
//! `phalanx state-source` ranks hold the same 1 GiB state; this test process is the
//! recovering rank and fetches it with `phalanx_node::recovery::fetch_state`, striped over
//! the three. One source is killed with SIGKILL once about 30 % has arrived. The state must
//! arrive intact — CRC32C of every MiB compared against the state generated here from the
//! same seed — with the killed source having served less than each survivor.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use phalanx_net::{LinkKind, Node, NodeConfig, PathFaults, PathSpec};
use phalanx_node::recovery::{fetch_state, fetch_state_into, FetchOptions, FetchProgress, FetchedState};
use phalanx_proto::RankId;

const SIZE: u64 = 1 << 30;
const SEED: u64 = 0x5EED_0005;
const SECRET: &str = "live-recovery-test-secret";
const RECEIVER: u32 = 9;
const VICTIM: u32 = 2;
const MIB: usize = 1 << 20;

/// The generator of `phalanx state-source` (src/recovery_cmd.rs), resumable so the expected
/// state can be made a MiB at a time: little-endian splitmix64 words from `seed`, in 4 KiB
/// blocks. Every call but the last must cover a multiple of 4 KiB.
struct Generator(u64);

impl Generator {
    fn fill(&mut self, buf: &mut [u8]) {
        let mut words = [0u64; 512];
        for out in buf.chunks_mut(8 * 512) {
            for w in words.iter_mut() {
                self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = self.0;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                *w = (z ^ (z >> 31)).to_le();
            }
            // SAFETY: `words` is 4096 initialised bytes (u64 has no padding, u8 needs no
            // alignment), borrowed only for this copy; `out` is at most 4096 bytes.
            let bytes = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), 8 * words.len()) };
            out.copy_from_slice(&bytes[..out.len()]);
        }
    }
}

/// CRC32C of each MiB of `data`.
fn digests(data: &[u8]) -> Vec<u32> {
    data.chunks(MIB).map(crc32c::crc32c).collect()
}

/// CRC32C of each MiB of the state a source generates, without holding it all.
fn expected_digests(size: u64, seed: u64) -> Vec<u32> {
    let mut g = Generator(seed);
    let mut block = vec![0u8; MIB];
    let mut out = Vec::new();
    let mut left = size as usize;
    while left > 0 {
        let n = left.min(MIB);
        g.fill(&mut block[..n]);
        out.push(crc32c::crc32c(&block[..n]));
        left -= n;
    }
    out
}

/// A `phalanx state-source` process (killed when dropped).
struct Source {
    rank: u32,
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Source {
    fn start(rank: u32) -> Source {
        let mut child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
            .args(["state-source", "--rank", &rank.to_string(), "--listen", "127.0.0.1:0"])
            .args(["--bytes", &SIZE.to_string(), "--seed", &SEED.to_string(), "--secret", SECRET])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start source {rank}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Source { rank, child, lines }
    }

    fn listening(&self) -> SocketAddr {
        let v = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("source {} printed no listening line", self.rank));
        assert_eq!(v["event"], "listening", "source {}: {v}", self.rank);
        let addr = v["addr"].as_str().expect("an address");
        eprintln!("source {} listening on {addr} (state generated in {} ms)", self.rank, v["generated_ms"]);
        addr.parse().expect("a socket address")
    }
}

/// A recovering rank with one TCP path to each source.
async fn receiver(rank: u32, sources: &[(u32, SocketAddr)]) -> Node {
    let mut config = NodeConfig::new(RankId(rank), SECRET.as_bytes().to_vec());
    config.paths = sources
        .iter()
        .map(|(peer, addr)| PathSpec {
            peer: RankId(*peer),
            kind: LinkKind::Tcp,
            remote: *addr,
            bind: None,
            faults: PathFaults::new(),
        })
        .collect();
    Node::start(config).await.expect("the receiver starts")
}

fn check_state(got: &FetchedState, want_digests: &[u32]) {
    assert_eq!(got.buffers.len(), 1);
    let (name, params) = &got.buffers[0];
    assert_eq!(name, "params");
    assert_eq!(params.len() as u64, SIZE);
    let got_digests = digests(params);
    if let Some(i) = want_digests.iter().zip(&got_digests).position(|(a, b)| a != b) {
        panic!("the recovered state differs from the sources' in MiB {i}");
    }
    assert_eq!(got_digests.len(), want_digests.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_of_state_from_three_peers_arrives_intact_when_one_is_killed_midway() {
    support::init_log();
    let started = Instant::now();
    let mut sources: Vec<Source> = (1..=3).map(Source::start).collect();
    let expected = std::thread::spawn(|| expected_digests(SIZE, SEED));
    let addrs: Vec<(u32, SocketAddr)> = sources.iter().map(|s| (s.rank, s.listening())).collect();
    // Made before the fetch starts, so it does not compete with it for the CPUs.
    let want_digests = expected.join().expect("the expected state");

    // The recovering rank: default transport timers (a loaded 2-core machine must not see
    // false link failures); the kill is noticed from the closed connection.
    let mut node = receiver(RECEIVER, &addrs).await;

    // The killer: SIGKILLs the victim once 30 % of the state has arrived.
    let progress = Arc::new(FetchProgress::default());
    let victim_at = sources.iter().position(|s| s.rank == VICTIM).expect("the victim");
    let mut victim = sources.remove(victim_at);
    let fetch_over = Arc::new(AtomicBool::new(false));
    let killer = {
        let progress = progress.clone();
        let fetch_over = fetch_over.clone();
        std::thread::spawn(move || {
            while !fetch_over.load(Ordering::Relaxed) {
                let (done, total) = (progress.done(), progress.total());
                if total > 0 && done * 10 >= total * 3 {
                    victim.child.kill().expect("SIGKILL the victim");
                    victim.child.wait().expect("the victim is reaped");
                    return Some(done);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            None
        })
    };

    let options = FetchOptions {
        chunk_bytes: 4 << 20,
        window_per_source: 4,
        chunk_timeout: Duration::from_secs(30),
        progress: Some(progress.clone()),
        ..FetchOptions::default()
    };
    let sources_ranks: Vec<RankId> = addrs.iter().map(|(r, _)| RankId(*r)).collect();
    let result = tokio::time::timeout(Duration::from_secs(110), fetch_state(&mut node, &sources_ranks, options)).await;
    fetch_over.store(true, Ordering::Relaxed);
    let killed_at = killer.join().expect("the killer thread");
    let got = result.expect("the fetch ends within its deadline").expect("the state arrives");

    let killed_at = killed_at.expect("the victim was killed before the fetch ended");
    let mib_s = SIZE as f64 / MIB as f64 / got.elapsed.as_secs_f64();
    eprintln!(
        "live recovery: {} MiB in {:.2} s = {mib_s:.0} MiB/s from 3 sources, source {VICTIM} SIGKILLed at {:.1} %; \
         bytes per source {:?}; re-requests {}, checksum failures {}, timeouts {}, lost {:?}",
        SIZE >> 20,
        got.elapsed.as_secs_f64(),
        killed_at as f64 * 100.0 / SIZE as f64,
        got.bytes_per_source,
        got.counters.re_requests,
        got.counters.checksum_failures,
        got.counters.timeouts,
        got.counters.sources_lost,
    );

    check_state(&got, &want_digests);

    assert_eq!(got.counters.sources_lost, vec![u64::from(VICTIM)], "{:?}", got.counters);
    let served = |r: u32| got.bytes_per_source.iter().find(|(s, _)| s.0 == r).map(|(_, b)| *b).expect("a source");
    for other in [1, 3] {
        assert!(
            served(VICTIM) < served(other),
            "the killed source served {} bytes, source {other} {}",
            served(VICTIM),
            served(other)
        );
    }
    assert_eq!(got.bytes_per_source.iter().map(|(_, b)| b).sum::<u64>(), SIZE);
    eprintln!("whole test: {:.1} s", started.elapsed().as_secs_f64());
}

/// The figure's data (not a check; run with `--ignored --nocapture`, in release): throughput of
/// a fault-free 1 GiB recovery from 1, 2 and 3 sources, into freshly allocated buffers (every
/// page faulted in during the fetch) and into buffers the trainer already holds (touched
/// before the fetch). Compare with `phalanx bench p2p --world 2 --bytes 64MiB`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run explicitly, in release"]
async fn recovery_throughput_by_sources() {
    support::init_log();
    let sources: Vec<Source> = (1..=3).map(Source::start).collect();
    let expected = std::thread::spawn(|| expected_digests(SIZE, SEED));
    let addrs: Vec<(u32, SocketAddr)> = sources.iter().map(|s| (s.rank, s.listening())).collect();
    let want_digests = expected.join().expect("the expected state");
    let mut rank = 10;
    for reuse in [false, true] {
        for n in 1..=3 {
            rank += 1;
            let mut node = receiver(rank, &addrs[..n]).await;
            let ranks: Vec<RankId> = addrs[..n].iter().map(|(r, _)| RankId(*r)).collect();
            let buffers = if reuse { vec![("params".to_string(), vec![1u8; SIZE as usize])] } else { Vec::new() };
            let got =
                fetch_state_into(&mut node, &ranks, FetchOptions::default(), buffers).await.expect("the state arrives");
            check_state(&got, &want_digests);
            let mib_s = SIZE as f64 / MIB as f64 / got.elapsed.as_secs_f64();
            eprintln!(
                "recovery,sources={n},buffers={},bytes={SIZE},elapsed_s={:.3},MiB_per_s={mib_s:.0}",
                if reuse { "reused" } else { "fresh" },
                got.elapsed.as_secs_f64()
            );
        }
    }
}

//! Live recovery on tokio: the sans-IO [`StateServer`] and [`StateFetch`] of
//! `phalanx_runtime::recovery` driven over a `phalanx-net` node. A healthy rank runs
//! [`serve_state`]; a joining or recovering rank calls [`fetch_state`] with the ranks to fetch
//! from and gets the trainer's buffers back, verified, without a checkpoint file.
//!
//! The loops only move bytes, read the clock and translate transport events: a source the
//! transport reports unreachable or restarted, or whose last link failed, is reported to the
//! fetch as lost, and the fetch asks the remaining sources for what it owed.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use phalanx_net::{Node, NodeError, NodeHandle};
use phalanx_proto::{ChannelId, Event, RankId};
use phalanx_runtime::recovery::wire::{self, ManifestRequest, MessageRef, CHUNK_HEADER_BYTES, MAX_CHUNK};
use phalanx_runtime::recovery::{FetchCounters, FetchError, ServeCounters, StateFetch, StateServer};
use thiserror::Error;
use tracing::{debug, info, info_span, warn, Instrument};

/// Channel of recovery requests and replies.
pub const RECOVERY_CHANNEL: ChannelId = ChannelId(2002);

/// Why a fetch did not produce the state.
#[derive(Debug, Error)]
pub enum RecoveryError {
    /// The node shut down.
    #[error("recovery transport: {0}")]
    Transport(#[from] NodeError),
    /// No source to fetch from was given (the local rank does not count).
    #[error("no source ranks to recover from")]
    NoSources,
    /// No source answered with a manifest in time.
    #[error("no source answered with a manifest within {waited:?} (asked {asked:?}; lost {lost:?})")]
    NoManifest {
        /// The sources asked, in order.
        asked: Vec<RankId>,
        /// The sources reported lost meanwhile.
        lost: Vec<RankId>,
        /// How long it tried.
        waited: Duration,
    },
    /// The manifest describes more state than the caller allows.
    #[error("source {source_rank} offers {total} bytes of state, more than the limit of {limit}")]
    TooLarge {
        /// The source that sent the manifest.
        source_rank: RankId,
        /// Bytes it offers.
        total: u64,
        /// The caller's limit.
        limit: u64,
    },
    /// The fetch failed: every source was lost with bytes missing, or the state does not fit.
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

/// Progress of a fetch, readable from other tasks and threads while it runs.
#[derive(Debug, Default)]
pub struct FetchProgress {
    done: AtomicU64,
    total: AtomicU64,
}

impl FetchProgress {
    /// Bytes received and verified so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Bytes in all (0 until the manifest has arrived).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// How to fetch.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Size of one piece (clamped to 1 B ..= 16 MiB less a chunk header).
    pub chunk_bytes: u32,
    /// Requests outstanding per source.
    pub window_per_source: usize,
    /// A request expires when its source has delivered nothing for this long since it was
    /// sent; the piece is then asked of another source (3 expiries in a row drop the source).
    /// Must exceed the time one source takes to send a window of pieces.
    pub chunk_timeout: Duration,
    /// How long to wait for one source's manifest before asking the next.
    pub manifest_timeout: Duration,
    /// How long to keep asking sources for a manifest before giving up.
    pub manifest_deadline: Duration,
    /// Period of the timer that expires requests.
    pub timer: Duration,
    /// Largest state accepted, in bytes: a manifest offering more is refused before anything
    /// is allocated.
    pub max_state_bytes: u64,
    /// Updated as bytes arrive, for watchers on other tasks.
    pub progress: Option<Arc<FetchProgress>>,
}

impl Default for FetchOptions {
    /// 4 MiB pieces, 4 per source in flight, 10 s chunk timeout, 2 s per manifest try within
    /// 30 s, a 100 ms timer, no size limit, no progress watcher.
    fn default() -> Self {
        FetchOptions {
            chunk_bytes: 4 << 20,
            window_per_source: 4,
            chunk_timeout: Duration::from_secs(10),
            manifest_timeout: Duration::from_secs(2),
            manifest_deadline: Duration::from_secs(30),
            timer: Duration::from_millis(100),
            max_state_bytes: u64::MAX,
            progress: None,
        }
    }
}

/// The recovered state.
#[derive(Debug)]
pub struct FetchedState {
    /// The training step the buffers hold.
    pub step: u64,
    /// The buffers, by name, in the sources' registration order.
    pub buffers: Vec<(String, Vec<u8>)>,
    /// The source whose manifest was used.
    pub manifest_from: RankId,
    /// Bytes received from each source.
    pub bytes_per_source: Vec<(RankId, u64)>,
    /// Time from the call to the last byte (manifest included).
    pub elapsed: Duration,
    /// Re-requests, checksum failures, timeouts, lost sources.
    pub counters: FetchCounters,
}

/// Answers recovery requests arriving on [`RECOVERY_CHANNEL`] from `server`'s state until
/// `shutdown` resolves; returns what it served. Takes over `node`'s events meanwhile (events
/// on other channels are dropped). A requester that becomes unreachable has its queued chunks
/// dropped. Fails only if the node shuts down.
pub async fn serve_state(
    node: &mut Node,
    mut server: StateServer,
    shutdown: impl Future<Output = ()>,
) -> Result<ServeCounters, NodeError> {
    let handle = node.handle();
    let span = info_span!("serve_state", rank = %handle.rank(), step = server.step());
    async move {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    info!(counters = ?server.counters(), "recovery server stopping");
                    return Ok(server.counters());
                }
                ev = node.next_event() => match ev {
                    None => return Err(NodeError::Closed),
                    Some(Event::Message(m)) if m.channel == RECOVERY_CHANNEL => {
                        let request = m.payload.to_bytes();
                        if let Some(reply) = server.handle(u64::from(m.from.0), &request) {
                            match handle.send(m.from, RECOVERY_CHANNEL, reply).await {
                                Err(NodeError::Closed) => return Err(NodeError::Closed),
                                Err(e) => warn!(to = %m.from, error = %e, "recovery reply not sent"),
                                Ok(()) => {}
                            }
                        }
                    }
                    Some(Event::Message(m)) => debug!(from = %m.from, channel = ?m.channel, "not a recovery message; ignored"),
                    Some(Event::PeerUnreachable { peer, .. }) => {
                        // A requester went away: drop what was queued for it.
                        let dropped = handle.abandon_peer(peer).await?;
                        debug!(%peer, dropped, "requester unreachable; its replies dropped");
                    }
                    Some(_) => {}
                },
            }
        }
    }
    .instrument(span)
    .await
}

/// Whether `event` means `source` is gone for this fetch: unreachable, restarted (its state
/// may be another step's), or its last direct link failed.
async fn lost_source(handle: &NodeHandle, event: &Event) -> Result<Option<(RankId, &'static str)>, NodeError> {
    Ok(match event {
        Event::PeerUnreachable { peer, .. } => Some((*peer, "unreachable")),
        Event::PeerRestarted { peer, .. } => Some((*peer, "restarted")),
        Event::LinkFailed { peer, .. } => {
            // The endpoint has already dropped the failed link from its list.
            let (_, links) = handle.counters().await?;
            (!links.iter().any(|(_, p, _)| p == peer)).then_some((*peer, "last link failed"))
        }
        _ => None,
    })
}

/// Fetches the current training state from `sources` (this rank excluded; duplicates
/// ignored): the manifest from the first that answers (the next is asked after
/// `manifest_timeout`), then the buffers striped over all of them, each chunk verified. A
/// source that dies midway costs only the pieces it owed, which the others send instead.
/// Takes over `node`'s events meanwhile (events on other channels are dropped).
///
/// Errors: [`RecoveryError::NoManifest`] if no source answered in `manifest_deadline`;
/// [`FetchError::NoSourcesLeft`] if every source was lost with bytes missing; never a
/// partial state.
pub async fn fetch_state(
    node: &mut Node,
    sources: &[RankId],
    options: FetchOptions,
) -> Result<FetchedState, RecoveryError> {
    fetch_state_into(node, sources, options, Vec::new()).await
}

/// [`fetch_state`] into the trainer's own buffers (name, bytes) where it can: a buffer whose
/// name is in the manifest and that is at least as long is written in place (cut to the
/// manifest's length) — no allocation, and no page faults if its memory was touched before.
/// Others are allocated; buffers the manifest does not name are dropped. On an error the
/// buffers are lost with the fetch.
pub async fn fetch_state_into(
    node: &mut Node,
    sources: &[RankId],
    options: FetchOptions,
    buffers: Vec<(String, Vec<u8>)>,
) -> Result<FetchedState, RecoveryError> {
    let handle = node.handle();
    let me = handle.rank();
    let mut ranks: Vec<RankId> = Vec::new();
    for s in sources {
        if *s != me && !ranks.contains(s) {
            ranks.push(*s);
        }
    }
    if ranks.is_empty() {
        return Err(RecoveryError::NoSources);
    }
    let span = info_span!("live_recovery", rank = %me, sources = ?ranks);
    fetch_inner(node, handle, ranks, options, buffers).instrument(span).await
}

async fn fetch_inner(
    node: &mut Node,
    handle: NodeHandle,
    ranks: Vec<RankId>,
    options: FetchOptions,
    mut given: Vec<(String, Vec<u8>)>,
) -> Result<FetchedState, RecoveryError> {
    let start = tokio::time::Instant::now();
    let now = move || start.elapsed().as_nanos() as u64;
    let is_source = |r: RankId| ranks.contains(&r);
    let mut lost: Vec<RankId> = Vec::new();

    // 1. The manifest, from the first source that answers.
    let deadline = start + options.manifest_deadline;
    let mut asked: BTreeMap<u64, RankId> = BTreeMap::new();
    let mut next = 0usize;
    let (manifest, manifest_from) = 'found: loop {
        let candidates: Vec<RankId> = ranks.iter().copied().filter(|r| !lost.contains(r)).collect();
        if candidates.is_empty() || tokio::time::Instant::now() >= deadline {
            return Err(RecoveryError::NoManifest {
                asked: asked.values().copied().collect(),
                lost,
                waited: start.elapsed(),
            });
        }
        let target = candidates[next % candidates.len()];
        next += 1;
        let request = asked.len() as u64 + 1;
        asked.insert(request, target);
        debug!(source = %target, request, "asking for the manifest");
        handle.send(target, RECOVERY_CHANNEL, ManifestRequest { request }.encode()).await?;
        let try_until = deadline.min(tokio::time::Instant::now() + options.manifest_timeout);
        loop {
            let ev = match tokio::time::timeout_at(try_until, node.next_event()).await {
                Err(_) => break,
                Ok(None) => return Err(NodeError::Closed.into()),
                Ok(Some(ev)) => ev,
            };
            match &ev {
                Event::Message(m) if m.channel == RECOVERY_CHANNEL && is_source(m.from) => {
                    match wire::decode_ref(&m.payload.to_bytes()) {
                        // An answer to any of the tries will do.
                        Ok(MessageRef::Manifest(mf)) if asked.get(&mf.request) == Some(&m.from) => {
                            break 'found (mf, m.from);
                        }
                        Ok(_) => {}
                        Err(e) => debug!(from = %m.from, error = %e, "undecodable recovery message"),
                    }
                }
                other => {
                    if let Some((peer, why)) = lost_source(&handle, other).await? {
                        if is_source(peer) && !lost.contains(&peer) {
                            warn!(source = %peer, why, "source lost before the manifest");
                            lost.push(peer);
                            let _ = handle.abandon_peer(peer).await;
                            if peer == target {
                                break;
                            }
                        }
                    }
                }
            }
        }
    };
    let total = manifest.total_bytes();
    if total > options.max_state_bytes {
        return Err(RecoveryError::TooLarge { source_rank: manifest_from, total, limit: options.max_state_bytes });
    }
    info!(
        source = %manifest_from,
        step = manifest.step,
        buffers = manifest.buffers.len(),
        bytes = total,
        "manifest received; fetching"
    );

    // 2. The buffers, striped over every source not already lost.
    let chunk_bytes = options.chunk_bytes.min(MAX_CHUNK - CHUNK_HEADER_BYTES as u32);
    let live: Vec<u64> = ranks.iter().filter(|r| !lost.contains(r)).map(|r| u64::from(r.0)).collect();
    let reuse = manifest
        .buffers
        .iter()
        .map(|(name, _)| match given.iter().position(|(n, _)| n == name) {
            Some(i) => given.swap_remove(i).1,
            None => Vec::new(),
        })
        .collect();
    drop(given);
    let mut fetch = StateFetch::with_buffers(
        &manifest,
        reuse,
        live,
        chunk_bytes,
        options.window_per_source,
        options.chunk_timeout.as_nanos().min(u128::from(u64::MAX)) as u64,
    )?;
    if let Some(p) = &options.progress {
        p.total.store(total, Ordering::Relaxed);
    }
    let transfer_start = tokio::time::Instant::now();
    let mut timer = tokio::time::interval(options.timer);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut decile = 0u64;
    loop {
        while let Some((to, bytes)) = fetch.poll_request(now()) {
            // Source ids are the u32 rank ids they were made from.
            let to = RankId(to as u32);
            match handle.send(to, RECOVERY_CHANNEL, bytes).await {
                Ok(()) => {}
                Err(NodeError::Closed) => return Err(NodeError::Closed.into()),
                Err(e) => {
                    warn!(source = %to, error = %e, "cannot send to source; dropping it");
                    fetch.source_lost(u64::from(to.0))?;
                }
            }
        }
        let (done, total) = fetch.progress();
        if let Some(p) = &options.progress {
            p.done.store(done, Ordering::Relaxed);
        }
        if total > 0 && done * 10 / total > decile {
            decile = done * 10 / total;
            let secs = transfer_start.elapsed().as_secs_f64();
            info!(
                percent = decile * 10,
                bytes = done,
                mib_per_s = format_args!("{:.1}", done as f64 / (1 << 20) as f64 / secs.max(1e-9)),
                "recovery progress"
            );
        }
        if fetch.is_done() {
            break;
        }
        tokio::select! {
            _ = timer.tick() => fetch.handle_timeout(now())?,
            ev = node.next_event() => match ev {
                None => return Err(NodeError::Closed.into()),
                Some(Event::Message(m)) if m.channel == RECOVERY_CHANNEL => {
                    // Straight from the frames' buffers: no joining copy.
                    let parts: Vec<&[u8]> = m.payload.chunks().iter().map(|c| &c[..]).collect();
                    match fetch.handle_message_parts(u64::from(m.from.0), &parts, now()) {
                        Ok(()) => {}
                        Err(e) if e.is_terminal() => return Err(e.into()),
                        Err(e) => warn!(error = %e, "recovery message dropped"),
                    }
                }
                Some(Event::Message(m)) => debug!(from = %m.from, channel = ?m.channel, "not a recovery message; ignored"),
                Some(ev) => {
                    if let Some((peer, why)) = lost_source(&handle, &ev).await? {
                        if is_source(peer) && fetch.live_sources().any(|s| s == u64::from(peer.0)) {
                            warn!(source = %peer, why, "source lost; its pieces go to the others");
                            let _ = handle.abandon_peer(peer).await;
                            fetch.source_lost(u64::from(peer.0))?;
                        }
                    }
                }
            },
        }
    }
    let elapsed = start.elapsed();
    let counters = fetch.counters();
    let step = fetch.step();
    let names = fetch.names().to_vec();
    info!(
        bytes = total,
        elapsed_ms = elapsed.as_millis() as u64,
        mib_per_s = format_args!("{:.1}", total as f64 / (1 << 20) as f64 / elapsed.as_secs_f64().max(1e-9)),
        re_requests = counters.re_requests,
        checksum_failures = counters.checksum_failures,
        sources_lost = ?counters.sources_lost,
        "state recovered"
    );
    Ok(FetchedState {
        step,
        buffers: names.into_iter().zip(fetch.into_buffers()).collect(),
        manifest_from,
        bytes_per_source: counters.bytes_per_source.iter().map(|(s, b)| (RankId(*s as u32), *b)).collect(),
        elapsed,
        counters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use phalanx_net::{LinkKind, NodeConfig, PathFaults, PathSpec};

    const SECRET: &[u8] = b"recovery-test";

    fn state(len: usize, seed: u8) -> Bytes {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
    }

    async fn source(rank: u32) -> Node {
        let mut c = NodeConfig::new(RankId(rank), SECRET.to_vec());
        c.tcp_listen = vec!["127.0.0.1:0".parse().expect("an address")];
        Node::start(c).await.expect("node starts")
    }

    /// Serves like [`serve_state`], but dies (shuts its node down) after `answers` chunks.
    async fn dying_source(mut node: Node, mut server: StateServer, answers: u64) {
        let handle = node.handle();
        while server.counters().chunks < answers {
            match node.next_event().await {
                Some(Event::Message(m)) if m.channel == RECOVERY_CHANNEL => {
                    if let Some(reply) = server.handle(u64::from(m.from.0), &m.payload.to_bytes()) {
                        handle.send(m.from, RECOVERY_CHANNEL, reply).await.expect("node running");
                    }
                }
                Some(_) => {}
                None => return,
            }
        }
        handle.shutdown();
    }

    /// Three sources in-process over loopback TCP; one dies after serving three chunks, with
    /// requests outstanding: the state still arrives whole, from the other two, and the loss
    /// is noticed from the transport (its link failing), not by timing out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_survives_a_source_dying_midway() {
        let buffers = vec![("params".to_string(), state(3 << 20, 1)), ("step".to_string(), state(8, 2))];
        let mut nodes = Vec::new();
        for r in 1..=3 {
            nodes.push(source(r).await);
        }
        let mut config = NodeConfig::new(RankId(9), SECRET.to_vec());
        config.paths = nodes
            .iter()
            .map(|n| PathSpec {
                peer: n.handle().rank(),
                kind: LinkKind::Tcp,
                remote: n.tcp_addrs()[0],
                bind: None,
                faults: PathFaults::new(),
            })
            .collect();
        let mut receiver = Node::start(config).await.expect("node starts");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut servers = Vec::new();
        for (i, mut n) in nodes.into_iter().enumerate() {
            let server = StateServer::new(5, buffers.clone()).expect("valid state");
            if i == 1 {
                servers.push(tokio::spawn(dying_source(n, server, 3)));
                continue;
            }
            let mut stopped = stopped.clone();
            servers.push(tokio::spawn(async move {
                let _ = serve_state(&mut n, server, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
            }));
        }
        let progress = Arc::new(FetchProgress::default());
        let options = FetchOptions {
            chunk_bytes: 64 << 10,
            window_per_source: 2,
            chunk_timeout: Duration::from_secs(30),
            progress: Some(progress.clone()),
            ..FetchOptions::default()
        };
        let got = tokio::time::timeout(
            Duration::from_secs(60),
            fetch_state(&mut receiver, &[RankId(1), RankId(2), RankId(9), RankId(3), RankId(2)], options),
        )
        .await
        .expect("the fetch ends")
        .expect("the state arrives");
        assert_eq!(got.step, 5);
        assert_eq!(got.buffers.len(), 2);
        for ((name, want), (got_name, got)) in buffers.iter().zip(&got.buffers) {
            assert_eq!(name, got_name);
            assert!(want[..] == got[..], "buffer {name} differs");
        }
        let total: u64 = got.bytes_per_source.iter().map(|(_, b)| b).sum();
        assert_eq!(total, (3 << 20) + 8);
        assert_eq!((progress.done(), progress.total()), (total, total));
        assert_eq!(got.bytes_per_source.iter().map(|(r, _)| r.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(got.bytes_per_source[1].1 <= 3 * (64 << 10), "{:?}", got.bytes_per_source);
        assert_eq!(got.counters.sources_lost, vec![2], "{:?}", got.counters);
        assert_eq!(got.counters.timeouts, 0, "the loss came from the transport: {:?}", got.counters);
        let _ = stop.send(true);
        for s in servers {
            s.await.expect("server task");
        }
    }

    #[tokio::test]
    async fn no_sources_and_no_answers_are_errors() {
        let mut receiver = Node::start(NodeConfig::new(RankId(9), SECRET.to_vec())).await.expect("node starts");
        assert!(matches!(
            fetch_state(&mut receiver, &[RankId(9)], FetchOptions::default()).await,
            Err(RecoveryError::NoSources)
        ));
        // Rank 4 has no path: it never answers.
        let options = FetchOptions {
            manifest_timeout: Duration::from_millis(50),
            manifest_deadline: Duration::from_millis(200),
            ..FetchOptions::default()
        };
        match fetch_state(&mut receiver, &[RankId(4)], options).await {
            Err(RecoveryError::NoManifest { asked, .. }) => assert!(asked.len() >= 2 && asked[0] == RankId(4)),
            other => panic!("expected NoManifest, got {other:?}"),
        }
    }
}

//! Fault tests of the sans-IO endpoint under virtual time (DESIGN.md fault model, rows 1, 2, 3,
//! 5 and 6). Each reads as a script: set up links, start traffic, inject the fault, check what
//! the application saw.

use std::time::Duration;

use bytes::Bytes;
use phalanx_proto::harness::{pattern, Harness};
use phalanx_proto::{
    ChannelId, Endpoint, Epoch, Event, Instant, LinkFailure, LinkId, LinkIdentity, RankId, TransportConfig,
};
use proptest::prelude::*;

const A: RankId = RankId(0);
const B: RankId = RankId(1);
const C: RankId = RankId(2);
const GBPS: u64 = 1_000_000_000;

fn small_config() -> TransportConfig {
    TransportConfig {
        chunk_bytes: 4096,
        path_window_bytes: 64 * 1024,
        session_window_frames: 256,
        heartbeat_interval: Duration::from_millis(10),
        link_timeout: Duration::from_millis(50),
        unreachable_after: Duration::from_millis(300),
        min_rto: Duration::from_millis(20),
        ..TransportConfig::default()
    }
}

fn secs(s: f64) -> Instant {
    Instant((s * 1e9) as u64)
}

#[test]
fn message_survives_one_of_two_paths_dying_silently_mid_transfer() {
    let mut h = Harness::new(2, small_config());
    let l1 = h.connect(A, B, Duration::from_micros(50), GBPS);
    let _l2 = h.connect(A, B, Duration::from_micros(50), GBPS);
    let msg = pattern(2 << 20, 7);
    h.send(A, B, ChannelId(1), msg.clone());
    // Run until a quarter has arrived, then cut the first path without telling anyone.
    assert!(h.run_until(secs(1.0), 1_000_000, |h| h.endpoints[&B].counters().bytes_received > 512 << 10));
    h.fault(l1).cut = true;
    assert!(h.run_until(secs(5.0), 1_000_000, |h| h.delivered.get(&B).is_some_and(|d| !d.is_empty())));
    let got = &h.delivered[&B];
    assert_eq!(got.len(), 1, "delivered exactly once");
    assert_eq!(got[0].payload, msg);
    let c = h.endpoints[&A].counters();
    assert_eq!(c.failovers, 1, "the dead path's frames moved over");
    assert!(h.events.iter().any(|(_, r, e)| *r == A && matches!(e, Event::LinkFailed { link, .. } if *link == l1)));
}

#[test]
fn a_link_that_fails_in_one_direction_only_is_declared_dead_and_the_transfer_finishes() {
    // The link toward A dies (A hears nothing more on it) while B keeps receiving on it: A
    // declares it dead after its timeout and moves on to the other path; B's acknowledgements
    // of what it got on the dead link arrive over the other one.
    let mut h = Harness::new(2, small_config());
    let l1 = h.connect(A, B, Duration::from_micros(50), GBPS);
    h.connect(A, B, Duration::from_micros(50), GBPS);
    let msg = pattern(2 << 20, 5);
    h.send(A, B, ChannelId(0), msg.clone());
    assert!(h.run_until(secs(1.0), 1_000_000, |h| h.endpoints[&B].counters().bytes_received > 256 << 10));
    h.fault(l1).cut_toward = Some(A);
    assert!(h.run_until(secs(5.0), 1_000_000, |h| h.delivered.get(&B).is_some_and(|d| !d.is_empty())));
    assert_eq!(h.delivered[&B][0].payload, msg);
    assert_eq!(h.delivered[&B].len(), 1);
    let failed = |h: &Harness| {
        h.events.iter().any(|(_, r, e)| *r == A && matches!(e, Event::LinkFailed { link, .. } if *link == l1))
    };
    assert!(h.run_until(secs(6.0), 1_000_000, failed), "A noticed the one-way failure");
}

#[test]
fn traffic_relays_through_a_third_rank_when_every_direct_path_dies_and_returns_when_they_heal() {
    let mut h = Harness::new(3, small_config());
    let ab1 = h.connect(A, B, Duration::from_micros(50), GBPS);
    let ab2 = h.connect(A, B, Duration::from_micros(50), GBPS);
    h.connect(A, C, Duration::from_micros(50), GBPS);
    h.connect(B, C, Duration::from_micros(50), GBPS);
    // Let heartbeats tell everyone who reaches whom.
    h.run_until(secs(0.05), 100_000, |_| false);
    let first = pattern(1 << 20, 1);
    h.send(A, B, ChannelId(3), first.clone());
    assert!(h.run_until(secs(1.0), 1_000_000, |h| h.endpoints[&B].counters().bytes_received > 256 << 10));
    h.fault(ab1).cut = true;
    h.fault(ab2).cut = true;
    assert!(h.run_until(secs(5.0), 1_000_000, |h| h.delivered.get(&B).is_some_and(|d| !d.is_empty())));
    assert_eq!(h.delivered[&B][0].payload, first, "intact after relaying");
    assert!(h.endpoints[&C].counters().relayed_bytes > 0, "C carried A's frames");
    assert!(h.endpoints[&A].counters().relayed_out_bytes > 0);
    assert!(!h.events.iter().any(|(_, _, e)| matches!(e, Event::PeerUnreachable { .. })), "a relay route existed");
    // The direct path comes back (a new connection); new traffic takes it, not the relay.
    h.connect(A, B, Duration::from_micros(50), GBPS);
    let relayed_before = h.endpoints[&C].counters().relayed_bytes;
    let second = pattern(1 << 20, 2);
    h.send(A, B, ChannelId(3), second.clone());
    assert!(h.run_until(secs(10.0), 1_000_000, |h| h.delivered[&B].len() == 2));
    assert_eq!(h.delivered[&B][1].payload, second);
    assert_eq!(h.endpoints[&C].counters().relayed_bytes, relayed_before, "back on the direct path");
}

#[test]
fn corrupted_frames_are_counted_against_their_path_and_retransmitted() {
    let mut h = Harness::new(2, small_config());
    let good = h.connect(A, B, Duration::from_micros(50), GBPS);
    let bad = h.connect(A, B, Duration::from_micros(50), GBPS);
    h.fault(bad).corrupt_next_data = 5;
    let msg = pattern(1 << 20, 9);
    h.send(A, B, ChannelId(0), msg.clone());
    assert!(h.run_until(secs(5.0), 1_000_000, |h| h.delivered.get(&B).is_some_and(|d| !d.is_empty())));
    assert_eq!(h.delivered[&B].len(), 1);
    assert_eq!(h.delivered[&B][0].payload, msg);
    let b_bad = h.endpoints[&B].link_counters(bad).unwrap();
    let b_good = h.endpoints[&B].link_counters(good).unwrap();
    assert_eq!(b_bad.checksum_failures, 5);
    assert_eq!(b_good.checksum_failures, 0);
    let a_bad = h.endpoints[&A].link_counters(bad).unwrap();
    assert_eq!(a_bad.retransmits, 5, "each corrupted frame was charged to the bad path");
    assert_eq!(h.endpoints[&A].link_counters(good).unwrap().retransmits, 0);
}

#[test]
fn tail_loss_is_repaired_by_the_retransmission_timer() {
    let mut h = Harness::new(2, small_config());
    let l = h.connect(A, B, Duration::from_micros(50), GBPS);
    // A one-frame message whose only frame is dropped: no later frame reveals the loss.
    h.fault(l).drop_next_data = 1;
    h.send(A, B, ChannelId(0), pattern(100, 3));
    assert!(h.run_until(secs(1.0), 100_000, |h| h.delivered.get(&B).is_some_and(|d| !d.is_empty())));
    assert_eq!(h.endpoints[&A].counters().retransmits, 1);
}

#[test]
fn peer_with_no_route_is_reported_unreachable_at_the_deadline_not_before() {
    let cfg = small_config();
    let mut h = Harness::new(2, cfg.clone());
    let l = h.connect(A, B, Duration::from_micros(50), GBPS);
    h.send(A, B, ChannelId(0), pattern(1 << 20, 1));
    assert!(h.run_until(secs(1.0), 100_000, |h| h.endpoints[&B].counters().bytes_received > 0));
    let closed_at = h.now;
    h.close(l);
    let ok = h.run_until(secs(5.0), 1_000_000, |h| {
        h.events.iter().any(|(_, r, e)| *r == A && matches!(e, Event::PeerUnreachable { peer, .. } if *peer == B))
    });
    assert!(ok, "events: {:?} now {}", h.events, h.now);
    let (at, _, ev) = h.events.iter().find(|(_, r, e)| *r == A && matches!(e, Event::PeerUnreachable { .. })).unwrap();
    let Event::PeerUnreachable { since, .. } = ev else { unreachable!() };
    assert_eq!(*since, closed_at);
    assert!(*at >= closed_at + cfg.unreachable_after, "not before the deadline");
    assert!(*at <= closed_at + cfg.unreachable_after + cfg.heartbeat_interval, "promptly after it");
    // The data stays queued; abandoning the peer reports it dropped.
    assert_eq!(h.endpoints.get_mut(&A).unwrap().abandon_peer(B), 1);
}

#[test]
fn striping_follows_the_measured_rate_of_each_path() {
    // Windows larger than each path's bandwidth-delay product, so bandwidth, not the window,
    // limits each path (see docs/transport.md on sizing windows).
    let cfg = TransportConfig { chunk_bytes: 64 << 10, path_window_bytes: 1 << 20, ..small_config() };
    let mut h = Harness::new(2, cfg);
    let fast = h.connect(A, B, Duration::from_micros(100), 3 * GBPS);
    let slow = h.connect(A, B, Duration::from_micros(100), GBPS);
    h.send(A, B, ChannelId(0), pattern(8 << 20, 4));
    assert!(h.run_until(secs(5.0), 1_000_000, |h| h.delivered.get(&B).is_some_and(|d| !d.is_empty())));
    let f = h.endpoints[&A].link_counters(fast).unwrap().bytes_sent as f64;
    let s = h.endpoints[&A].link_counters(slow).unwrap().bytes_sent as f64;
    let ratio = f / s;
    assert!((2.0..=4.5).contains(&ratio), "fast/slow bytes = {ratio:.2}, expected about 3");
}

#[test]
fn frames_from_a_fenced_epoch_are_refused_and_reported_once() {
    let mut h = Harness::new(2, small_config());
    h.connect(A, B, Duration::from_micros(50), GBPS);
    let now = h.now;
    h.endpoints.get_mut(&B).unwrap().set_fence(Epoch(2));
    h.send(A, B, ChannelId(0), pattern(10_000, 1));
    h.run_until(now + Duration::from_millis(20), 100_000, |_| false);
    assert!(h.delivered.get(&B).is_none_or(|d| d.is_empty()), "nothing from epoch 1 accepted");
    let reports = h.events.iter().filter(|(_, r, e)| *r == B && matches!(e, Event::StaleEpochRefused { .. })).count();
    assert_eq!(reports, 1);
    assert!(h.endpoints[&B].counters().stale_epoch_refused >= 3);
    // Once the sender moves to the new epoch, its (retransmitted) frames get through.
    h.endpoints.get_mut(&A).unwrap().set_epoch(Epoch(2));
    assert!(h.run_until(secs(5.0), 1_000_000, |h| h.delivered.get(&B).is_some_and(|d| d.len() == 1)));
}

#[test]
fn a_link_from_below_the_fence_is_refused_at_link_up_and_does_not_reset_the_session() {
    let mut b = Endpoint::new(RankId(1), 11, Epoch(5), small_config());
    b.set_fence(Epoch(5));
    let t = Instant(0);
    // The peer's endpoint of the previous epoch, still listening at its address.
    b.handle_link_up(t, LinkId(1), LinkIdentity { rank: RankId(0), incarnation: 100, epoch: Epoch(4) });
    let evs: Vec<Event> = std::iter::from_fn(|| b.poll_event()).collect();
    assert!(evs.iter().any(|e| matches!(e, Event::StaleEpochRefused { epoch: Epoch(4), .. })), "{evs:?}");
    assert!(
        evs.iter().any(|e| matches!(e, Event::LinkFailed { reason: LinkFailure::StaleEpoch { .. }, .. })),
        "the driver is told to close it: {evs:?}"
    );
    assert!(!evs.iter().any(|e| matches!(e, Event::LinkUp { .. })));
    assert_eq!(b.counters().stale_epoch_refused, 1);
    // Its endpoint of the current epoch (another incarnation) is not taken for a restart.
    b.handle_link_up(t, LinkId(2), LinkIdentity { rank: RankId(0), incarnation: 200, epoch: Epoch(5) });
    let evs: Vec<Event> = std::iter::from_fn(|| b.poll_event()).collect();
    assert!(evs.iter().any(|e| matches!(e, Event::LinkUp { .. })), "{evs:?}");
    assert!(!evs.iter().any(|e| matches!(e, Event::PeerRestarted { .. })), "{evs:?}");
}

#[derive(Clone, Debug)]
enum Fault {
    Drop(u32),
    Corrupt(u32),
    Cut,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever happens to one of two paths, every message arrives exactly once and in order
    /// per channel.
    #[test]
    fn every_message_arrives_once_in_order_per_channel_under_path_faults(
        sizes in proptest::collection::vec((0usize..20_000, 0u32..3), 1..12),
        faults in proptest::collection::vec((0usize..2, prop_oneof![
            (1u32..6).prop_map(Fault::Drop),
            (1u32..6).prop_map(Fault::Corrupt),
            Just(Fault::Cut),
        ]), 0..4),
    ) {
        let mut h = Harness::new(2, small_config());
        let links = [
            h.connect(A, B, Duration::from_micros(30), GBPS),
            h.connect(A, B, Duration::from_micros(70), GBPS / 2),
        ];
        let mut sent = Vec::new();
        for (i, (len, ch)) in sizes.iter().enumerate() {
            let m = pattern(*len, i as u64);
            h.send(A, B, ChannelId(*ch), m.clone());
            sent.push((ChannelId(*ch), m));
        }
        // Only one of the two paths is ever cut, so a route always remains.
        for (which, f) in &faults {
            let l = links[if matches!(f, Fault::Cut) { 0 } else { *which }];
            match f {
                Fault::Drop(n) => h.fault(l).drop_next_data += n,
                Fault::Corrupt(n) => h.fault(l).corrupt_next_data += n,
                Fault::Cut => h.fault(l).cut = true,
            }
        }
        let n = sent.len();
        prop_assert!(h.run_until(secs(30.0), 2_000_000, |h| h.delivered.get(&B).is_some_and(|d| d.len() >= n)));
        let got = &h.delivered[&B];
        prop_assert_eq!(got.len(), n);
        for ch in 0..3 {
            let want: Vec<&Bytes> = sent.iter().filter(|(c, _)| c.0 == ch).map(|(_, m)| m).collect();
            let have: Vec<Bytes> = got.iter().filter(|m| m.channel.0 == ch).map(|m| m.payload.to_bytes()).collect();
            let have: Vec<&Bytes> = have.iter().collect();
            prop_assert_eq!(want, have);
        }
    }
}

#[test]
fn a_corrupted_tail_frame_is_resent_on_the_receivers_loss_hint_without_waiting_for_a_timeout() {
    // A retransmission timeout far beyond the run: only the loss hint can repair the frame.
    let cfg = TransportConfig { min_rto: Duration::from_secs(60), ..small_config() };
    let mut h = Harness::new(2, cfg);
    let l = h.connect(A, B, Duration::from_micros(50), GBPS);
    h.fault(l).corrupt_next_data = 1;
    h.send(A, B, ChannelId(0), pattern(100, 3));
    assert!(h.run_until(secs(0.005), 100_000, |h| h.delivered.get(&B).is_some_and(|d| !d.is_empty())));
    assert_eq!(h.endpoints[&A].link_counters(l).unwrap().retransmits, 1);
}

#[test]
fn data_for_several_peers_is_interleaved_so_no_peer_waits_behind_another() {
    let mut h = Harness::new(3, small_config());
    h.connect(A, B, Duration::from_micros(50), GBPS);
    h.connect(A, C, Duration::from_micros(50), GBPS);
    h.send(A, B, ChannelId(0), pattern(4 << 20, 1));
    h.send(A, C, ChannelId(0), pattern(4 << 20, 2));
    // By the time either peer has half of its message, the other has a fair share too.
    assert!(h.run_until(secs(5.0), 1_000_000, |h| {
        let b = h.endpoints[&B].counters().bytes_received;
        let c = h.endpoints[&C].counters().bytes_received;
        b.max(c) > 2 << 20
    }));
    let b = h.endpoints[&B].counters().bytes_received as f64;
    let c = h.endpoints[&C].counters().bytes_received as f64;
    assert!(b.min(c) / b.max(c) > 0.5, "B got {b} bytes, C got {c}");
}

/// Feeds every frame `from` has to send into `to`; returns how many acks `to` sent back (and
/// hands them to `from`).
fn deliver_and_count_acks(from: &mut Endpoint, to: &mut Endpoint, now: Instant) -> usize {
    let mut acks = 0;
    while let Some(t) = from.poll_transmit(now) {
        to.handle_frame(now, t.link, t.frame);
        while let Some(back) = to.poll_transmit(now) {
            if back.frame.header.kind == phalanx_proto::FrameKind::Ack {
                acks += 1;
            }
            from.handle_frame(now, back.link, back.frame);
        }
    }
    acks
}

#[test]
fn small_frames_are_acknowledged_in_batches_large_ones_every_two_frames_and_large_messages_at_their_end() {
    let cfg = TransportConfig::default();
    let every = cfg.ack_every_frames;
    assert!(every > 2 && u64::from(every) <= cfg.session_window_frames / 4, "{every} frames");
    let mut a = Endpoint::new(A, 1, Epoch(1), cfg.clone());
    let mut b = Endpoint::new(B, 2, Epoch(1), cfg.clone());
    let now = Instant(0);
    a.handle_link_up(now, LinkId(1), b.identity());
    b.handle_link_up(now, LinkId(1), a.identity());
    // Small messages: one ack per `every` frames, none in between.
    for i in 0..every - 1 {
        a.send(now, B, ChannelId(0), pattern(100, u64::from(i))).unwrap();
    }
    assert_eq!(deliver_and_count_acks(&mut a, &mut b, now), 0, "no ack before {every} frames");
    a.send(now, B, ChannelId(0), pattern(100, 0)).unwrap();
    assert_eq!(deliver_and_count_acks(&mut a, &mut b, now), 1, "one ack at {every} frames");
    assert_eq!(a.undelivered_messages(B), 0, "everything acknowledged");
    // Large frames (whole chunks): an ack every two frames, so the sender's window never fills
    // waiting for the timer.
    a.send(now, B, ChannelId(0), pattern(8 * cfg.chunk_bytes, 3)).unwrap();
    assert_eq!(deliver_and_count_acks(&mut a, &mut b, now), 4);
    // The last frame of a message of at least PROMPT_ACK_MESSAGE bytes is acknowledged at
    // once, so its sender is done with it without waiting for the timer: the collectives'
    // 1 MiB − 44 byte messages one ack each, a message of two and a half chunks two.
    for i in 0..4 {
        a.send(now, B, ChannelId(0), pattern(cfg.chunk_bytes - 44, i)).unwrap();
    }
    assert_eq!(deliver_and_count_acks(&mut a, &mut b, now), 4);
    a.send(now, B, ChannelId(0), pattern(5 * cfg.chunk_bytes / 2, 5)).unwrap();
    assert_eq!(deliver_and_count_acks(&mut a, &mut b, now), 2);
    assert_eq!(a.undelivered_messages(B), 0, "everything acknowledged");
    // Below it, a message's end waits for the batch or the timer.
    let small = phalanx_proto::PROMPT_ACK_MESSAGE as usize - 1;
    a.send(now, B, ChannelId(0), pattern(small, 6)).unwrap();
    assert_eq!(deliver_and_count_acks(&mut a, &mut b, now), 0);
}

#[test]
fn flushing_acks_acknowledges_at_once_what_the_delayed_ack_timer_would_send_later() {
    let cfg = TransportConfig { ack_every_frames: 100, ack_delay: Duration::from_secs(1), ..small_config() };
    let mut a = Endpoint::new(A, 1, Epoch(1), cfg.clone());
    let mut b = Endpoint::new(B, 2, Epoch(1), cfg);
    let now = Instant(0);
    a.handle_link_up(now, phalanx_proto::LinkId(1), b.identity());
    b.handle_link_up(now, phalanx_proto::LinkId(1), a.identity());
    a.send(now, B, ChannelId(0), pattern(10, 1)).unwrap();
    let t = a.poll_transmit(now).expect("data frame");
    b.handle_frame(now, t.link, t.frame);
    assert!(b.poll_transmit(now).is_none(), "the ack waits for its timer");
    b.flush_acks(now);
    let ack = b.poll_transmit(now).expect("ack sent at once");
    a.handle_frame(now, ack.link, ack.frame);
    assert_eq!(a.undelivered_messages(B), 0);
}

/// Every frame `e` has to send at `now`, as `(link, kind, payload bytes)`, handed to `to`.
fn transmit_all(e: &mut Endpoint, to: &mut Endpoint, now: Instant) -> Vec<(LinkId, phalanx_proto::FrameKind, usize)> {
    let mut out = Vec::new();
    while let Some(t) = e.poll_transmit(now) {
        out.push((t.link, t.frame.header.kind, t.frame.payload.len()));
        to.handle_frame(now, t.link, t.frame);
    }
    out
}

#[test]
fn a_small_data_frame_takes_along_an_ack_that_waited_half_the_ack_delay_a_large_one_does_not() {
    use phalanx_proto::FrameKind::{Ack, Data};
    let ms = |x: f64| Instant((x * 1e6) as u64);
    let cfg = TransportConfig { ack_every_frames: 100, ack_delay: Duration::from_millis(1), ..small_config() };
    let large = phalanx_proto::ACK_ALONG_MAX_PAYLOAD + 1;
    let cfg = TransportConfig { chunk_bytes: 2 * large, path_window_bytes: 8 * large as u64, ..cfg };
    let mut a = Endpoint::new(A, 1, Epoch(1), cfg.clone());
    let mut b = Endpoint::new(B, 2, Epoch(1), cfg);
    a.handle_link_up(ms(0.0), LinkId(1), b.identity());
    b.handle_link_up(ms(0.0), LinkId(1), a.identity());
    // Heartbeats may come at any time; what matters is data and acks.
    let no_ack = |v: &[(LinkId, phalanx_proto::FrameKind, usize)]| v.iter().all(|(_, k, _)| *k != Ack);
    // B owes A an ack from 0 ms on, due at 1 ms.
    a.send(ms(0.0), B, ChannelId(0), pattern(10, 1)).unwrap();
    assert!(no_ack(&transmit_all(&mut a, &mut b, ms(0.0))));
    // At 0.2 ms B's own small message goes alone: the ack has not waited half its delay.
    b.send(ms(0.2), A, ChannelId(0), pattern(10, 2)).unwrap();
    let sent = transmit_all(&mut b, &mut a, ms(0.2));
    assert!(no_ack(&sent) && sent.iter().filter(|(_, k, _)| *k == Data).count() == 1, "{sent:?}");
    assert_eq!(a.undelivered_messages(B), 1, "A's message not acknowledged yet");
    // At 0.6 ms it has: the ack follows B's next small message on the same link, and the timer
    // has nothing left to send.
    b.send(ms(0.6), A, ChannelId(0), pattern(10, 3)).unwrap();
    let sent = transmit_all(&mut b, &mut a, ms(0.6));
    let sent: Vec<_> = sent.iter().filter(|(_, k, _)| matches!(k, Data | Ack)).map(|(l, k, _)| (*l, *k)).collect();
    assert_eq!(sent, vec![(LinkId(1), Data), (LinkId(1), Ack)]);
    assert_eq!(a.undelivered_messages(B), 0, "A's message acknowledged by the ack that came along");
    b.handle_timeout(ms(1.0));
    let sent = transmit_all(&mut b, &mut a, ms(1.0));
    assert!(no_ack(&sent), "no ack left for the timer: {sent:?}");
    // Behind a frame too large for the writer's buffer the ack would be a write of its own:
    // it waits for its timer.
    a.send(ms(1.1), B, ChannelId(0), pattern(10, 4)).unwrap();
    transmit_all(&mut a, &mut b, ms(1.1));
    b.send(ms(1.9), A, ChannelId(0), pattern(large, 5)).unwrap();
    let sent = transmit_all(&mut b, &mut a, ms(1.9));
    assert!(no_ack(&sent) && sent.iter().any(|(_, k, n)| *k == Data && *n == large), "{sent:?}");
    assert_eq!(a.undelivered_messages(B), 1);
    b.handle_timeout(ms(2.1));
    let sent = transmit_all(&mut b, &mut a, ms(2.1));
    assert!(sent.iter().any(|(_, k, _)| *k == Ack), "{sent:?}");
    assert_eq!(a.undelivered_messages(B), 0);
}

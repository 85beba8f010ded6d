//! Real sockets on loopback (DESIGN.md fault model rows 1, 2 and 5): large messages over two
//! paths with one cut mid-transfer, over TCP and over QUIC; relay through a third rank and the
//! return to the direct path; bit flips detected and repaired; wrong credentials refused.

mod support;

use std::time::Duration;

use phalanx_net::{LinkKind, Node, PathFaults};
use phalanx_proto::{ChannelId, Event, RankId};
use support::*;

const BIG: usize = 256 << 20;

/// Rank 0 dials rank 1 over two paths of `kind`; path 0 is cut after 64 MiB of a 256 MiB
/// message. The message arrives once, intact and in order between two small ones.
async fn big_message_survives_a_path_cut(kind: LinkKind) {
    let tls = (kind == LinkKind::Quic).then(|| credentials(2).1);
    let id = |r: usize| tls.as_ref().map(|t| t[r].clone());
    let mut b = Node::start(config(1, SECRET, Some(kind), id(1))).await.unwrap();
    let faults = [PathFaults::new(), PathFaults::new()];
    let mut a_cfg = config(0, SECRET, None, id(0));
    for f in &faults {
        a_cfg.paths.push(path(1, kind, addr(&b, kind), f));
    }
    let a = Node::start(a_cfg).await.unwrap();
    let h = a.handle();
    let msgs = [payload(1000, 1), payload(BIG, 2), payload(3000, 3)];
    faults[0].cut_after_bytes(64 << 20);
    for m in &msgs {
        h.send(RankId(1), ChannelId(4), m.clone()).await.unwrap();
    }
    for (i, want) in msgs.iter().enumerate() {
        let got = b.next_message(Duration::from_secs(120), |_| {}).await.unwrap_or_else(|| panic!("message {i} lost"));
        assert_eq!(got.from, RankId(0));
        assert_eq!(got.payload.len(), want.len(), "message {i} in order");
        assert_eq!(got.payload.crc32c(), crc32c::crc32c(want), "message {i} intact");
    }
    assert!(faults[0].is_cut(), "the cut happened during the transfer");
    let (ca, _) = h.counters().await.unwrap();
    let (cb, _) = b.handle().counters().await.unwrap();
    assert!(ca.failovers >= 1, "frames moved off the cut path: {ca:?}");
    assert_eq!(cb.messages_delivered, 3, "each message delivered exactly once");
    assert_eq!(cb.checksum_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_256mib_message_arrives_once_intact_when_one_of_two_paths_is_cut_mid_transfer() {
    big_message_survives_a_path_cut(LinkKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_256mib_message_arrives_once_intact_when_one_of_two_paths_is_cut_mid_transfer() {
    big_message_survives_a_path_cut(LinkKind::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_relays_through_c_when_every_a_b_path_is_cut_and_returns_to_the_direct_path() {
    let mut c = Node::start(config(2, SECRET, Some(LinkKind::Tcp), None)).await.unwrap();
    let mut b_cfg = config(1, SECRET, Some(LinkKind::Tcp), None);
    b_cfg.paths.push(path(2, LinkKind::Tcp, addr(&c, LinkKind::Tcp), &PathFaults::new()));
    let mut b = Node::start(b_cfg).await.unwrap();
    let ab = [PathFaults::new(), PathFaults::new()];
    let mut a_cfg = config(0, SECRET, None, None);
    for f in &ab {
        a_cfg.paths.push(path(1, LinkKind::Tcp, addr(&b, LinkKind::Tcp), f));
    }
    a_cfg.paths.push(path(2, LinkKind::Tcp, addr(&c, LinkKind::Tcp), &PathFaults::new()));
    let mut a = Node::start(a_cfg).await.unwrap();
    let (ha, hc) = (a.handle(), c.handle());
    // Everyone connected, and heartbeats have told A that C reaches B.
    let mut up = 0;
    expect_event(&mut a, Duration::from_secs(10), |e| {
        up += matches!(e, Event::LinkUp { .. }) as u32;
        up == 3
    })
    .await;
    expect_event(&mut c, Duration::from_secs(10), |e| matches!(e, Event::LinkUp { peer: RankId(1), .. })).await;
    tokio::time::sleep(fast_transport().heartbeat_interval * 4).await;

    // Cut both direct paths during a 64 MiB transfer.
    ab[0].cut_after_bytes(16 << 20);
    ab[1].cut_after_bytes(16 << 20);
    let first = payload(64 << 20, 11);
    ha.send(RankId(1), ChannelId(0), first.clone()).await.unwrap();
    let got = b.next_message(Duration::from_secs(60), |_| {}).await.expect("relayed message arrives");
    assert_eq!(got.payload.crc32c(), crc32c::crc32c(&first));
    let relayed = hc.counters().await.unwrap().0.relayed_bytes;
    assert!(relayed > 0, "C forwarded A's frames");
    assert!(ha.counters().await.unwrap().0.relayed_out_bytes > 0);

    // The paths come back: the dialer reconnects, and new traffic takes the direct route.
    ab[0].restore();
    ab[1].restore();
    expect_event(&mut a, Duration::from_secs(10), |e| matches!(e, Event::LinkUp { peer: RankId(1), .. })).await;
    let second = payload(16 << 20, 12);
    ha.send(RankId(1), ChannelId(0), second.clone()).await.unwrap();
    let got = b.next_message(Duration::from_secs(60), |_| {}).await.expect("direct message arrives");
    assert_eq!(got.payload.crc32c(), crc32c::crc32c(&second));
    assert_eq!(hc.counters().await.unwrap().0.relayed_bytes, relayed, "nothing more went through C");
}

/// A message of many frames on one path is read into one buffer and delivered as that buffer
/// (no join for the application); when a frame of it is lost on the way (a flipped bit, then a
/// retransmission out of order) it is delivered as its frames, still intact. Either way the
/// checksums the reader verified come up with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_on_one_path_arrives_as_one_buffer_and_intact_when_a_frame_is_resent() {
    let mut b = Node::start(config(1, SECRET, Some(LinkKind::Tcp), None)).await.unwrap();
    let faults = PathFaults::new();
    let mut a_cfg = config(0, SECRET, None, None);
    a_cfg.paths.push(path(1, LinkKind::Tcp, addr(&b, LinkKind::Tcp), &faults));
    let a = Node::start(a_cfg).await.unwrap();
    let sizes = [8 << 20, 300 << 10, (5 << 20) + 7, 1000];
    for (round, corrupt) in [(0u64, false), (1, true)] {
        if corrupt {
            faults.corrupt_every(3);
        }
        let sent: Vec<_> = sizes.iter().enumerate().map(|(i, n)| payload(*n, round * 10 + i as u64)).collect();
        for m in &sent {
            a.handle().send(RankId(1), ChannelId(2), m.clone()).await.unwrap();
        }
        for (i, want) in sent.iter().enumerate() {
            let got =
                b.next_message(Duration::from_secs(60), |_| {}).await.unwrap_or_else(|| panic!("message {i} lost"));
            assert_eq!(got.payload, *want, "message {i} of round {round} intact and in order");
            if !corrupt {
                assert_eq!(got.payload.chunks().len(), 1, "message {i} ({} bytes) as one buffer", want.len());
                if want.len() >= 300 << 10 {
                    // Its frames were large: their verified checksums came up, combined.
                    assert_eq!(got.payload.chunk_crc(0), Some(crc32c::crc32c(want)), "message {i}'s checksum");
                }
            }
            for (c, chunk) in got.payload.chunks().iter().enumerate() {
                if let Some(crc) = got.payload.chunk_crc(c) {
                    assert_eq!(crc, crc32c::crc32c(chunk), "message {i} chunk {c}: a checksum that is the chunk's");
                }
            }
        }
    }
    assert!(faults.corrupted() > 0, "the fault fired");
    let (cb, _) = b.handle().counters().await.unwrap();
    assert_eq!(cb.checksum_failures, faults.corrupted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_flips_on_one_path_are_detected_retransmitted_and_charged_to_that_path() {
    let b = Node::start(config(1, SECRET, Some(LinkKind::Tcp), None)).await.unwrap();
    let faults = [PathFaults::new(), PathFaults::new()];
    let mut a_cfg = config(0, SECRET, None, None);
    for f in &faults {
        a_cfg.paths.push(path(1, LinkKind::Tcp, addr(&b, LinkKind::Tcp), f));
    }
    let mut b = b;
    let a = Node::start(a_cfg).await.unwrap();
    faults[1].corrupt_every(4);
    let mut sent = Vec::new();
    for i in 0..6 {
        let m = payload(4 << 20, 100 + i);
        a.handle().send(RankId(1), ChannelId(1), m.clone()).await.unwrap();
        sent.push(m);
    }
    for (i, want) in sent.iter().enumerate() {
        let got = b.next_message(Duration::from_secs(60), |_| {}).await.unwrap_or_else(|| panic!("message {i} lost"));
        assert_eq!(got.payload, *want, "message {i} intact and in order");
    }
    let corrupted = faults[1].corrupted();
    assert!(corrupted > 0, "the fault fired");
    let (cb, b_links) = b.handle().counters().await.unwrap();
    assert_eq!(cb.checksum_failures, corrupted, "every flipped frame was caught by its checksum");
    let bad_links = b_links.iter().filter(|(_, _, c)| c.checksum_failures > 0).count();
    assert_eq!(bad_links, 1, "all failures on one link: {b_links:?}");
    let (ca, a_links) = a.handle().counters().await.unwrap();
    assert!(ca.retransmits >= corrupted);
    let charged: Vec<_> = a_links.iter().filter(|(_, _, c)| c.retransmits > 0).collect();
    assert_eq!(charged.len(), 1, "retransmits charged to the corrupting path only: {a_links:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_cluster_secret_is_refused_and_the_cluster_keeps_working() {
    let mut b = Node::start(config(1, SECRET, Some(LinkKind::Tcp), None)).await.unwrap();
    let mut a_cfg = config(0, SECRET, None, None);
    a_cfg.paths.push(path(1, LinkKind::Tcp, addr(&b, LinkKind::Tcp), &PathFaults::new()));
    let a = Node::start(a_cfg).await.unwrap();
    let mut bad_cfg = config(2, b"not-the-secret", None, None);
    bad_cfg.paths.push(path(1, LinkKind::Tcp, addr(&b, LinkKind::Tcp), &PathFaults::new()));
    let mut intruder = Node::start(bad_cfg).await.unwrap();
    let hb = b.handle();
    eventually(Duration::from_secs(10), "the listener to refuse the intruder", || {
        let hb = hb.clone();
        async move { hb.auth_failures() > 0 }
    })
    .await;
    a.handle().send(RankId(1), ChannelId(0), payload(10_000, 5)).await.unwrap();
    let got = b.next_message(Duration::from_secs(10), |_| {}).await.expect("legitimate traffic flows");
    assert_eq!(got.from, RankId(0));
    // The intruder never got a link, so it cannot have sent anything.
    intruder.handle().send(RankId(1), ChannelId(0), payload(10, 6)).await.unwrap();
    let (ci, links) = intruder.handle().counters().await.unwrap();
    assert!(links.is_empty() && ci.frames_sent == 0, "intruder has no link: {links:?}");
    assert!(intruder.handle().auth_failures() > 0, "the intruder saw the refusal too");
    drop(intruder.next_event());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_peer_with_a_certificate_from_another_ca_is_refused_and_the_cluster_keeps_working() {
    let (_, ids) = credentials(2);
    let (_, foreign) = credentials(3);
    let mut b = Node::start(config(1, SECRET, Some(LinkKind::Quic), Some(ids[1].clone()))).await.unwrap();
    let mut a_cfg = config(0, SECRET, None, Some(ids[0].clone()));
    a_cfg.paths.push(path(1, LinkKind::Quic, addr(&b, LinkKind::Quic), &PathFaults::new()));
    let a = Node::start(a_cfg).await.unwrap();
    // Right secret, wrong certificate authority.
    let mut bad_cfg = config(2, SECRET, None, Some(foreign[2].clone()));
    bad_cfg.paths.push(path(1, LinkKind::Quic, addr(&b, LinkKind::Quic), &PathFaults::new()));
    let intruder = Node::start(bad_cfg).await.unwrap();
    let (hb, hi) = (b.handle(), intruder.handle());
    eventually(Duration::from_secs(10), "TLS to refuse the foreign certificate on both sides", || {
        let (hb, hi) = (hb.clone(), hi.clone());
        async move { hb.auth_failures() > 0 && hi.auth_failures() > 0 }
    })
    .await;
    a.handle().send(RankId(1), ChannelId(0), payload(10_000, 7)).await.unwrap();
    let got = b.next_message(Duration::from_secs(10), |_| {}).await.expect("legitimate traffic flows");
    assert_eq!(got.from, RankId(0));
    assert!(hi.counters().await.unwrap().1.is_empty(), "the intruder has no link");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_quic_connection_carries_several_streams_each_a_link_of_its_own() {
    let (_, ids) = credentials(2);
    let mut b = Node::start(config(1, SECRET, Some(LinkKind::Quic), Some(ids[1].clone()))).await.unwrap();
    let mut a_cfg = config(0, SECRET, None, Some(ids[0].clone()));
    a_cfg.quic_streams = 3;
    a_cfg.paths.push(path(1, LinkKind::Quic, addr(&b, LinkKind::Quic), &PathFaults::new()));
    let mut a = Node::start(a_cfg).await.unwrap();
    let mut ups = 0;
    expect_event(&mut a, Duration::from_secs(10), |e| {
        ups += matches!(e, Event::LinkUp { peer: RankId(1), .. }) as u32;
        ups == 3
    })
    .await;
    let msg = payload(32 << 20, 21);
    a.handle().send(RankId(1), ChannelId(0), msg.clone()).await.unwrap();
    let got = b.next_message(Duration::from_secs(60), |_| {}).await.expect("message arrives");
    assert_eq!(got.payload, msg);
    let (_, links) = a.handle().counters().await.unwrap();
    assert_eq!(links.len(), 3);
    assert!(links.iter().all(|(_, _, c)| c.bytes_sent > 1 << 20), "striped over all three streams: {links:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_reordered_and_dropped_frames_still_give_every_message_once_in_order() {
    let mut b = Node::start(config(1, SECRET, Some(LinkKind::Tcp), None)).await.unwrap();
    let faults = [PathFaults::new(), PathFaults::new()];
    let mut a_cfg = config(0, SECRET, None, None);
    for f in &faults {
        a_cfg.paths.push(path(1, LinkKind::Tcp, addr(&b, LinkKind::Tcp), f));
    }
    a_cfg.transport.chunk_bytes = 64 << 10;
    let a = Node::start(a_cfg).await.unwrap();
    faults[0].set_delay(Duration::from_millis(2));
    faults[0].set_reorder(true);
    faults[1].drop_every(7);
    let sent: Vec<_> = (0..20).map(|i| payload(100_000 + i * 7919, 300 + i as u64)).collect();
    for m in &sent {
        a.handle().send(RankId(1), ChannelId(9), m.clone()).await.unwrap();
    }
    for (i, want) in sent.iter().enumerate() {
        let got = b.next_message(Duration::from_secs(60), |_| {}).await.unwrap_or_else(|| panic!("message {i} lost"));
        assert_eq!(got.payload, *want, "message {i} intact and in order");
    }
    assert!(faults[1].dropped() > 0, "the drop fault fired");
    let (cb, _) = b.handle().counters().await.unwrap();
    assert_eq!(cb.messages_delivered, sent.len() as u64, "each exactly once");
}

/// A message sent as a small header part and a large data part, as a collective sends a
/// segment.
fn header_and_data(seq: u64, data: &bytes::Bytes) -> phalanx_proto::Payload {
    let mut p = phalanx_proto::Payload::from(bytes::Bytes::from(format!("segment {seq:>12}").into_bytes()));
    p.push(data.clone());
    p
}

/// Data the receiver posted a place for is read straight into it (the delivered data *is* the
/// posted range), intact; a data frame that fails its checksum abandons the posting and arrives
/// as usual after its retransmission; a posting taken back before its message arrives is never
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_the_receiver_posted_a_place_for_is_read_into_it_and_a_corrupt_frame_arrives_as_usual() {
    use phalanx_collectives::lending::LendingBuffer;
    use phalanx_proto::PostingTable;
    use std::sync::Arc;
    let mut b = Node::start(config(1, SECRET, Some(LinkKind::Tcp), None)).await.unwrap();
    let table = Arc::new(PostingTable::new());
    b.handle().set_placer(Some(table.clone()));
    let faults = PathFaults::new();
    let mut a_cfg = config(0, SECRET, None, None);
    a_cfg.paths.push(path(1, LinkKind::Tcp, addr(&b, LinkKind::Tcp), &faults));
    let a = Node::start(a_cfg).await.unwrap();
    let len = 700 << 10;
    let n = 6u64;
    for (round, corrupt) in [(0u64, false), (1, true)] {
        if corrupt {
            faults.corrupt_every(2);
        }
        let mut buf = LendingBuffer::new(vec![0u8; len * n as usize]);
        let ranges: Vec<_> = (0..n as usize).map(|i| i * len..(i + 1) * len).collect();
        let sent: Vec<_> = (0..n).map(|i| payload(len, round * 100 + i)).collect();
        for (i, r) in ranges.iter().enumerate() {
            let head = header_and_data(i as u64, &sent[i]).chunks()[0].to_vec();
            let posting = buf.post(r.clone());
            table.file(RankId(0), ChannelId(3), head, &posting);
        }
        // The last one is taken back before anything arrives: it must stay untouched.
        assert_eq!(buf.settle(ranges[n as usize - 1].clone()), Some(false));
        buf.range_mut(ranges[n as usize - 1].clone()).fill(0xab);
        for (i, m) in sent.iter().enumerate() {
            a.handle().send(RankId(1), ChannelId(3), header_and_data(i as u64, m)).await.unwrap();
        }
        let mut in_place = 0;
        for (i, want) in sent.iter().enumerate() {
            let got =
                b.next_message(Duration::from_secs(60), |_| {}).await.unwrap_or_else(|| panic!("message {i} lost"));
            let data = got.payload.chunks().last().expect("data").clone();
            assert_eq!(got.payload.len(), want.len() + 20, "message {i} of round {round}");
            assert!(got.payload.to_bytes().ends_with(want), "message {i} of round {round} intact");
            if i + 1 < n as usize {
                let filled = buf.settle(ranges[i].clone()).expect("posted");
                if filled {
                    assert_eq!(data.as_ptr(), buf.range(ranges[i].clone()).as_ptr(), "message {i}: read in place");
                    assert_eq!(buf.range(ranges[i].clone()), &want[..]);
                    in_place += 1;
                } else {
                    assert!(corrupt, "message {i} of a clean round not in place");
                }
            }
        }
        assert!(buf.range(ranges[n as usize - 1].clone()).iter().all(|b| *b == 0xab), "a revoked posting untouched");
        if corrupt {
            assert!(in_place < n - 1, "a corrupted data frame abandons its posting");
        } else {
            assert_eq!(in_place, n - 1, "every posted message of a clean round in place");
        }
    }
    assert!(faults.corrupted() > 0, "the fault fired");
}

/// A placer that hands out its postings and takes each back at once, as an application does
/// when a message came by another path while a link was reading it.
struct TakenBackAtOnce {
    table: phalanx_proto::PostingTable,
    postings: std::sync::Mutex<Vec<std::sync::Arc<phalanx_proto::Posting>>>,
}

impl phalanx_proto::Placer for TakenBackAtOnce {
    fn place(&self, src: RankId, channel: ChannelId, head: &[u8], rest: usize) -> Option<phalanx_proto::PostedWrite> {
        let w = self.table.place(src, channel, head, rest)?;
        for p in self.postings.lock().unwrap().iter() {
            p.revoke();
        }
        Some(w)
    }
}

/// A posting taken back while its data frame is being read: the link reads the rest of the
/// frame past it and drops it (the stream stays in step), and the message still arrives —
/// its data frame resent — intact, followed by the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posting_taken_back_mid_frame_costs_a_retransmission_not_the_stream() {
    use phalanx_collectives::lending::LendingBuffer;
    use std::sync::Arc;
    let mut b = Node::start(config(1, SECRET, Some(LinkKind::Tcp), None)).await.unwrap();
    let placer = Arc::new(TakenBackAtOnce { table: phalanx_proto::PostingTable::new(), postings: Default::default() });
    b.handle().set_placer(Some(placer.clone()));
    let mut a_cfg = config(0, SECRET, None, None);
    a_cfg.paths.push(path(1, LinkKind::Tcp, addr(&b, LinkKind::Tcp), &PathFaults::new()));
    let a = Node::start(a_cfg).await.unwrap();
    let len = 900 << 10;
    let sent = [payload(len, 7), payload(len, 8)];
    let mut buf = LendingBuffer::new(vec![0u8; len]);
    let posting = buf.post(0..len);
    placer.table.file(RankId(0), ChannelId(4), header_and_data(0, &sent[0]).chunks()[0].to_vec(), &posting);
    placer.postings.lock().unwrap().push(posting);
    for (i, m) in sent.iter().enumerate() {
        a.handle().send(RankId(1), ChannelId(4), header_and_data(i as u64, m)).await.unwrap();
    }
    for (i, want) in sent.iter().enumerate() {
        let got = b.next_message(Duration::from_secs(60), |_| {}).await.unwrap_or_else(|| panic!("message {i} lost"));
        assert!(got.payload.len() == len + 20 && got.payload.to_bytes().ends_with(want), "message {i} intact");
    }
    assert_eq!(buf.settle(0..len), Some(false), "never filled");
    let (ca, _) = a.handle().counters().await.unwrap();
    assert!(ca.retransmits > 0, "the dropped data frame was sent again");
}

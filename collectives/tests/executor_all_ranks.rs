//! Every rank's executor, run in one process with messages delivered in a random order between
//! pairs (FIFO per pair, like the transport): results against a naive f64 reference, integers
//! exact, floats within a stated tolerance, and bit-identical across ranks.

use bytes::Bytes;
use phalanx_collectives::executor::{Executor, Layout};
use phalanx_collectives::reduce::{element_f64, DType, ReduceOp};
use phalanx_collectives::reference;
use phalanx_collectives::schedule::{halving_doubling, hierarchical, ring, tree, Collective, Combine, Schedule};
use proptest::prelude::*;
use std::collections::{BTreeMap, VecDeque};

/// Runs all executors to completion, picking which pair's queue to deliver from with `picks`.
fn run(mut ex: Vec<Executor>, picks: &[usize]) -> Vec<Vec<u8>> {
    let mut queues: BTreeMap<(usize, usize), VecDeque<Bytes>> = BTreeMap::new();
    for i in 0..1_000_000 {
        for (r, e) in ex.iter_mut().enumerate() {
            while let Some((to, m)) = e.poll_send() {
                // Joined here so the delivery below can cut it anywhere (header and data are
                // separate parts on the wire).
                queues.entry((r, to)).or_default().push_back(m.to_bytes());
            }
        }
        let live: Vec<(usize, usize)> = queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        if live.is_empty() {
            break;
        }
        let (from, to) = live[picks.get(i).copied().unwrap_or(0) % live.len()];
        let m = queues.get_mut(&(from, to)).unwrap().pop_front().unwrap();
        // Deliver whole (as the transport delivers a message read into one buffer: the case in
        // which an executor forwards received data without copying it), or as chunks split at
        // arbitrary bytes (mid-header, mid-element), as the transport may.
        let pick = picks.get(i).copied().unwrap_or(0);
        let mut cuts = [pick % (m.len() + 1), (pick / 7) % (m.len() + 1)];
        if pick % 3 == 0 {
            cuts = [0, 0];
        }
        cuts.sort_unstable();
        let chunks = [m.slice(..cuts[0]), m.slice(cuts[0]..cuts[1]), m.slice(cuts[1]..)];
        ex[to].handle_chunks(from, &chunks).expect("a valid message");
    }
    assert!(ex.iter().all(|e| e.is_done()), "every rank finished");
    ex.into_iter().map(|e| e.into_buffer()).collect()
}

fn input_for(dtype: DType, op: ReduceOp, rank: usize, count: usize) -> Vec<u8> {
    reference::input(dtype, op, rank, count)
}

fn input(dtype: DType, rank: usize, count: usize) -> Vec<u8> {
    input_for(dtype, ReduceOp::Sum, rank, count)
}

fn segments(segment_bytes: usize) -> Layout {
    Layout { block_map: None, segment_bytes, lend: false, post: false }
}

fn check_all_reduce(schedules: Vec<Schedule>, dtype: DType, op: ReduceOp, count: usize, picks: &[usize], seg: usize) {
    let world = schedules.len();
    let ex = schedules
        .into_iter()
        .enumerate()
        .map(|(r, s)| Executor::with_layout(s, 9, dtype, op, world, input_for(dtype, op, r, count), segments(seg)))
        .collect();
    let out = run(ex, picks);
    for r in 1..world {
        assert_eq!(out[r], out[0], "rank {r} differs bitwise from rank 0 ({dtype:?} {op:?} world {world})");
    }
    for i in 0..count {
        let want = reference::expected(dtype, op, &(0..world).collect::<Vec<_>>(), count, i);
        let got = element_f64(dtype, &out[0], i);
        assert!(
            reference::close(dtype, got, want),
            "{dtype:?} {op:?} world {world} element {i}: got {got}, want {want}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn all_reduce_schedules_agree_with_the_reference(
        world in 1usize..=16,
        count in prop_oneof![Just(0usize), Just(1), Just(13), 0usize..300],
        dtype_i in 0usize..6,
        op_i in 0usize..5,
        picks in proptest::collection::vec(any::<usize>(), 0..400),
        // Segments of a few elements (many per block: the pipelined path) or one per block.
        seg in prop_oneof![Just(1usize), Just(8), 9usize..64, Just(1 << 20)],
    ) {
        let (dtype, op) = (DType::ALL[dtype_i], ReduceOp::ALL[op_i]);
        let ring: Vec<_> = (0..world).map(|r| ring::schedule(Collective::AllReduce, r, world).unwrap()).collect();
        check_all_reduce(ring, dtype, op, count, &picks, seg);
        let rd: Vec<_> = (0..world).map(|r| halving_doubling::all_reduce(r, world)).collect();
        check_all_reduce(rd, dtype, op, count, &picks, seg);
        if let Some(hd) = (0..world).map(|r| halving_doubling::reduce_scatter_all_gather(r, world)).collect::<Option<Vec<_>>>() {
            check_all_reduce(hd, dtype, op, count, &picks, seg);
        }
        let t = hierarchical::Topology::new((0..world).map(|r| r * 3 / world.max(1)).collect());
        let hier: Vec<_> = (0..world).map(|r| hierarchical::all_reduce(r, &t)).collect();
        check_all_reduce(hier, dtype, op, count, &picks, seg);
    }

    #[test]
    fn broadcast_delivers_the_roots_buffer_to_everyone(world in 1usize..=16, root_seed in any::<usize>(), count in 0usize..100, seg in prop_oneof![Just(4usize), Just(12), Just(1 << 20)]) {
        let root = root_seed % world;
        let dtype = DType::F32;
        let ex = (0..world)
            .map(|r| Executor::with_layout(tree::broadcast(root, r, world), 1, dtype, ReduceOp::Sum, world, input(dtype, r, count), segments(seg)))
            .collect();
        let out = run(ex, &[]);
        for b in &out {
            prop_assert_eq!(b, &input(dtype, root, count));
        }
    }
}

/// A ring all-gather forwards the blocks it receives: from its second round on, each message
/// is the header and the received buffer itself (the same memory, not a copy), and the result
/// is still every rank's block everywhere.
#[test]
fn a_ring_all_gather_forwards_received_segments_without_copying_them() {
    let (world, count, seg) = (4, 4000, 1000);
    let mut ex: Vec<Executor> = (0..world)
        .map(|r| {
            let s = ring::schedule(Collective::AllGather, r, world).unwrap();
            Executor::with_layout(s, 2, DType::I32, ReduceOp::Sum, world, input(DType::I32, r, count), segments(seg))
        })
        .collect();
    // Addresses of the data of every message received, and how many sent messages reuse one.
    let mut received: Vec<Vec<usize>> = vec![Vec::new(); world];
    let (mut sent, mut forwarded) = (0, 0);
    let mut queue: VecDeque<(usize, usize, Bytes)> = VecDeque::new();
    loop {
        for (r, e) in ex.iter_mut().enumerate() {
            while let Some((to, m)) = e.poll_send() {
                sent += 1;
                if let [header, data] = m.chunks() {
                    assert_eq!(header.len(), phalanx_collectives::executor::MESSAGE_HEADER);
                    assert!(received[r].contains(&(data.as_ptr() as usize)), "rank {r} forwards what it received");
                    forwarded += 1;
                }
                // Each message arrives as one buffer whose data is what was sent.
                queue.push_back((r, to, m.to_bytes()));
            }
        }
        let Some((from, to, m)) = queue.pop_front() else { break };
        received[to].push(m[phalanx_collectives::executor::MESSAGE_HEADER..].as_ptr() as usize);
        ex[to].handle_message(from, m).expect("a valid message");
    }
    // 4 segments per block, 3 rounds: the first sends the own block, the other two forward.
    assert_eq!(sent, world * 3 * 4);
    assert_eq!(forwarded, world * 2 * 4);
    let ranks: Vec<Vec<u8>> = (0..world).map(|r| input(DType::I32, r, count)).collect();
    for (r, e) in ex.into_iter().enumerate() {
        assert!(e.is_done());
        let out = e.into_buffer();
        for (b, owner) in ranks.iter().enumerate() {
            let range = phalanx_collectives::schedule::block_range(count, world, b);
            let bytes = range.start * 4..range.end * 4;
            assert_eq!(out[bytes.clone()], owner[bytes], "rank {r} block {b}");
        }
    }
}

/// A segment the transport delivered with its checksum is forwarded with the checksum of its
/// data (derived, not recomputed), whether the header and the data came as one chunk or two;
/// without checksums from the transport, the forwarded data has none either (the transport
/// then checksums the frame itself).
#[test]
fn a_forwarded_segment_carries_the_checksum_the_transport_verified() {
    use phalanx_proto::checksum::crc32c;
    use phalanx_proto::Payload;
    let header = phalanx_collectives::executor::MESSAGE_HEADER;
    // Blocks of 300 000 bytes: one segment each, large enough for the transport to use a
    // precomputed checksum.
    let (world, count) = (3, 3 * 75_000);
    for with_crcs in [true, false] {
        let mut ex: Vec<Executor> = (0..world)
            .map(|r| {
                let s = ring::schedule(Collective::AllGather, r, world).unwrap();
                Executor::new(s, 2, DType::I32, ReduceOp::Sum, world, input(DType::I32, r, count))
            })
            .collect();
        let mut queue: VecDeque<(usize, usize, Bytes)> = VecDeque::new();
        let (mut forwarded, mut delivered) = (0, 0);
        loop {
            for (r, e) in ex.iter_mut().enumerate() {
                while let Some((to, m)) = e.poll_send() {
                    if let [_, data] = m.chunks() {
                        forwarded += 1;
                        let expected = with_crcs.then(|| crc32c(data));
                        assert_eq!(m.chunk_crc(1), expected, "rank {r}'s forwarded data and its checksum");
                    }
                    queue.push_back((r, to, m.to_bytes()));
                }
            }
            let Some((from, to, m)) = queue.pop_front() else { break };
            let mut p = Payload::new();
            let crc = |b: &[u8]| with_crcs.then(|| crc32c(b));
            if delivered % 2 == 0 {
                p.push_verified(m.clone(), crc(&m));
            } else {
                p.push_verified(m.slice(..header), crc(&m[..header]));
                p.push_verified(m.slice(header..), crc(&m[header..]));
            }
            delivered += 1;
            ex[to].handle_payload_sized(from, &p, 0).expect("a valid message");
        }
        // Two rounds; the second forwards what the first received.
        assert_eq!(forwarded, world);
        let ranks: Vec<Vec<u8>> = (0..world).map(|r| input(DType::I32, r, count)).collect();
        for e in ex {
            let out = e.into_buffer();
            for (b, owner) in ranks.iter().enumerate() {
                let range = phalanx_collectives::schedule::block_range(count, world, b);
                assert_eq!(out[range.start * 4..range.end * 4], owner[range.start * 4..range.end * 4]);
            }
        }
    }
}

/// With lending on, an all-gather's own block goes out as the buffer's own bytes (no copy):
/// the executor is done but holds its buffer back (`lent`) while any of those messages lives,
/// and hands back the caller's own allocation, every block right, once they are dropped. Only
/// the own block is lent (forwarded blocks go out as the received buffers).
#[test]
fn an_all_gather_lends_its_own_block_and_hands_the_same_buffer_back_once_it_is_returned() {
    let (world, count, seg) = (3, 3 * 720_000, 1 << 20);
    let lend = Layout { block_map: None, segment_bytes: seg, lend: true, post: false };
    let mut ex: Vec<Executor> = (0..world)
        .map(|r| {
            let s = ring::schedule(Collective::AllGather, r, world).unwrap();
            Executor::with_layout(s, 2, DType::I32, ReduceOp::Sum, world, input(DType::I32, r, count), lend.clone())
        })
        .collect();
    let buffers: Vec<std::ops::Range<usize>> = ex
        .iter()
        .map(|e| {
            let at = e.buffer().as_ptr() as usize;
            at..at + e.buffer().len()
        })
        .collect();
    let own_block_segments = (count / world * 4).div_ceil(seg);
    let mut lent = vec![0; world];
    // Every message sent, kept alive until the end (as a transport keeps unacknowledged frames).
    let mut kept = Vec::new();
    let mut queue: VecDeque<(usize, usize, Bytes)> = VecDeque::new();
    loop {
        for (r, e) in ex.iter_mut().enumerate() {
            while let Some((to, m)) = e.poll_send() {
                if let [_, data] = m.chunks() {
                    if buffers[r].contains(&(data.as_ptr() as usize)) {
                        lent[r] += 1;
                    }
                }
                queue.push_back((r, to, m.to_bytes()));
                kept.push(m);
            }
        }
        let Some((from, to, m)) = queue.pop_front() else { break };
        ex[to].handle_message(from, m).expect("a valid message");
    }
    assert_eq!(lent, vec![own_block_segments; world], "each rank lent its own block's segments");
    assert!(ex.iter().all(|e| e.is_done() && e.lent().is_some()), "done, buffer still lent");
    drop(kept);
    let ranks: Vec<Vec<u8>> = (0..world).map(|r| input(DType::I32, r, count)).collect();
    for (r, e) in ex.into_iter().enumerate() {
        assert!(e.lent().is_none(), "rank {r}: returned");
        let out = e.into_buffer();
        assert_eq!(out.as_ptr() as usize, buffers[r].start, "rank {r}: the same allocation back");
        for (b, owner) in ranks.iter().enumerate() {
            let range = phalanx_collectives::schedule::block_range(count, world, b);
            assert_eq!(
                out[range.start * 4..range.end * 4],
                owner[range.start * 4..range.end * 4],
                "rank {r} block {b}"
            );
        }
    }
}

/// Runs all executors to completion as [`run`] does, messages kept in their parts as the
/// transport keeps them, with the postings each files ([`Executor::poll_posting`]) served as a
/// link reader serves them: by `picks`, a posted message's data is read into its posting (and
/// delivered from there, or — a duplicate that came by another path — delivered from the
/// message while the posting holds the same bytes), or the posting is claimed, half written
/// with garbage and abandoned (a link that died mid-frame), or never claimed. Returns the
/// results and how many segments were found in place.
fn run_posted(mut ex: Vec<Executor>, picks: &[usize]) -> (Vec<Vec<u8>>, u64) {
    use phalanx_proto::{ChannelId, Payload, Placer, PostingTable, RankId};
    let mut queues: BTreeMap<(usize, usize), VecDeque<Payload>> = BTreeMap::new();
    let tables: Vec<PostingTable> = (0..ex.len()).map(|_| PostingTable::new()).collect();
    for i in 0..1_000_000 {
        for (r, e) in ex.iter_mut().enumerate() {
            // Delivered messages are dropped: their loans are back.
            e.poll_loans();
            while let Some(p) = e.poll_posting() {
                tables[r].file(RankId(p.from as u32), ChannelId(0), p.head.to_vec(), &p.posting);
            }
            while let Some((to, m)) = e.poll_send() {
                queues.entry((r, to)).or_default().push_back(m);
            }
        }
        let live: Vec<(usize, usize)> = queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        if live.is_empty() {
            break;
        }
        let pick = picks.get(i).copied().unwrap_or(0);
        let (from, to) = live[pick % live.len()];
        let m = queues.get_mut(&(from, to)).unwrap().pop_front().unwrap();
        let parts = m.chunks();
        let mut delivered = Payload::new();
        let placed = match parts {
            [head, data] => {
                tables[to].place(RankId(from as u32), ChannelId(0), head, data.len()).map(|w| (head, data, w))
            }
            _ => None,
        };
        match placed {
            Some((head, data, mut w)) if pick % 5 != 0 => {
                let half = data.len() / 2;
                w.write(0..half, |d| d.copy_from_slice(&data[..half])).expect("not taken back");
                w.write(half..data.len(), |d| d.copy_from_slice(&data[half..])).expect("not taken back");
                let filled = w.finish().expect("not taken back");
                assert_eq!(filled, *data);
                delivered.push(head.clone());
                delivered.push(if pick % 7 == 0 { data.clone() } else { filled });
            }
            Some((_, data, mut w)) => {
                w.write(0..data.len() / 2, |d| d.fill(0xee)).expect("not taken back");
                drop(w);
                delivered = m.clone();
            }
            None => delivered = m.clone(),
        }
        ex[to].handle_payload_sized(from, &delivered, 0).expect("a valid message");
    }
    assert!(ex.iter().all(|e| e.is_done()), "every rank finished");
    let in_place = ex.iter().map(|e| e.received_in_place()).sum();
    (ex.into_iter().map(|e| e.into_buffer()).collect(), in_place)
}

/// A receive into a range the transport still holds (lent until it comes back: a ring
/// reduce-scatter's partial sums, overwritten by the gathering half) waits for the loan, and
/// the collective finishes, right, once the loans are back.
#[test]
fn a_receive_into_a_range_still_lent_waits_for_the_loan_to_come_back() {
    let (world, count) = (3, 3 * 720_000);
    let executors = |lend: bool| -> Vec<Executor> {
        (0..world)
            .map(|r| {
                let s = ring::schedule(Collective::AllReduce, r, world).unwrap();
                let layout = Layout { block_map: None, segment_bytes: 1 << 20, lend, post: false };
                Executor::with_layout(s, 4, DType::I32, ReduceOp::Sum, world, input(DType::I32, r, count), layout)
            })
            .collect()
    };
    let want = run(executors(false), &[]);
    let mut ex = executors(true);
    // Every message is kept, as a transport keeps frames until they are acknowledged; delivered
    // as a copy, so the delivery holds no loan.
    let mut kept = Vec::new();
    let mut queue: VecDeque<(usize, usize, Bytes)> = VecDeque::new();
    let mut drive = |ex: &mut Vec<Executor>, kept: &mut Vec<phalanx_proto::Payload>, keep: bool| loop {
        for (r, e) in ex.iter_mut().enumerate() {
            e.poll_loans();
            while let Some((to, m)) = e.poll_send() {
                queue.push_back((r, to, m.to_bytes()));
                if keep {
                    kept.push(m);
                }
            }
        }
        let Some((from, to, m)) = queue.pop_front() else { break };
        ex[to].handle_message(from, m).expect("a valid message");
    };
    drive(&mut ex, &mut kept, true);
    assert!(ex.iter().all(|e| !e.is_done() && e.waits_for_loans()), "stuck on loans while they are out");
    drop(std::mem::take(&mut kept));
    drive(&mut ex, &mut kept, false);
    assert!(ex.iter().all(|e| e.is_done()), "finished once the loans came back");
    let out: Vec<Vec<u8>> = ex.into_iter().map(|e| e.into_buffer()).collect();
    assert!(out == want, "the same result as without lending");
}

/// Lending and posting change how sends are made and where receives land, never what arrives:
/// every schedule family over a large buffer (where both apply), with lending on, and with
/// receives posted too, gives the same bits as without, in a random delivery order (a
/// broadcast's root lends one block to several children).
#[test]
fn every_schedule_gives_the_same_result_with_its_sends_lent_and_its_receives_posted() {
    type Family = fn(Collective, usize, usize) -> Option<Schedule>;
    let cases: [(Collective, Family, usize); 8] = [
        (Collective::AllReduce, ring::schedule, 5),
        (Collective::AllGather, ring::schedule, 5),
        (Collective::ReduceScatter, ring::schedule, 4),
        (Collective::AllReduce, halving_doubling::schedule, 4),
        (Collective::AllGather, halving_doubling::schedule, 4),
        (Collective::Broadcast { root: 1 }, tree::schedule, 5),
        (Collective::Reduce { root: 2 }, tree::schedule, 5),
        (Collective::AllReduce, |_, r, w| Some(halving_doubling::reduce_scatter_all_gather(r, w).unwrap()), 4),
    ];
    let count = 2_200_000; // f32: 8.8 MB, above the lending threshold
    let picks: Vec<usize> = (0..4000).map(|i| (i * 7919 + 13) % 1009).collect();
    for (collective, family, world) in cases {
        let executors = |lend: bool, post: bool| -> Vec<Executor> {
            (0..world)
                .map(|r| {
                    let s = family(collective, r, world).expect("a schedule");
                    let layout = Layout { block_map: None, segment_bytes: 1 << 20, lend, post };
                    let buf = input(DType::F32, r, count);
                    Executor::with_layout(s, 3, DType::F32, ReduceOp::Sum, world, buf, layout)
                })
                .collect()
        };
        if collective == Collective::AllReduce {
            // `Avg` divides the whole buffer at the end: it neither lends nor posts.
            let avg = |post: bool| -> Vec<Executor> {
                (0..world)
                    .map(|r| {
                        let s = family(collective, r, world).expect("a schedule");
                        let layout = Layout { block_map: None, segment_bytes: 1 << 20, lend: post, post };
                        let buf = input_for(DType::F32, ReduceOp::Avg, r, count);
                        Executor::with_layout(s, 3, DType::F32, ReduceOp::Avg, world, buf, layout)
                    })
                    .collect()
            };
            let (posted, in_place) = run_posted(avg(true), &picks);
            assert!(posted == run(avg(false), &picks) && in_place == 0, "{collective:?} over {world}: Avg");
        }
        let plain = run(executors(false, false), &picks);
        assert!(
            run(executors(true, false), &picks) == plain,
            "{collective:?} over {world}: lending changed the result"
        );
        let (posted, in_place) = run_posted(executors(true, true), &picks);
        assert!(posted == plain, "{collective:?} over {world}: posting changed the result");
        // A schedule that copies received blocks (which nothing writes again) has most of them
        // posted and filled; one that only reduces (recursive doubling, reduce-scatter,
        // reduce) has none.
        let copies = (0..world).any(|r| {
            let s = family(collective, r, world).expect("a schedule");
            s.rounds.iter().flat_map(|x| &x.recvs).any(|x| x.combine == Combine::Copy)
        });
        assert_eq!(in_place > 0, copies, "{collective:?} over {world}: {in_place} segments in place");
    }
}

#[test]
fn messages_from_another_collective_or_out_of_schedule_are_refused_without_effect() {
    let world = 3;
    let mut e = Executor::new(
        ring::schedule(Collective::AllReduce, 0, world).unwrap(),
        5,
        DType::I32,
        ReduceOp::Sum,
        world,
        input(DType::I32, 0, 6),
    );
    let before = e.buffer().to_vec();
    let msg = |seq: u64, round: u32, block: u32, len: usize| {
        let mut v = seq.to_le_bytes().to_vec();
        v.extend_from_slice(&round.to_le_bytes());
        v.extend_from_slice(&block.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes()); // segment
        v.extend(std::iter::repeat_n(1u8, len));
        Bytes::from(v)
    };
    assert!(e.handle_message(2, msg(4, 0, 1, 8)).is_err(), "older collective");
    assert!(e.handle_message(1, msg(5, 0, 1, 8)).is_err(), "rank 1 is not our ring predecessor");
    assert!(e.handle_message(2, msg(5, 0, 1, 3)).is_err(), "wrong length");
    assert!(e.handle_message(2, Bytes::from_static(b"short")).is_err(), "truncated");
    assert!(e.handle_message(2, msg(5, 99, 0, 8)).is_err(), "no such round");
    let mut seg9 = msg(5, 0, 1, 8).to_vec();
    seg9[16..20].copy_from_slice(&9u32.to_le_bytes());
    assert!(e.handle_message(2, Bytes::from(seg9)).is_err(), "no such segment");
    assert_eq!(e.buffer(), &before[..]);
    assert!(!e.is_done());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Ranges of blocks over a block map: the range's blocks lie scattered in the buffer, and
    /// segments (a few elements) straddle them. Recursive halving then doubling over the map
    /// must all-reduce exactly the mapped blocks and leave every other element alone.
    #[test]
    fn block_ranges_over_a_block_map_reduce_exactly_the_mapped_blocks(
        log_world in 0u32..=3,
        spare in 0usize..5,
        count in 0usize..200,
        order in proptest::collection::vec(any::<u32>(), 12),
        seg in prop_oneof![Just(4usize), Just(12), 13usize..40, Just(1 << 20)],
        picks in proptest::collection::vec(any::<usize>(), 0..300),
    ) {
        let world = 1usize << log_world;
        let space = world + spare;
        // A scattered injective map of the world's schedule blocks into the buffer's blocks.
        let mut all: Vec<usize> = (0..space).collect();
        all.sort_by_key(|b| order[*b % order.len()].wrapping_mul(*b as u32 + 1));
        let map: Vec<usize> = all[..world].to_vec();
        let dtype = DType::I64;
        let layout = || Layout { block_map: Some((space, map.clone())), segment_bytes: seg, lend: false, post: false };
        let phase = |ex: Vec<Executor>| run(ex, &picks);
        let rs = phase(
            (0..world)
                .map(|r| {
                    let s = halving_doubling::reduce_scatter(r, world).expect("power of two");
                    Executor::with_layout(s, 3, dtype, ReduceOp::Sum, world, input(dtype, r, count), layout())
                })
                .collect(),
        );
        let out = phase(
            rs.into_iter()
                .enumerate()
                .map(|(r, buf)| {
                    let s = halving_doubling::all_gather(r, world).expect("power of two");
                    Executor::with_layout(s, 4, dtype, ReduceOp::Sum, world, buf, layout())
                })
                .collect(),
        );
        let ranks: Vec<usize> = (0..world).collect();
        for (r, buf) in out.iter().enumerate() {
            for b in 0..space {
                for i in phalanx_collectives::schedule::block_range(count, space, b) {
                    let want = if map.contains(&b) {
                        reference::expected(dtype, ReduceOp::Sum, &ranks, count, i)
                    } else {
                        element_f64(dtype, &input(dtype, r, count), i)
                    };
                    prop_assert_eq!(element_f64(dtype, buf, i), want, "rank {} block {} element {}", r, b, i);
                }
            }
        }
    }
}

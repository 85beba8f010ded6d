//! Every operation × data type × reduction × world size 1..=16, in-process ranks over the
//! in-memory transport, with pseudo-random element counts (0, 1, primes, counts not divisible
//! by the world): results against the naive f64 reference of `phalanx_collectives::reference`;
//! integers exact, floats within its stated tolerance, and bit-identical across ranks wherever
//! every rank ends with the same buffer. The ranks sit in two data centres, so `Auto` and
//! `Hierarchical` all-reduces run the hierarchical schedule (the leader fallback when the
//! world is odd).

use std::time::Duration;

use bytes::Bytes;
use phalanx_collectives::reduce::{element_f64, DType, ReduceOp};
use phalanx_collectives::reference;
use phalanx_collectives::schedule::block_range;
use phalanx_net::{connect_mem, Node, NodeConfig, PathFaults};
use phalanx_node::{AllReduceAlgorithm, Communicator, Topology};
use phalanx_proto::RankId;

const DTYPES: [DType; 6] = [DType::F32, DType::F64, DType::F16, DType::BF16, DType::I32, DType::I64];
const OPS: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Min, ReduceOp::Max, ReduceOp::Prod];
const ALGORITHMS: [AllReduceAlgorithm; 5] = [
    AllReduceAlgorithm::Auto,
    AllReduceAlgorithm::Ring,
    AllReduceAlgorithm::RecursiveDoubling,
    AllReduceAlgorithm::HalvingDoubling,
    AllReduceAlgorithm::Hierarchical,
];
const DEADLINE: Duration = Duration::from_secs(60);

/// One collective call every rank makes.
#[derive(Clone, Debug)]
enum Case {
    AllReduce(DType, ReduceOp, AllReduceAlgorithm, usize),
    ReduceScatter(DType, ReduceOp, usize),
    Reduce(DType, ReduceOp, usize, usize),
    AllGather(DType, usize),
    Broadcast(DType, usize, usize),
    Barrier,
    AllToAll(Vec<usize>),
}

/// A small deterministic generator (xorshift), so every world draws the same kind of counts.
struct Counts(u64);

impl Counts {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        // Mostly small, sometimes 0, 1 or a prime above the world size.
        match self.0 % 8 {
            0 => 0,
            1 => 1,
            2 => 97,
            _ => (self.0 >> 8) as usize % 300,
        }
    }
}

fn cases(world: usize) -> Vec<Case> {
    let mut c = Counts(0x9E37_79B9_7F4A_7C15 ^ world as u64);
    let mut out = Vec::new();
    for (k, dtype) in DTYPES.into_iter().enumerate() {
        for (j, op) in OPS.into_iter().enumerate() {
            out.push(Case::AllReduce(dtype, op, ALGORITHMS[(k + j) % ALGORITHMS.len()], c.next()));
            out.push(Case::ReduceScatter(dtype, op, c.next()));
            out.push(Case::Reduce(dtype, op, (k + j) % world, c.next()));
        }
        out.push(Case::AllGather(dtype, c.next()));
        out.push(Case::Broadcast(dtype, k % world, c.next()));
    }
    out.push(Case::Barrier);
    out.push(Case::AllToAll((0..world * world).map(|_| c.next()).collect()));
    out
}

fn payload(src: usize, dst: usize, len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (src * 31 + dst * 7 + i) as u8).collect::<Vec<u8>>())
}

/// This rank's block of the all-gather input; the rest zero.
fn gather_input(dtype: DType, rank: usize, world: usize, count: usize) -> Vec<u8> {
    let full = reference::input(dtype, ReduceOp::Sum, rank, count);
    let mut b = vec![0u8; full.len()];
    let r = block_range(count, world, rank);
    let s = dtype.size();
    b[r.start * s..r.end * s].copy_from_slice(&full[r.start * s..r.end * s]);
    b
}

/// Runs every case on rank `rank`; returns each case's buffer (all-to-all: the concatenation
/// of what arrived, which is checked here).
async fn rank_run(mut c: Communicator, world: usize, cases: Vec<Case>) -> (Vec<Vec<u8>>, Communicator) {
    let rank = c.rank();
    let mut out = Vec::new();
    for case in cases {
        let what = format!("world {world}, rank {rank}, {case:?}");
        let buf = match case {
            Case::AllReduce(dtype, op, algo, n) => {
                c.all_reduce(reference::input(dtype, op, rank, n), dtype, op, algo, DEADLINE).await
            }
            Case::ReduceScatter(dtype, op, n) => {
                c.reduce_scatter(reference::input(dtype, op, rank, n), dtype, op, DEADLINE).await
            }
            Case::Reduce(dtype, op, root, n) => {
                c.reduce(reference::input(dtype, op, rank, n), dtype, op, root, DEADLINE).await
            }
            Case::AllGather(dtype, n) => c.all_gather(gather_input(dtype, rank, world, n), dtype, DEADLINE).await,
            Case::Broadcast(dtype, root, n) => {
                let b = if rank == root {
                    reference::input(dtype, ReduceOp::Sum, root, n)
                } else {
                    vec![0u8; n * dtype.size()]
                };
                c.broadcast(b, root, DEADLINE).await
            }
            Case::Barrier => c.barrier(DEADLINE).await.map(|_| Vec::new()),
            Case::AllToAll(sizes) => {
                let send = (0..world).map(|d| payload(rank, d, sizes[rank * world + d])).collect();
                let got = c.all_to_all(send, DEADLINE).await.unwrap_or_else(|e| panic!("{what}: {e}"));
                for (s, b) in got.iter().enumerate() {
                    assert_eq!(b, &payload(s, rank, sizes[s * world + rank]), "{what}: from {s}");
                }
                Ok(got.concat())
            }
        };
        out.push(buf.unwrap_or_else(|e| panic!("{what}: {e}")));
    }
    // The communicator is kept alive until every rank is done (a closed node is a lost rank).
    (out, c)
}

fn check_elements(what: &str, dtype: DType, got: &[u8], range: std::ops::Range<usize>, want: impl Fn(usize) -> f64) {
    for i in range {
        let (g, w) = (element_f64(dtype, got, i), want(i));
        assert!(reference::close(dtype, g, w), "{what}: element {i} is {g}, want {w}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_dtype_and_world_up_to_16_agrees_with_the_reference() {
    for world in 1..=16usize {
        let mut nodes = Vec::new();
        for r in 0..world {
            nodes.push(Node::start(NodeConfig::new(RankId(r as u32), b"every-op".to_vec())).await.unwrap());
        }
        for a in 0..world {
            for b in a + 1..world {
                connect_mem(&nodes[a].handle(), &nodes[b].handle(), PathFaults::new()).await.unwrap();
            }
        }
        // Two data centres: the lower and the upper half.
        let topology = Topology::new((0..world).map(|r| r * 2 / world).collect());
        let cases = cases(world);
        let tasks: Vec<_> = nodes
            .into_iter()
            .enumerate()
            .map(|(r, n)| {
                tokio::spawn(rank_run(Communicator::with_topology(n, r, topology.clone()), world, cases.clone()))
            })
            .collect();
        let mut results = Vec::new();
        let mut keep = Vec::new();
        for t in tasks {
            let (r, comm) = t.await.unwrap();
            results.push(r);
            keep.push(comm);
        }
        let all: Vec<usize> = (0..world).collect();
        for (k, case) in cases.iter().enumerate() {
            let what = format!("world {world}, {case:?}");
            let same_everywhere = || {
                for r in 1..world {
                    assert_eq!(results[r][k], results[0][k], "{what}: rank {r} differs bitwise from rank 0");
                }
            };
            match *case {
                Case::AllReduce(dtype, op, _, n) => {
                    same_everywhere();
                    check_elements(&what, dtype, &results[0][k], 0..n, |i| reference::expected(dtype, op, &all, n, i));
                }
                Case::ReduceScatter(dtype, op, n) => {
                    for (r, res) in results.iter().enumerate() {
                        check_elements(&what, dtype, &res[k], block_range(n, world, r), |i| {
                            reference::expected(dtype, op, &all, n, i)
                        });
                    }
                }
                Case::Reduce(dtype, op, root, n) => {
                    check_elements(&what, dtype, &results[root][k], 0..n, |i| {
                        reference::expected(dtype, op, &all, n, i)
                    });
                }
                Case::AllGather(dtype, n) => {
                    same_everywhere();
                    check_elements(&what, dtype, &results[0][k], 0..n, |i| {
                        element_f64(
                            dtype,
                            &reference::input(
                                dtype,
                                ReduceOp::Sum,
                                (0..world).find(|p| block_range(n, world, *p).contains(&i)).unwrap(),
                                n,
                            ),
                            i,
                        )
                    });
                }
                Case::Broadcast(dtype, root, n) => {
                    same_everywhere();
                    assert_eq!(results[0][k], reference::input(dtype, ReduceOp::Sum, root, n), "{what}");
                }
                Case::Barrier | Case::AllToAll(_) => {}
            }
        }
    }
}

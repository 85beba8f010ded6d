//! DESIGN.md's seam test: one collective function — the sans-IO `Group` with its schedules,
//! pipelined executor and reduction kernels — runs unchanged under the tokio driver (the
//! `Communicator` over the in-memory transport) and under the simulator's virtual-time driver,
//! and both leave every rank with bit-identical results. Float sums depend on the order of
//! reduction, so equality means the same program ran, not merely a correct one.

use std::time::Duration;

use phalanx_collectives::group::{AllReduceAlgorithm, CallOptions, Finished, Op};
use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_net::{connect_mem, Node, NodeConfig, PathFaults};
use phalanx_node::{Communicator, Topology};
use phalanx_proto::RankId;
use phalanx_sim::scenario::TopologySpec;

const DCS: usize = 2;
const PER_DC: usize = 3;

/// Rank `r`'s input: f32 values with fractions, so that the reduction order shows in the bits.
fn input(r: usize, count: usize) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ (r as u64 + 1);
    (0..count)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / 3.7e3 - 1.1e3).to_le_bytes()
        })
        .collect()
}

fn simulated(op: Op, count: usize) -> Vec<Vec<u8>> {
    let topology = TopologySpec {
        dcs: DCS,
        hosts_per_dc: PER_DC,
        ranks_per_host: 1,
        nics_per_host: 1,
        nic_gbit_s: 100.0,
        host_gbit_s: 1000.0,
        host_latency_us: 1.0,
        dc_latency_us: 5.0,
        wan_gbit_s: 10.0,
        wan_latency_ms: 5.0,
        rank_gbyte_s: None,
        rank_work: None,
    };
    let world = DCS * PER_DC;
    let inputs = (0..world).map(|r| input(r, count)).collect();
    let (results, _) = phalanx_sim::run_collective(&topology, op, DType::F32, inputs, CallOptions::default());
    results
        .into_iter()
        .enumerate()
        .map(|(r, f)| match f {
            Some(Finished::Buffer { data, .. }) => data,
            other => panic!("simulated rank {r}: {other:?}"),
        })
        .collect()
}

async fn real(op: Op, count: usize) -> Vec<Vec<u8>> {
    let world = DCS * PER_DC;
    let mut nodes = Vec::new();
    for r in 0..world {
        nodes.push(Node::start(NodeConfig::new(RankId(r as u32), b"seam".to_vec())).await.expect("node"));
    }
    for a in 0..world {
        for b in a + 1..world {
            connect_mem(&nodes[a].handle(), &nodes[b].handle(), PathFaults::new()).await.expect("connect");
        }
    }
    let topology = Topology::uniform(DCS, PER_DC);
    let Op::AllReduce { algorithm, op: rop } = op else { panic!("all-reduce only") };
    let tasks: Vec<_> = nodes
        .into_iter()
        .enumerate()
        .map(|(r, n)| {
            let topology = topology.clone();
            tokio::spawn(async move {
                let mut c = Communicator::with_topology(n, r, topology);
                let out = c.all_reduce(input(r, count), DType::F32, rop, algorithm, Duration::from_secs(60)).await;
                (out.expect("all-reduce"), c)
            })
        })
        .collect();
    let mut out = Vec::new();
    let mut keep = Vec::new();
    for t in tasks {
        let (data, c) = t.await.expect("rank task");
        out.push(data);
        keep.push(c);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_group_code_gives_bit_identical_results_under_tokio_and_under_the_simulator() {
    for algorithm in [AllReduceAlgorithm::Ring, AllReduceAlgorithm::RecursiveDoubling, AllReduceAlgorithm::Hierarchical]
    {
        // 300 000 elements: blocks span several 1 MiB segments (pipelining on both sides).
        for count in [1, 997, 300_000] {
            let op = Op::AllReduce { algorithm, op: ReduceOp::Sum };
            let sim = simulated(op, count);
            let tokio = real(op, count).await;
            for r in 0..sim.len() {
                assert_eq!(sim[r].len(), count * 4);
                assert!(sim[r] == tokio[r], "{algorithm:?}, {count} elements: rank {r} differs between the drivers");
                assert!(sim[r] == sim[0], "{algorithm:?}: ranks agree");
            }
        }
    }
}

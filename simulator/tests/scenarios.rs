//! The simulator end to end: the example scenarios (short versions), determinism, a chaos sweep
//! over seeds and fault kinds with real payloads, the α-β accuracy check, and one test per
//! fault kind showing the fault's effect.

use std::path::PathBuf;

use phalanx_sim::scenario::{FaultKind, FaultSpec, PayloadKind, PolicyKind};
use phalanx_sim::{run, Report, RunOptions, Scenario};
use rand::{Rng, SeedableRng};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/scenarios")
}

/// An example, cut down to run in a second or two in a debug build.
fn short(name: &str) -> Scenario {
    let mut s = Scenario::load(&examples().join(format!("{name}.toml"))).expect("example parses");
    s.workload.steps = s.workload.steps.min(6);
    // A semi-synchronous run counts its progress in outer rounds: make them short.
    s.workload.outer_every = s.workload.outer_every.map(|h| h.min(3));
    let t = &mut s.topology;
    if t.ranks() > 64 {
        t.hosts_per_dc = 4;
        for f in &mut s.faults {
            f.host = f.host.map(|h| h % t.hosts());
            f.rank = f.rank.map(|r| r % t.ranks());
        }
    }
    s
}

fn sim(s: &Scenario, seed: u64) -> Report {
    run(s, seed, &RunOptions::default()).report
}

fn assert_clean(r: &Report, what: &str) {
    assert!(r.clean(), "{what}: {}", r.summary());
    assert_eq!(r.collectives.hung, 0);
}

#[test]
fn every_example_parses_runs_clean_and_replays_to_the_same_trace_hash() {
    let mut names: Vec<String> = std::fs::read_dir(examples())
        .expect("examples/scenarios")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().trim_end_matches(".toml").to_string())
        .collect();
    names.sort();
    assert!(names.len() >= 5, "at least five examples: {names:?}");
    for name in names {
        let s = short(&name);
        let a = sim(&s, s.seed);
        let b = sim(&s, s.seed);
        assert_clean(&a, &name);
        assert_eq!(a.trace_hash, b.trace_hash, "{name}: same seed, same events");
        assert_eq!((a.events, a.sim_time_s), (b.events, b.sim_time_s), "{name}");
        assert!(a.steps_completed > 0, "{name}: made progress");
    }
}

#[test]
fn a_different_seed_gives_a_different_run_where_faults_are_random() {
    let mut s = short("stragglers");
    s.faults.push(FaultSpec { mtbf_s: Some(20.0), duration_s: Some(0.2), ..fault(FaultKind::Straggler) });
    s.faults.last_mut().expect("pushed").fraction = Some(0.1);
    s.faults.last_mut().expect("pushed").slowdown = Some(3.0);
    let a = sim(&s, 1);
    let b = sim(&s, 2);
    assert_ne!(a.trace_hash, b.trace_hash);
    assert_eq!(a.trace_hash, sim(&s, 1).trace_hash);
}

fn fault(kind: FaultKind) -> FaultSpec {
    FaultSpec::new(kind)
}

/// A small two- or three-DC job with real payloads whose faults and policy come from `seed`;
/// with `flow_level`, half of those that can shrink also get membership and its faults, and a
/// third of all train semi-synchronously (neither runs at frame level yet).
fn chaos_scenario(seed: u64, flow_level: bool) -> String {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dcs = rng.random_range(2..=3);
    let policy = ["shrink", "quorum", "abort"][rng.random_range(0..3)];
    let algorithm = ["auto", "ring", "hierarchical", "recursive_doubling", "halving_doubling"][rng.random_range(0..5)];
    let ranks = dcs * 2 * 2;
    let mut text = format!(
        r#"name = "chaos-{seed}"
seed = {seed}
duration_s = 60
[topology]
dcs = {dcs}
hosts_per_dc = 2
ranks_per_host = 2
nics_per_host = 2
nic_gbit_s = 100
wan_gbit_s = 20
wan_latency_ms = 2
[transport]
link_timeout_ms = 50
unreachable_after_ms = 200
[workload]
kind = "data_parallel"
bytes = "{bytes}"
steps = 12
payload = "real"
policy = "{policy}"
algorithm = "{algorithm}"
quorum_min = {quorum}
quorum_wait_ms = 15
deadline_ms = 2000
segment_bytes = "16KiB"
compute = {{ median_ms = 20, sigma = 0.4 }}
"#,
        bytes = [8 << 10, 40 << 10, 96 << 10][rng.random_range(0..3)],
        quorum = ranks / 2 + 1,
    );
    for _ in 0..rng.random_range(2..=5) {
        let at = rng.random_range(0.0..0.3);
        let dur = rng.random_range(0.02..0.5);
        let host = rng.random_range(0..dcs * 2);
        let a = rng.random_range(0..dcs);
        let b = (a + 1 + rng.random_range(0..dcs - 1)) % dcs;
        let f = match rng.random_range(0..8) {
            0 => format!("kind = \"crash\"\nrank = {}", rng.random_range(0..ranks)),
            1 => format!("kind = \"link_down\"\ndcs = [{a}, {b}]\nduration_s = {dur}"),
            2 => format!("kind = \"nic_down\"\nhost = {host}\nnic = {}\nduration_s = {dur}", rng.random_range(0..2)),
            3 => format!("kind = \"partition\"\nhosts = [{host}]\nduration_s = {dur}"),
            4 => format!("kind = \"loss\"\nhost = {host}\nrate = 0.2\nduration_s = {dur}"),
            5 => format!("kind = \"latency_spike\"\ndcs = [{a}, {b}]\nextra_ms = 30\nduration_s = {dur}"),
            6 => format!(
                "kind = \"straggler\"\nranks = [{}]\nslowdown = 5.0\nduration_s = {dur}",
                rng.random_range(0..ranks)
            ),
            _ => format!("kind = \"corruption\"\nhost = {host}\nrate = 0.3\nduration_s = {dur}"),
        };
        text.push_str(&format!("\n[[faults]]\nat_s = {at}\n{f}\n"));
    }
    // Half the jobs that can shrink run with elastic membership: coordinators that crash, and a
    // rank killed and restarted that must be readmitted.
    if flow_level && policy != "abort" && rng.random_bool(0.5) {
        let coordinators = [1, 3, 5][rng.random_range(0..3)];
        text.push_str(&format!(
            "\n[membership]\ncoordinators = {coordinators}\ntick_ms = 10\nboundary_every = 3\nstate_bytes = \"4MiB\"\n\
             client_retry_ms = 60\n"
        ));
        for _ in 0..rng.random_range(1..=2) {
            let at = rng.random_range(0.0..0.4);
            let f = if rng.random_bool(0.5) {
                format!(
                    "kind = \"crash\"\nrank = {}\nrestart_after_s = {}",
                    rng.random_range(0..ranks),
                    rng.random_range(0.05..0.5)
                )
            } else {
                format!("kind = \"coordinator_crash\"\nduration_s = {}", rng.random_range(0.05..1.0))
            };
            text.push_str(&format!("\n[[faults]]\nat_s = {at}\n{f}\n"));
        }
    }
    // A third of the jobs train semi-synchronously (the real protocol: in-DC gradient rounds,
    // the leaders' outer rounds and heals, realignments), with or without membership.
    if flow_level && rng.random_bool(1.0 / 3.0) {
        let fragments = [1, 3][rng.random_range(0..2)];
        let semisync = format!(
            "kind = \"semisync\"\nouter_every = 3\nouter_fragments = {fragments}\nouter_bytes = \"24KiB\"\nheal_every = 2"
        );
        text = text.replace("kind = \"data_parallel\"", &semisync);
    }
    text
}

#[test]
fn chaos_sweep_nothing_hangs_nothing_is_wrong_nothing_is_lost() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let mut kinds = std::collections::BTreeMap::new();
    let (mut elastic, mut readmitted, mut epochs, mut semisync) = (0, 0, 0, 0);
    for seed in 1..=50u64 {
        let text = chaos_scenario(seed, true);
        let file = dir.join(format!("chaos-{seed}.toml"));
        let s = Scenario::parse(&file.display().to_string(), &text).expect("generated scenarios are valid");
        let r = sim(&s, seed);
        if !r.clean() || r.steps_completed == 0 && s.workload.policy != PolicyKind::Abort {
            std::fs::write(&file, &text).expect("write the failing scenario");
            panic!("seed {seed} failed; replay: phalanx sim {} --seed {seed}\n{}", file.display(), r.summary());
        }
        for (k, n) in r.faults_injected {
            *kinds.entry(k).or_insert(0u64) += n;
        }
        semisync += u32::from(r.semisync.is_some());
        if let Some(m) = &r.membership {
            elastic += 1;
            readmitted += m.ranks_readmitted;
            epochs += m.epochs - 1;
        }
    }
    assert!(kinds.len() >= 9, "every fault kind was injected: {kinds:?}");
    assert!(semisync >= 10, "{semisync} semi-synchronous runs");
    assert!(
        elastic >= 5 && readmitted > 0 && epochs > 0,
        "{elastic} elastic runs, {readmitted} readmitted, {epochs} epochs"
    );
}

/// One rank per host, one DC, ring all-reduce: the α-β model's own setting.
fn alpha_beta_scenario(n: usize, bytes: u64, alpha_us: f64, gbit: f64) -> Scenario {
    let text = format!(
        r#"name = "alpha-beta"
[topology]
hosts_per_dc = {n}
nic_gbit_s = {gbit}
dc_latency_us = {alpha_us}
[workload]
kind = "collective_loop"
bytes = {bytes}
steps = 1
payload = "phantom"
algorithm = "ring"
segment_bytes = {bytes}
"#
    );
    Scenario::parse("alpha-beta", &text).expect("valid")
}

#[test]
fn healthy_ring_all_reduce_takes_what_the_alpha_beta_formula_says() {
    for (n, bytes, alpha_us, gbit) in
        [(8usize, 64u64 << 20, 5.0, 100.0), (16, 1 << 30, 20.0, 400.0), (4, 1 << 20, 2.0, 25.0)]
    {
        let r = sim(&alpha_beta_scenario(n, bytes, alpha_us, gbit), 1);
        let (alpha, beta) = (alpha_us * 1e-6, gbit * 1e9 / 8.0);
        let formula = 2.0 * (n as f64 - 1.0) * (alpha + bytes as f64 / (n as f64 * beta));
        let err = (r.sim_time_s - formula).abs() / formula;
        assert!(
            err < 0.02,
            "n {n}, {bytes} B: simulated {} s, formula {formula} s ({:.2}%)",
            r.sim_time_s,
            err * 100.0
        );
    }
}

#[test]
fn a_per_rank_processing_rate_adds_its_time_to_every_step() {
    // Segments are whole blocks, so each ring step is: send (S/nβ), latency (α), then the
    // receiver processes the block (S/(n·r)) before it can forward it.
    let (n, bytes, alpha_us, gbit, rate) = (8usize, 64u64 << 20, 5.0, 100.0, 4.0);
    let mut s = alpha_beta_scenario(n, bytes, alpha_us, gbit);
    s.topology.rank_gbyte_s = Some(rate);
    let r = sim(&s, 1);
    let (alpha, beta, block) = (alpha_us * 1e-6, gbit * 1e9 / 8.0, bytes as f64 / n as f64);
    let formula = 2.0 * (n as f64 - 1.0) * (alpha + block / beta + block / (rate * 1e9));
    let err = (r.sim_time_s - formula).abs() / formula;
    assert!(err < 0.01, "simulated {} s, formula {formula} s", r.sim_time_s);
}

#[test]
fn processing_on_the_host_link_competes_with_the_transfers() {
    // Two ranks on one host (link capacity C), ring all-reduce of S in whole-block messages:
    // each step both transfers share C (S/2 each: S/C), then both ranks process S/2·w sharing
    // C (S·w/C), plus the latency α: two steps of S/C·(1 + w) + α.
    let (bytes, c_gbit, alpha_us, w) = (64u64 << 20, 16.0, 100.0, 0.5);
    let text = format!(
        "name = \"w\"\n[topology]\nhosts_per_dc = 1\nranks_per_host = 2\nnic_gbit_s = 1\nhost_gbit_s = {c_gbit}\n\
         host_latency_us = {alpha_us}\nrank_work = {w}\n[workload]\nkind = \"collective_loop\"\nbytes = {bytes}\n\
         steps = 1\npayload = \"phantom\"\nalgorithm = \"ring\"\nsegment_bytes = {bytes}\n"
    );
    let r = sim(&Scenario::parse("w", &text).expect("valid"), 1);
    let c = c_gbit * 1e9 / 8.0;
    let formula = 2.0 * (bytes as f64 / c * (1.0 + w) + alpha_us * 1e-6);
    assert!((r.sim_time_s - formula).abs() / formula < 0.01, "simulated {} s, formula {formula} s", r.sim_time_s);
}

fn base(policy: &str, dcs: usize) -> Scenario {
    let text = format!(
        r#"name = "kind"
[topology]
dcs = {dcs}
hosts_per_dc = 2
ranks_per_host = 2
nics_per_host = 2
nic_gbit_s = 10
wan_gbit_s = 10
wan_latency_ms = 1
[transport]
link_timeout_ms = 50
unreachable_after_ms = 300
[workload]
kind = "data_parallel"
bytes = "256KiB"
steps = 10
payload = "real"
policy = "{policy}"
deadline_ms = 5000
compute = {{ median_ms = 50 }}
"#
    );
    Scenario::parse("kind", &text).expect("valid")
}

fn with(mut s: Scenario, f: FaultSpec) -> Scenario {
    s.faults.push(f);
    s
}

#[test]
fn a_wan_link_down_is_relayed_through_a_third_dc_and_costs_only_time() {
    let s = base("abort", 3);
    let healthy = sim(&s, 1);
    let f = FaultSpec { at_s: Some(0.0), dcs: Some(vec![0, 1]), ..fault(FaultKind::LinkDown) };
    let r = sim(&with(s, f), 1);
    assert_clean(&r, "link down");
    assert!(r.network.relayed_messages > 0);
    assert_eq!((r.collectives.completed, r.contributions.dropped_reported), (10, 0), "no rank was lost");
    assert!(r.sim_time_s > healthy.sim_time_s);
}

#[test]
fn a_nic_down_leaves_the_other_nic_and_a_partition_past_the_timeout_loses_the_ranks() {
    let s = base("shrink", 1);
    let healthy = sim(&s, 1);
    let nic = FaultSpec { at_s: Some(0.0), host: Some(1), nic: Some(0), ..fault(FaultKind::NicDown) };
    let r = sim(&with(s.clone(), nic), 1);
    assert_clean(&r, "nic down");
    assert_eq!(r.steps.iter().map(|p| p.participants).min(), Some(4), "nobody lost");
    assert!(r.sim_time_s > healthy.sim_time_s, "half the NIC bandwidth of host 1");
    let cut = FaultSpec { at_s: Some(0.1), hosts: Some(vec![1]), ..fault(FaultKind::Partition) };
    let r = sim(&with(s, cut), 1);
    assert_clean(&r, "partition");
    // Host 1 (ranks 2, 3) is cut off for good: after `unreachable_after` each side goes on
    // alone (no membership quorum yet: both sides keep running, see docs/simulator.md).
    let sizes: std::collections::BTreeSet<usize> = r.steps.iter().map(|p| p.participants).collect();
    assert!(sizes.contains(&2), "a step over the side that was cut off or the rest: {sizes:?}");
}

#[test]
fn loss_and_latency_spikes_slow_steps_down_and_lose_nothing() {
    let s = base("abort", 2);
    let healthy = sim(&s, 1);
    let loss = FaultSpec { at_s: Some(0.0), host: Some(0), rate: Some(0.5), ..fault(FaultKind::Loss) };
    let spike =
        FaultSpec { at_s: Some(0.0), dcs: Some(vec![0, 1]), extra_ms: Some(20.0), ..fault(FaultKind::LatencySpike) };
    for (what, f) in [("loss", loss), ("latency", spike)] {
        let r = sim(&with(s.clone(), f), 1);
        assert_clean(&r, what);
        assert_eq!(r.collectives.completed, 10, "{what}");
        assert!(r.sim_time_s > healthy.sim_time_s, "{what}: {} vs {}", r.sim_time_s, healthy.sim_time_s);
    }
}

#[test]
fn a_crash_under_shrink_is_survived_and_under_restart_rolls_back_to_the_checkpoint() {
    let crash = FaultSpec { at_s: Some(0.22), rank: Some(3), ..fault(FaultKind::Crash) };
    let r = sim(&with(base("shrink", 1), crash.clone()), 1);
    assert_clean(&r, "crash, shrink");
    assert_eq!(r.steps_completed, 10);
    assert_eq!(r.steps.last().map(|p| p.participants), Some(3));
    let mut s = with(base("abort", 1), crash);
    s.workload.on_failure = phalanx_sim::scenario::OnFailure::Restart;
    s.workload.checkpoint_every = 2;
    s.workload.restart_s = 1.0;
    let r = sim(&s, 1);
    assert_clean(&r, "crash, restart");
    assert_eq!(r.steps_completed, 10, "the job finishes after the restart");
    assert!(r.contributions.dropped_reported > 0, "the interrupted step's contributions are reported dropped");
    assert!(r.sim_time_s > 1.0 + 0.5, "the restart took its time");
    assert_eq!(r.steps.last().map(|p| p.participants), Some(4), "a spare replaced the dead rank");
}

#[test]
fn stragglers_under_a_quorum_come_back_late_and_are_folded_in() {
    let mut s = base("quorum", 1);
    s.workload.quorum_min = Some(3);
    s.workload.quorum_wait_ms = 5.0;
    let f = FaultSpec { at_s: Some(0.0), ranks: Some(vec![2]), slowdown: Some(3.0), ..fault(FaultKind::Straggler) };
    let r = sim(&with(s, f), 1);
    assert_clean(&r, "straggler");
    assert!(r.contributions.late > 0);
    assert_eq!(r.contributions.offered, 40);
    assert_eq!(
        r.contributions.applied + r.contributions.pending,
        40,
        "late ones are applied later: {:?}",
        r.contributions
    );
}

#[test]
fn corrupted_frames_are_caught_and_resent_and_results_stay_right() {
    let s = base("abort", 1);
    let f = FaultSpec { at_s: Some(0.0), host: Some(0), rate: Some(0.5), ..fault(FaultKind::Corruption) };
    let r = sim(&with(s, f), 1);
    assert_clean(&r, "corruption");
    assert!(r.network.corrupted_frames > 0 && r.network.retransmitted_bytes > 0);
    assert_eq!(r.collectives.completed, 10);
}

#[test]
fn phantom_and_real_payloads_take_the_same_simulated_time() {
    let mut real = base("shrink", 2);
    let crash = FaultSpec { at_s: Some(0.12), rank: Some(5), ..fault(FaultKind::Crash) };
    real.faults.push(crash);
    let mut phantom = real.clone();
    phantom.workload.payload = PayloadKind::Phantom;
    let (a, b) = (sim(&real, 3), sim(&phantom, 3));
    assert_eq!((a.sim_time_s, a.events, a.trace_hash.clone()), (b.sim_time_s, b.events, b.trace_hash.clone()));
}

#[test]
fn fast_forward_repeats_quiet_steps_and_agrees_with_simulating_every_step() {
    for restart in [false, true] {
        let mut s = base(if restart { "abort" } else { "shrink" }, 2);
        s.workload.steps = 80;
        s.faults.push(FaultSpec { at_s: Some(2.0), rank: Some(3), ..fault(FaultKind::Crash) });
        if restart {
            s.workload.on_failure = phalanx_sim::scenario::OnFailure::Restart;
            s.workload.checkpoint_every = 7;
            s.workload.restart_s = 1.0;
        }
        let full = sim(&s, 1);
        s.workload.fast_forward = true;
        let ff = sim(&s, 1);
        let what = if restart { "restart" } else { "shrink" };
        assert_clean(&ff, what);
        assert_eq!(ff.trace_hash, sim(&s, 1).trace_hash, "{what}: deterministic");
        assert_eq!(full.fast_forwarded_steps, 0);
        assert!(ff.fast_forwarded_steps >= 40, "{what}: {} steps skipped", ff.fast_forwarded_steps);
        assert!(ff.events * 2 < full.events, "{what}: {} events vs {}", ff.events, full.events);
        // The same run, told faster: equal steps and contributions; time, goodput and bytes
        // within a fraction of a percent (every step here is alike; compute has no spread).
        assert_eq!(ff.steps_completed, full.steps_completed, "{what}");
        assert_eq!(ff.steps.len(), full.steps.len(), "{what}: a point per committed step");
        assert_eq!(ff.contributions.offered, full.contributions.offered, "{what}");
        assert_eq!(ff.contributions.applied, full.contributions.applied, "{what}");
        let close = |a: f64, b: f64| (a - b).abs() <= 0.002 * b.abs();
        assert!(close(ff.sim_time_s, full.sim_time_s), "{what}: {} vs {}", ff.sim_time_s, full.sim_time_s);
        assert!(close(ff.goodput, full.goodput), "{what}: goodput {} vs {}", ff.goodput, full.goodput);
        assert!(close(ff.network.bytes as f64, full.network.bytes as f64), "{what}: bytes");
    }
}

/// The fleet-reliability examples, cut down: 64 ranks for four hours at three times Llama 3's
/// interruption rate per GPU scaled to the fleet (a handful of crashes either way).
fn fleet(which: &str) -> Scenario {
    let mut s = Scenario::load(&examples().join(format!("fleet-llama3-day-{which}.toml"))).expect("example parses");
    let full = s.topology.ranks() as f64;
    s.topology.hosts_per_dc = 4;
    let scale = s.topology.ranks() as f64 / full / 3.0;
    s.duration_s = 4.0 * 3600.0;
    for f in &mut s.faults {
        f.mtbf_s = f.mtbf_s.map(|m| m * scale);
    }
    s
}

#[test]
fn at_the_same_failures_shrinking_keeps_more_goodput_than_restarting_from_a_checkpoint() {
    let (shrink, restart) = (sim(&fleet("shrink"), 7), sim(&fleet("restart"), 7));
    for (r, what) in [(&shrink, "shrink"), (&restart, "restart")] {
        assert_clean(r, what);
        assert!(r.fast_forwarded_steps > r.steps.len() as u64 / 2, "{what}: mostly fast-forwarded");
    }
    let crashes = |r: &Report| r.faults_injected.get("crash").copied().unwrap_or(0);
    assert!(crashes(&shrink) >= 2 && crashes(&shrink) == crashes(&restart), "same draws: {}", crashes(&shrink));
    assert_eq!(shrink.collectives.failed, 0, "shrink: no step fails");
    // A crash fails the running step, unless it comes while the job is down restarting.
    let failed = restart.collectives.failed;
    assert!(failed >= 1 && failed <= crashes(&restart), "restart: {failed} failed steps");
    assert!(shrink.goodput > restart.goodput + 0.02, "shrink {:.4} vs restart {:.4}", shrink.goodput, restart.goodput);
    assert!(shrink.steps_completed > restart.steps_completed);
}

/// `base` at frame level: every rank's real transport endpoint carries the collectives.
fn frames(policy: &str, dcs: usize) -> Scenario {
    let mut s = base(policy, dcs);
    s.transport.frames = true;
    s.transport.link_timeout_ms = 200.0;
    s.transport.unreachable_after_ms = 600.0;
    s
}

#[test]
fn at_frame_level_the_real_transport_carries_the_collectives_as_fast_as_the_message_model_says() {
    let s = frames("abort", 2);
    let r = sim(&s, 1);
    assert_clean(&r, "frames, healthy");
    assert_eq!(r.collectives.completed, 10);
    let f = r.frames.expect("frame level");
    assert!(f.frames > 0 && f.dropped == 0 && f.retransmits == 0, "{f:?}");
    assert_eq!(r.trace_hash, sim(&s, 1).trace_hash, "deterministic");
    let m = sim(&base("abort", 2), 1);
    eprintln!("frames {} s, messages {} s, {f:?}", r.sim_time_s, m.sim_time_s);
    assert!(
        (r.sim_time_s / m.sim_time_s - 1.0).abs() < 0.1,
        "frames {} s vs messages {} s",
        r.sim_time_s,
        m.sim_time_s
    );
}

#[test]
fn at_frame_level_the_transport_fails_over_relays_resends_and_reports_a_dead_rank_itself() {
    // A NIC dies: its links go silent, the endpoints declare them dead and move their frames
    // to the other NIC's links; nobody is lost.
    let nic = FaultSpec { at_s: Some(0.1), host: Some(1), nic: Some(0), ..fault(FaultKind::NicDown) };
    let r = sim(&with(frames("shrink", 1), nic), 1);
    assert_clean(&r, "frames, nic down");
    let f = r.frames.expect("frame level");
    assert!(f.links_failed > 0 && f.failovers > 0 && f.dropped > 0, "{f:?}");
    assert_eq!((r.collectives.completed, r.steps.iter().map(|p| p.participants).min()), (10, Some(4)));
    // A WAN link dies between two of three data centres: the endpoints relay through a rank
    // of the third.
    let wan = FaultSpec { at_s: Some(0.1), dcs: Some(vec![0, 1]), ..fault(FaultKind::LinkDown) };
    let r = sim(&with(frames("abort", 3), wan), 1);
    assert_clean(&r, "frames, wan down");
    let f = r.frames.expect("frame level");
    assert!(f.relayed_bytes > 0, "{f:?}");
    assert_eq!(r.collectives.completed, 10);
    // Corruption and loss: frames resent, results exact (a lost frame waits for its
    // retransmission timeout, at least `min_rto` = 400 ms, so loss is kept light).
    for (what, kind, rate) in [("corruption", FaultKind::Corruption, 0.3), ("loss", FaultKind::Loss, 0.02)] {
        let bad = FaultSpec { at_s: Some(0.0), host: Some(0), rate: Some(rate), ..fault(kind) };
        let r = sim(&with(frames("abort", 1), bad), 1);
        assert_clean(&r, what);
        let f = r.frames.expect("frame level");
        assert!(f.retransmits > 0, "{what}: {f:?}");
        assert!(if kind == FaultKind::Loss { f.dropped > 0 } else { f.corrupted > 0 }, "{what}: {f:?}");
        assert_eq!(r.collectives.completed, 10, "{what}");
    }
    // A rank crashes: its peers' endpoints hear nothing more and report it unreachable to
    // their groups, which shrink.
    let crash = FaultSpec { at_s: Some(0.22), rank: Some(3), ..fault(FaultKind::Crash) };
    let r = sim(&with(frames("shrink", 1), crash), 1);
    assert_clean(&r, "frames, crash");
    let f = r.frames.expect("frame level");
    assert!(f.peers_unreachable >= 3, "{f:?}");
    assert_eq!((r.steps_completed, r.steps.last().map(|p| p.participants)), (10, Some(3)));
}

#[test]
fn chaos_sweep_at_frame_level_nothing_hangs_nothing_is_wrong_nothing_is_lost() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-frames");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    for seed in 1..=20u64 {
        let text = chaos_scenario(seed, false).replace(
            "link_timeout_ms = 50\nunreachable_after_ms = 200",
            "link_timeout_ms = 150\nunreachable_after_ms = 500\nframes = true",
        );
        let file = dir.join(format!("chaos-frames-{seed}.toml"));
        let s = Scenario::parse(&file.display().to_string(), &text).expect("generated scenarios are valid");
        assert!(s.transport.frames);
        let r = sim(&s, seed);
        if !r.clean() || r.steps_completed == 0 && s.workload.policy != PolicyKind::Abort {
            std::fs::write(&file, &text).expect("write the failing scenario");
            panic!("seed {seed} failed; replay: phalanx sim {} --seed {seed}\n{}", file.display(), r.summary());
        }
    }
}

#[test]
fn semisync_syncs_inside_each_dc_every_step_and_across_every_h_steps_and_loses_nothing() {
    let text = |policy: &str, faults: &str| {
        format!(
            r#"name = "semisync"
[topology]
dcs = 2
hosts_per_dc = 2
ranks_per_host = 2
nic_gbit_s = 100
wan_gbit_s = 10
[transport]
unreachable_after_ms = 300
[workload]
kind = "semisync"
bytes = "256KiB"
outer_bytes = "64KiB"
outer_every = 5
steps = 20
payload = "real"
policy = "{policy}"
quorum_wait_ms = 20
deadline_ms = 20000
compute = {{ median_ms = 50, sigma = 0.1 }}
{faults}"#
        )
    };
    // Healthy: every step each DC's own all-reduce (2 per step); every 5th step the leaders'
    // outer round, then each DC's realignment broadcast (no heal: nobody missed a round).
    let s = Scenario::parse("semisync.toml", &text("shrink", "")).expect("valid");
    let r = sim(&s, 1);
    assert_clean(&r, "healthy");
    assert_eq!(r.steps_completed, 20);
    assert_eq!(r.collectives.completed, 20 * 2 + 4 * (1 + 2), "{}", r.summary());
    assert_eq!(r.contributions.offered, 8 * 20 + 2 * 4, "gradients of every rank, outer gradients of the leaders");
    assert_eq!(r.steps.len(), 4, "progress counts outer rounds");
    // A crash, a straggler under a quorum, the WAN down for a while: checked sums over the
    // participants, nothing lost.
    let faults = "[[faults]]\nkind = \"crash\"\nrank = 5\nat_s = 0.4\n\
                  [[faults]]\nkind = \"straggler\"\nranks = [2]\nslowdown = 3.0\n\
                  [[faults]]\nkind = \"link_down\"\ndcs = [0, 1]\nat_s = 0.7\nduration_s = 0.3\n";
    for policy in ["shrink", "quorum"] {
        let s = Scenario::parse("semisync.toml", &text(policy, faults)).expect("valid");
        for seed in 1..=4 {
            let r = sim(&s, seed);
            assert_clean(&r, policy);
            assert_eq!(r.steps_completed, 20, "{policy}: {}", r.summary());
        }
    }
    // The rounds are the real protocol's (`CrossDcPlan`): a leader that straggles under a quorum
    // is late for outer rounds, carries its outer gradient and is healed (a broadcast among the
    // leaders after the round), every rank running the same sequence — else sums would be
    // wrong or calls would fail or hang. Without heals (`heal_every = 0`) none runs.
    let straggling_leader = "[[faults]]\nkind = \"straggler\"\nranks = [4]\nslowdown = 3.0\n";
    for (heal_every, heals) in [(1, true), (0, false)] {
        let text =
            text("quorum", straggling_leader).replace("steps = 20", &format!("steps = 20\nheal_every = {heal_every}"));
        let s = Scenario::parse("semisync.toml", &text).expect("valid");
        for seed in 1..=3 {
            let r = sim(&s, seed);
            assert_clean(&r, "straggling leader");
            let p = r.semisync.expect("a semisync report");
            assert!(p.outer_late > 0, "seed {seed}: the straggling leader is late: {p:?}");
            assert_eq!(p.heals > 0, heals, "seed {seed}, heal_every {heal_every}: {p:?}");
            // Ranks that ran different sequences would fail calls (a heal paired with the other
            // leader's next outer round) even where nothing else does.
            assert_eq!((p.failed_calls, r.collectives.failed), (0, 0), "seed {seed}: {p:?}");
            assert_eq!(r.steps_completed, 20, "{}", r.summary());
        }
    }
    // A DC whose leader dies (no membership here to promote another): its realignments fail
    // (root lost), its ranks go on with their in-DC rounds, the other DC's leader runs the outer
    // rounds alone; nothing hangs, nothing is lost.
    let dead_leader = "[[faults]]\nkind = \"crash\"\nrank = 4\nat_s = 0.1\n";
    let s = Scenario::parse("semisync.toml", &text("shrink", dead_leader)).expect("valid");
    let r = sim(&s, 1);
    assert_clean(&r, "dead leader");
    let p = r.semisync.expect("a semisync report");
    assert!(p.failed_calls >= 3, "DC 1's realignments fail without their root: {p:?}");
    assert_eq!(p.outer_rounds, 4, "{p:?}");
    // Streaming DiLoCo: 5 fragments each syncing every 5 steps, staggered: one outer round a step.
    let s = Scenario::parse(
        "semisync.toml",
        &text("shrink", "").replace("outer_every = 5", "outer_every = 5\nouter_fragments = 5"),
    )
    .expect("valid");
    let r = sim(&s, 1);
    assert_clean(&r, "streaming");
    let p = r.semisync.expect("a semisync report");
    assert_eq!((p.outer_rounds, p.realignments, p.heals), (20, 2 * 20, 0), "{p:?}");
    let bad = text("shrink", "").replace("outer_every = 5", "outer_every = 5\nouter_fragments = 3");
    let err = Scenario::parse("s.toml", &bad).expect_err("3 fragments do not divide H = 5");
    assert!(err.to_string().contains("outer_fragments"), "{err}");
    // Wrong combinations are refused naming the field.
    let err = Scenario::parse("s.toml", &text("shrink", "").replace("outer_every = 5\n", "")).expect_err("no H");
    assert!(err.to_string().contains("outer_every"), "{err}");
    let err = Scenario::parse("s.toml", &text("shrink", "").replace("kind = \"semisync\"", "kind = \"data_parallel\""))
        .expect_err("H on a data-parallel loop");
    assert!(err.to_string().contains("outer_every"), "{err}");
}

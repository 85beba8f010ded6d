//! Phalanx's deterministic failure-injection simulator.
//!
//! It runs the real, sans-IO collectives of `phalanx-collectives` — every rank's `Group` with
//! its schedules, pipelined executor, fault policies and coordinator protocol — under virtual
//! time, over a flow-level network model of data centres, hosts, NICs and WAN links with
//! max-min fair bandwidth sharing, while injecting faults at scheduled times or at random from
//! failure rates. One thread, seeded random streams, no wall clock, no hash-map iteration: the
//! same scenario and seed give the same event sequence and `trace_hash` on any machine.
//!
//! ```no_run
//! use phalanx_sim::{run, RunOptions, Scenario};
//! let scenario = Scenario::load("examples/scenarios/one-dc-healthy.toml".as_ref()).unwrap();
//! let out = run(&scenario, scenario.seed, &RunOptions::default());
//! assert!(out.report.clean());
//! ```
//!
//! What is modelled and at which fidelity is written up in `docs/simulator.md`.
#![warn(missing_docs)]

pub mod fabric;
pub mod fair_share;
pub mod plot;
pub mod report;
pub mod scenario;
mod sim;
pub mod trace;

pub use report::Report;
pub use scenario::{Scenario, ScenarioError};
pub use sim::{run, run_collective, RunOptions, RunOutput};

//! Semi-synchronous training over a communicator: synchronous data parallel, local SGD,
//! DiLoCo and streaming DiLoCo (issue #6), with per-round fault policies and an accounting of
//! every outer gradient.
//!
//! The trainer owns its parameters (one flat `f32` vector here) and its inner optimizer; it
//! calls [`SemiSync::after_inner_step`] after every inner step. When a fragment is due, this
//! rank's outer gradient for it (`anchor − params`, plus whatever an earlier round carried) is
//! averaged over the round's participants — compressed to int8/4-bit with error feedback if
//! configured — and the outer optimizer moves the anchor; the parameters restart from it.
//!
//! Under faults: with `Shrink` a lost rank is left out and the survivors' average is used; with
//! `Quorum` a rank whose contribution was late gets it back and **carries** it into its next
//! round for that fragment (counted `pending` in the [`Ledger`], never silently lost); a failed
//! round is counted `dropped` and returned as an error. A late rank keeps its own anchor for that
//! round (it did not receive the result); it must be brought back in line by live recovery from
//! a healthy peer before its next round — not wired yet (see docs/semisync.md).

use std::ops::Range;
use std::time::Duration;

use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_runtime::semisync::{fragment_ranges, Ledger, OuterOptimizer, SyncMode};
use tracing::{debug, info_span, Instrument};

use crate::{
    AllReduceAlgorithm, CallOptions, CommError, Communicator, Compression, ErrorFeedback, FaultPolicy, Op, Outcome,
};

/// How a group syncs.
#[derive(Clone, Copy, Debug)]
pub struct SemiSyncConfig {
    /// The algorithm and its period.
    pub mode: SyncMode,
    /// The outer optimizer (DiLoCo modes; local SGD always averages).
    pub outer_lr: f32,
    /// Outer momentum.
    pub outer_momentum: f32,
    /// Compression of outer gradients (error feedback per fragment).
    pub compression: Compression,
    /// What a round does under faults.
    pub policy: FaultPolicy,
    /// Deadline of one round.
    pub deadline: Duration,
}

impl SemiSyncConfig {
    /// `mode` with the DiLoCo paper's outer optimizer (lr 0.7, Nesterov 0.9), no compression,
    /// `Shrink`, 30 s rounds.
    pub fn new(mode: SyncMode) -> SemiSyncConfig {
        SemiSyncConfig {
            mode,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            compression: Compression::None,
            policy: FaultPolicy::Shrink,
            deadline: Duration::from_secs(30),
        }
    }
}

/// What one sync round did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundReport {
    /// The fragment.
    pub fragment: usize,
    /// Who took part (communicator indices).
    pub participants: Vec<usize>,
    /// This rank's contribution missed the round and is carried.
    pub late: bool,
    /// Bytes this rank put into the round's all-reduce.
    pub bytes: usize,
}

/// One rank's semi-synchronous state: the anchors (parameters at each fragment's last sync),
/// outer optimizers, error feedback, carried contributions and the ledger.
pub struct SemiSync {
    config: SemiSyncConfig,
    ranges: Vec<Range<usize>>,
    anchor: Vec<f32>,
    outer: Vec<OuterOptimizer>,
    feedback: Vec<ErrorFeedback>,
    carry: Vec<Vec<f32>>,
    carried: Vec<u64>,
    ledger: Ledger,
    step: u64,
    bytes_sent: u64,
}

impl SemiSync {
    /// State for parameters `params` (identical on every rank at the start).
    pub fn new(params: &[f32], config: SemiSyncConfig) -> SemiSync {
        let ranges = fragment_ranges(params.len(), config.mode.fragments());
        let outer = ranges
            .iter()
            .map(|_| match config.mode {
                SyncMode::LocalSgd { .. } | SyncMode::Synchronous => OuterOptimizer::averaging(),
                _ => OuterOptimizer::new(config.outer_lr, config.outer_momentum, true),
            })
            .collect();
        SemiSync {
            feedback: vec![ErrorFeedback::new(); ranges.len()],
            carry: ranges.iter().map(|r| vec![0.0; r.len()]).collect(),
            carried: vec![0; ranges.len()],
            anchor: params.to_vec(),
            outer,
            ranges,
            config,
            ledger: Ledger::default(),
            step: 0,
            bytes_sent: 0,
        }
    }

    /// The accounting so far.
    pub fn ledger(&self) -> Ledger {
        self.ledger
    }

    /// Bytes this rank put into sync rounds so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Inner steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The parameters as of the last sync of each fragment.
    pub fn anchor(&self) -> &[f32] {
        &self.anchor
    }

    /// Synchronous data parallel: replaces `grads` by their average over the round's
    /// participants (call before the inner optimizer's step).
    pub async fn sync_gradients(
        &mut self,
        comm: &mut Communicator,
        grads: &mut [f32],
    ) -> Result<RoundReport, CommError> {
        self.step += 1;
        let riding = self.ledger.offer(0);
        let bytes = f32_bytes(grads);
        let n = bytes.len();
        let options = CallOptions { policy: self.config.policy, verify: false };
        let op = Op::AllReduce { algorithm: AllReduceAlgorithm::Auto, op: ReduceOp::Avg };
        self.bytes_sent += n as u64;
        match comm.collective(op, DType::F32, bytes, options, self.config.deadline).await {
            Ok(Outcome::Done { data, participants }) => {
                read_f32(&data, grads);
                self.ledger.applied(riding);
                Ok(RoundReport { fragment: 0, participants, late: false, bytes: n })
            }
            Ok(Outcome::Late { participants, .. }) => {
                // A late gradient is stale by the next step: reported dropped, not carried.
                self.ledger.dropped(riding);
                Ok(RoundReport { fragment: 0, participants, late: true, bytes: n })
            }
            Err(e) => {
                self.ledger.dropped(riding);
                Err(e)
            }
        }
    }

    /// After an inner step: syncs the fragments due at this step (none most steps). On
    /// return the synced fragments of `params` equal their new anchors.
    pub async fn after_inner_step(
        &mut self,
        comm: &mut Communicator,
        params: &mut [f32],
    ) -> Result<Vec<RoundReport>, CommError> {
        self.step += 1;
        let mut reports = Vec::new();
        for f in self.config.mode.due(self.step) {
            let span = info_span!("outer_sync", fragment = f, step = self.step);
            reports.push(self.round(comm, params, f).instrument(span).await?);
        }
        Ok(reports)
    }

    async fn round(&mut self, comm: &mut Communicator, params: &mut [f32], f: usize) -> Result<RoundReport, CommError> {
        let r = self.ranges[f].clone();
        let delta: Vec<f32> =
            r.clone().map(|i| self.anchor[i] - params[i]).zip(&self.carry[f]).map(|(d, c)| d + c).collect();
        let riding = self.ledger.offer(self.carried[f]);
        self.carried[f] = 0;
        let options = CallOptions { policy: self.config.policy, verify: false };
        let bytes = f32_bytes(&delta);
        let outcome = if self.config.compression == Compression::None {
            self.bytes_sent += bytes.len() as u64;
            let op = Op::AllReduce { algorithm: AllReduceAlgorithm::Auto, op: ReduceOp::Avg };
            comm.collective(op, DType::F32, bytes, options, self.config.deadline).await
        } else {
            // What goes on the wire: the quantised encoding (about 1 or ½ byte an element).
            let per_element = if self.config.compression == Compression::Int4 { 0.5 } else { 1.0 };
            self.bytes_sent += (delta.len() as f64 * per_element) as u64;
            comm.all_reduce_compressed(
                bytes,
                ReduceOp::Avg,
                self.config.compression,
                &mut self.feedback[f],
                options,
                self.config.deadline,
            )
            .await
        };
        let sent = delta.len() * 4;
        match outcome {
            Ok(Outcome::Done { data, participants }) => {
                let mut avg = vec![0.0f32; delta.len()];
                read_f32(&data, &mut avg);
                self.outer[f].step(&mut self.anchor[r.clone()], &avg);
                params[r.clone()].copy_from_slice(&self.anchor[r]);
                self.carry[f].iter_mut().for_each(|c| *c = 0.0);
                self.ledger.applied(riding);
                debug!(fragment = f, participants = participants.len(), "outer step applied");
                Ok(RoundReport { fragment: f, participants, late: false, bytes: sent })
            }
            Ok(Outcome::Late { participants, .. }) => {
                self.carry[f] = delta;
                self.carried[f] = riding;
                self.ledger.carried(riding);
                Ok(RoundReport { fragment: f, participants, late: true, bytes: sent })
            }
            Err(e) => {
                self.carry[f].iter_mut().for_each(|c| *c = 0.0);
                self.ledger.dropped(riding);
                Err(e)
            }
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_f32(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

//! Chrome / Perfetto trace output (`--trace`): one track per rank with a span per collective
//! call (named by its outcome), and a track of faults.

use serde_json::{json, Value};

/// Spans collected during a run.
pub struct Trace {
    open: Vec<Option<(u64, u64)>>,
    events: Vec<Value>,
}

/// Process id of the faults track.
const FAULTS_PID: usize = 0;
/// Process id of the ranks.
const RANKS_PID: usize = 1;

impl Trace {
    /// A trace for `ranks` ranks.
    pub fn new(ranks: usize) -> Trace {
        let mut events = vec![
            json!({"ph": "M", "name": "process_name", "pid": FAULTS_PID, "args": {"name": "faults"}}),
            json!({"ph": "M", "name": "process_name", "pid": RANKS_PID, "args": {"name": "ranks"}}),
        ];
        for r in 0..ranks.min(4096) {
            events.push(json!({"ph": "M", "name": "thread_name", "pid": RANKS_PID, "tid": r, "args": {"name": format!("rank {r}")}}));
        }
        Trace { open: vec![None; ranks], events }
    }

    /// Rank `rank` starts collective `op_seq` at `now` (ns).
    pub fn begin(&mut self, rank: usize, now: u64, op_seq: u64) {
        self.open[rank] = Some((now, op_seq));
    }

    /// Rank `rank`'s call ends at `now` with `outcome`.
    pub fn end(&mut self, rank: usize, now: u64, outcome: &str) {
        if let Some((start, op_seq)) = self.open[rank].take() {
            self.events.push(json!({
                "ph": "X", "pid": RANKS_PID, "tid": rank, "name": format!("collective #{op_seq}: {outcome}"),
                "cat": outcome, "ts": start as f64 / 1e3, "dur": (now - start) as f64 / 1e3,
            }));
        }
    }

    /// A fault starts or ends.
    pub fn fault(&mut self, kind: &str, now: u64, start: bool) {
        self.events.push(json!({
            "ph": if start { "B" } else { "E" }, "pid": FAULTS_PID, "tid": kind, "name": kind, "ts": now as f64 / 1e3,
        }));
        if start && matches!(kind, "crash") {
            self.events.push(
                json!({"ph": "i", "s": "g", "pid": FAULTS_PID, "tid": kind, "name": kind, "ts": now as f64 / 1e3}),
            );
        }
    }

    /// The trace as Chrome trace-event JSON.
    pub fn to_json(&self) -> Value {
        json!({ "traceEvents": self.events, "displayTimeUnit": "ms" })
    }
}

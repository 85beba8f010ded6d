//! Semi-synchronous training (issue #6), the parts that are arithmetic and bookkeeping:
//! the DiLoCo outer optimizer ([`OuterOptimizer`]), when each parameter fragment syncs
//! ([`SyncMode`], [`fragment_ranges`]), and the accounting that proves no outer gradient is
//! silently lost ([`Ledger`]), and which collectives run in which order ([`RoundPlan`],
//! [`CrossDcPlan`]: the protocol, sans-IO, which the simulator drives too). The tokio driver that runs the sync rounds over a communicator is
//! `phalanx_node::semisync`.

mod ledger;
mod outer;
mod rounds;
mod schedule;

pub use ledger::Ledger;
pub use outer::OuterOptimizer;
pub use rounds::{
    CallGroup, CrossDcCall, CrossDcPlan, FragmentFlags, PlanConfig, PlannedCall, RoundPlan, RoundResult, SyncCall,
};
pub use schedule::{fragment_ranges, SyncMode};

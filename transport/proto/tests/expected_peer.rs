//! A peer this endpoint dials but that never comes up is reported unreachable after
//! `unreachable_after`, as one that went away would be — whoever waits for it (a collective's
//! coordinator waiting for its report) learns it is lost instead of waiting forever.

use std::time::Duration;

use phalanx_proto::{Endpoint, Epoch, Event, Instant, RankId, TransportConfig};

fn endpoint() -> Endpoint {
    let config = TransportConfig { unreachable_after: Duration::from_secs(4), ..TransportConfig::default() };
    Endpoint::new(RankId(0), 7, Epoch(1), config)
}

fn events(e: &mut Endpoint) -> Vec<Event> {
    std::iter::from_fn(|| e.poll_event()).collect()
}

#[test]
fn a_dialed_peer_that_never_comes_up_is_reported_unreachable_in_time() {
    let mut e = endpoint();
    e.expect_peer(Instant::ZERO, RankId(3));
    let due = e.poll_timeout().expect("a timer is armed for the expected peer");
    assert_eq!(due, Instant::ZERO + Duration::from_secs(4));
    e.handle_timeout(Instant::ZERO + Duration::from_secs(3));
    assert!(
        !events(&mut e).iter().any(|ev| matches!(ev, Event::PeerUnreachable { .. })),
        "not before unreachable_after"
    );
    e.handle_timeout(due);
    let evs = events(&mut e);
    assert!(
        evs.iter().any(|ev| matches!(ev, Event::PeerUnreachable { peer: RankId(3), .. })),
        "reported at the deadline: {evs:?}"
    );
    // Reported once.
    e.handle_timeout(due + Duration::from_secs(10));
    assert!(events(&mut e).is_empty());
}

#[test]
fn an_endpoint_that_expects_nobody_reports_nothing() {
    let mut e = endpoint();
    e.expect_peer(Instant::ZERO, RankId(0)); // itself: ignored
    e.handle_timeout(Instant::ZERO + Duration::from_secs(60));
    assert!(events(&mut e).is_empty());
}

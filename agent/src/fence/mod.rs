//! Fencing: the lease the controller grants this node, and what follows when it runs out.
//!
//! A lease token is the instant (on the system's monotonic clock, in microseconds) this agent
//! issued it. The controller renews the lease with the token of its previous renewal's answer,
//! and the lease then lasts the fence timeout from that instant. The token was issued before
//! the controller sent the renewal, so the lease here always ends before the controller counts
//! it as ended, however late a renewal travels. Once it has run out, the agent stops its highly
//! available VMs and starts none of them until it holds a lease again; the controller starts
//! them elsewhere only after the fence timeout plus a margin since the last renewal it sent.
//!
//! The monotonic clock counts from boot for every process, so the lease kept on disk still
//! holds for an agent restarted in between.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod hold;

/// Fence timeouts a controller may ask for.
pub const TIMEOUTS: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(600);

/// The lease as this agent holds it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// When it runs out (monotonic µs); None while no controller has granted one.
    pub until_us: Option<u64>,
    /// It ran out, and the highly available VMs were stopped.
    pub fenced: bool,
}

/// Why a renewal was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenewError {
    #[error("token: {0} was never issued by this agent (it is in the future)")]
    FutureToken(u64),
    #[error("fence_timeout_ms: {0} is outside 1000..=600000")]
    Timeout(u128),
}

impl Lease {
    /// Renews with `token` (issued earlier by [`issue`]) for `timeout`. A late renewal never
    /// shortens the lease; one that ends before `now` changes nothing.
    pub fn renew(&mut self, token: u64, timeout: Duration, now_us: u64) -> Result<(), RenewError> {
        if !TIMEOUTS.contains(&timeout) {
            return Err(RenewError::Timeout(timeout.as_millis()));
        }
        if token > now_us {
            return Err(RenewError::FutureToken(token));
        }
        let until = token.saturating_add(timeout.as_micros() as u64);
        if until <= now_us {
            return Ok(());
        }
        self.until_us = Some(self.until_us.map_or(until, |u| u.max(until)));
        self.fenced = false;
        Ok(())
    }

    /// Whether the lease ran out and the VMs are not fenced yet: true once, then [`fenced`]
    /// stays set until a renewal.
    pub fn must_fence(&mut self, now_us: u64) -> bool {
        let due = !self.fenced && self.until_us.is_some_and(|u| now_us >= u);
        self.fenced |= due;
        due
    }

    /// How long the lease still lasts; zero without one.
    pub fn remaining(&self, now_us: u64) -> Duration {
        Duration::from_micros(self.until_us.map_or(0, |u| u.saturating_sub(now_us)))
    }
}

/// A new token at `now_us`, after `last` (two renewals within a microsecond stay distinct).
pub fn issue(last: u64, now_us: u64) -> u64 {
    now_us.max(last + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;
    const T: Duration = Duration::from_secs(10);

    #[test]
    fn a_lease_lasts_from_when_its_token_was_issued() {
        let mut l = Lease::default();
        assert!(!l.must_fence(100 * S), "no lease, nothing to fence");
        let token = issue(0, 100 * S);
        // The renewal arrives 3 s after the token was issued: the lease ends 7 s later.
        l.renew(token, T, 103 * S).unwrap();
        assert_eq!(l.remaining(103 * S), Duration::from_secs(7));
        assert!(!l.must_fence(109 * S));
        assert!(l.must_fence(110 * S));
        assert!(l.fenced);
        assert!(!l.must_fence(111 * S), "fenced once");
    }

    #[test]
    fn late_or_stale_renewals_never_extend_or_shorten_wrongly() {
        let mut l = Lease::default();
        l.renew(issue(0, 100 * S), T, 100 * S).unwrap();
        // An older token arriving late does not shorten the lease.
        l.renew(95 * S, T, 101 * S).unwrap();
        assert_eq!(l.until_us, Some(110 * S));
        // A token whose lease has passed already changes nothing, and does not unfence.
        assert!(l.must_fence(120 * S));
        l.renew(105 * S, T, 120 * S).unwrap();
        assert!(l.fenced);
        assert_eq!(l.until_us, Some(110 * S));
        // A fresh one does.
        l.renew(120 * S, T, 120 * S).unwrap();
        assert!(!l.fenced);
        assert_eq!(l.remaining(125 * S), Duration::from_secs(5));
    }

    #[test]
    fn bad_renewals_are_refused() {
        let mut l = Lease::default();
        assert_eq!(
            l.renew(200 * S, T, 100 * S),
            Err(RenewError::FutureToken(200 * S))
        );
        assert_eq!(
            l.renew(100 * S, Duration::from_millis(10), 100 * S),
            Err(RenewError::Timeout(10))
        );
        assert_eq!(l, Lease::default());
    }

    #[test]
    fn tokens_increase() {
        assert_eq!(issue(0, 5), 5);
        assert_eq!(issue(5, 5), 6);
        assert_eq!(issue(9, 5), 10);
    }
}

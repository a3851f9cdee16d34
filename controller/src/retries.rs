//! Back-off for failed reconciliations, per object: the first retry comes soon, each further
//! failure of the same object waits about twice as long (with jitter) up to [`LONGEST`], and a
//! success starts over. kube-runtime calls `error_policy` on failures only, so the controllers
//! report successes here as well ([`Retries::succeeded`], see [`crate::controllers`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use kube::api::DynamicObject;
use kube::runtime::reflector::ObjectRef;

/// The first retry's delay.
pub const FIRST: Duration = Duration::from_millis(500);
/// The longest delay between retries.
pub const LONGEST: Duration = Duration::from_secs(300);

/// An object of any kind.
type Key = ObjectRef<DynamicObject>;

#[derive(Default)]
pub struct Retries {
    failing: Mutex<HashMap<Key, ExponentialBackoff>>,
}

impl Retries {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, ExponentialBackoff>> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The object failed again: how long until its next try.
    pub fn failed(&self, key: Key) -> Duration {
        self.lock()
            .entry(key)
            .or_insert_with(|| {
                ExponentialBuilder::default()
                    .with_min_delay(FIRST)
                    .with_max_delay(LONGEST)
                    .with_jitter()
                    .without_max_times()
                    .build()
            })
            .next()
            .unwrap_or(LONGEST)
    }

    /// The object reconciled: its next failure starts from [`FIRST`] again.
    pub fn succeeded(&self, key: &Key) {
        self.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::VirtualMachine;

    fn vm(name: &str) -> Key {
        ObjectRef::<VirtualMachine>::new(name)
            .within("default")
            .erase()
    }

    #[test]
    fn delays_grow_per_object_and_reset_on_success() {
        let r = Retries::default();
        let first = r.failed(vm("a"));
        let delays: Vec<Duration> = (0..12).map(|_| r.failed(vm("a"))).collect();
        // Jitter adds up to one delay again: each retry waits at least the un-jittered figure.
        assert!(first >= FIRST && first < 2 * FIRST, "{first:?}");
        assert!(delays[0] >= 2 * FIRST, "{delays:?}");
        assert!(delays[3] >= 16 * FIRST, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= 2 * LONGEST), "{delays:?}");
        assert!(delays[11] >= LONGEST, "{delays:?}");
        let other = r.failed(vm("b"));
        assert!(
            other < 2 * FIRST,
            "another object starts at the first delay: {other:?}"
        );
        r.succeeded(&vm("a"));
        let again = r.failed(vm("a"));
        assert!(again < 2 * FIRST, "a success starts over: {again:?}");
    }
}

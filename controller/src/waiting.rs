//! Which objects wait for another object to change, so that the watch of that object wakes
//! exactly them (the mapper of a `Controller::watches`) without scanning every object and
//! without polling.
//!
//! A reconciler registers before it reads what it waits for, and cancels once it no longer
//! waits: a change between its read and its registration still wakes it. A wake-up hands the
//! waiters over; those that still wait register again on their next pass.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Mutex;

use kube::Resource;
use kube::runtime::reflector::ObjectRef;

use crate::crd::{VMOperation, VMSnapshot, VirtualMachine};

/// A namespaced object's identity: namespace and name.
pub type Key = (String, String);

/// Waiters of kind `K`, by what they wait for.
pub struct Waiters<On, K: Resource<DynamicType = ()>> {
    by: Mutex<HashMap<On, HashSet<ObjectRef<K>>>>,
}

impl<On, K: Resource<DynamicType = ()>> Default for Waiters<On, K> {
    fn default() -> Self {
        Waiters {
            by: Mutex::default(),
        }
    }
}

impl<On: Eq + Hash, K: Resource<DynamicType = ()>> Waiters<On, K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<On, HashSet<ObjectRef<K>>>> {
        self.by.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `who` waits for `on` to change.
    pub fn wait(&self, on: On, who: ObjectRef<K>) {
        self.lock().entry(on).or_default().insert(who);
    }

    /// `who` no longer waits for `on`.
    pub fn cancel(&self, on: &On, who: &ObjectRef<K>) {
        let mut by = self.lock();
        if let Some(set) = by.get_mut(on) {
            set.remove(who);
            if set.is_empty() {
                by.remove(on);
            }
        }
    }

    /// `on` changed: every object that waited for it, to reconcile.
    pub fn wake(&self, on: &On) -> Vec<ObjectRef<K>> {
        self.lock()
            .remove(on)
            .map(|set| set.into_iter().collect())
            .unwrap_or_default()
    }
}

/// Every wait the reconcilers register.
#[derive(Default)]
pub struct Waiting {
    /// VirtualMachines whose template is missing or unusable, by template.
    pub template: Waiters<Key, VirtualMachine>,
    /// VirtualMachines waiting for a node: `Some(node)` for their node's agent to answer, `None`
    /// for room on any node.
    pub node: Waiters<Option<String>, VirtualMachine>,
    /// VMOperations waiting for their VirtualMachine to change, by VirtualMachine.
    pub operations: Waiters<Key, VMOperation>,
    /// VMSnapshots that follow their VirtualMachine (to be taken, or to check it still has
    /// them), by VirtualMachine.
    pub snapshots: Waiters<Key, VMSnapshot>,
}

/// `obj`'s identity as a waiters' key.
pub fn key<K: Resource>(obj: &K) -> Key {
    let meta = obj.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> ObjectRef<VirtualMachine> {
        ObjectRef::new(name).within("default")
    }

    #[test]
    fn a_wake_up_hands_over_exactly_the_waiters() {
        let w: Waiters<Key, VirtualMachine> = Waiters::default();
        let tpl = ("default".to_string(), "t".to_string());
        let other = ("default".to_string(), "u".to_string());
        w.wait(tpl.clone(), vm("a"));
        w.wait(tpl.clone(), vm("b"));
        w.wait(tpl.clone(), vm("b"));
        w.wait(other.clone(), vm("c"));
        w.cancel(&tpl, &vm("b"));
        assert_eq!(w.wake(&tpl), [vm("a")]);
        assert!(w.wake(&tpl).is_empty(), "handed over once");
        assert_eq!(w.wake(&other), [vm("c")]);
    }
}

//! Numeric identities for peers, pure. A pod's identity is its (namespace, label set, set
//! of policy CIDRs that contain its IP); an address that is no pod's gets the identity of
//! the set of policy CIDRs that contain it. Numbers are handed out in order and kept while
//! their key exists, so a pod whose labels change to a set that already has an identity
//! moves to that number without any rule being rewritten.
use std::collections::HashMap;

use ipnetwork::Ipv4Network;
use mycni_common::policy::identity::FIRST_ALLOCATED;

use super::model::Labels;

/// What an allocated identity stands for. `cidrs` is sorted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityKey {
    Pods {
        namespace: String,
        labels: Labels,
        cidrs: Vec<Ipv4Network>,
    },
    /// Addresses that are no pod's, inside exactly these policy CIDRs.
    Cidrs(Vec<Ipv4Network>),
}

impl IdentityKey {
    pub fn cidrs(&self) -> &[Ipv4Network] {
        match self {
            IdentityKey::Pods { cidrs, .. } | IdentityKey::Cidrs(cidrs) => cidrs,
        }
    }
}

/// Hands out identities from [`FIRST_ALLOCATED`], in rounds: each computation asks for
/// the identities it uses, and [`IdentityAllocator::end_round`] releases the rest. A
/// released number is not handed out again until the counter wraps, so a datapath entry
/// still being rewritten never sees a number change meaning under it.
#[derive(Debug, Clone)]
pub struct IdentityAllocator {
    /// Each key's identity and the round that last used it.
    ids: HashMap<IdentityKey, (u32, u64)>,
    next: u32,
    wrapped: bool,
    round: u64,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        IdentityAllocator {
            ids: HashMap::new(),
            next: FIRST_ALLOCATED,
            wrapped: false,
            round: 0,
        }
    }
}

impl IdentityAllocator {
    pub fn get(&self, key: &IdentityKey) -> Option<u32> {
        self.ids.get(key).map(|&(id, _)| id)
    }

    /// Starts a round: identities not asked for before [`Self::end_round`] are released.
    pub fn begin_round(&mut self) {
        self.round += 1;
    }

    /// The key's identity, allocating one when it has none; kept for this round.
    pub fn get_or_allocate(&mut self, key: &IdentityKey) -> u32 {
        if let Some(entry) = self.ids.get_mut(key) {
            entry.1 = self.round;
            return entry.0;
        }
        let id = self.next_free();
        self.ids.insert(key.clone(), (id, self.round));
        id
    }

    /// Releases the identities this round did not ask for.
    pub fn end_round(&mut self) {
        let round = self.round;
        self.ids.retain(|_, &mut (_, used)| used == round);
    }

    fn next_free(&mut self) -> u32 {
        // Four billion allocations before a wrap; after one, numbers in use are skipped
        // (a scan, but only ever after a wrap).
        loop {
            let id = self.next;
            match self.next.checked_add(1) {
                Some(next) => self.next = next,
                None => {
                    self.next = FIRST_ALLOCATED;
                    self.wrapped = true;
                }
            }
            if !self.wrapped || !self.ids.values().any(|&(used, _)| used == id) {
                return id;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(app: &str) -> IdentityKey {
        IdentityKey::Pods {
            namespace: "default".into(),
            labels: [("app".to_string(), app.to_string())].into(),
            cidrs: vec![],
        }
    }

    #[test]
    fn identities_are_stable_and_not_reused_at_once() {
        let mut ids = IdentityAllocator::default();
        ids.begin_round();
        let web = ids.get_or_allocate(&pods("web"));
        let db = ids.get_or_allocate(&pods("db"));
        assert_eq!((web, db), (FIRST_ALLOCATED, FIRST_ALLOCATED + 1));
        assert_eq!(ids.get_or_allocate(&pods("web")), web);
        ids.end_round();
        // The next round uses db only: web is released.
        ids.begin_round();
        assert_eq!(ids.get_or_allocate(&pods("db")), db);
        ids.end_round();
        assert_eq!(ids.get(&pods("web")), None);
        ids.begin_round();
        assert_eq!(ids.get_or_allocate(&pods("web")), FIRST_ALLOCATED + 2);
        ids.end_round();
        assert_eq!(ids.len(), 1, "db was not asked for in the last round");
    }

    #[test]
    fn a_wrapped_counter_skips_numbers_in_use() {
        let mut ids = IdentityAllocator::default();
        let kept = ids.get_or_allocate(&pods("kept"));
        ids.next = u32::MAX;
        assert_eq!(ids.get_or_allocate(&pods("last")), u32::MAX);
        assert_eq!(ids.get_or_allocate(&pods("wrapped")), kept + 1);
    }
}

//! The cache most kinds need: each object reduced to a projection (what the agent acts on)
//! by namespace and name, so an update that changes nothing projected is no news. Pure.
use std::collections::BTreeMap;

use kube::runtime::watcher::Event;
use kube::ResourceExt;

use super::WatchCache;

/// An object's namespace (empty for a cluster-scoped one) and name.
pub type ObjectName = (String, String);

/// How a cache keeps one kind: its projection, `None` for an object it does not keep.
pub trait Projection<K>: Clone + PartialEq + Send + 'static {
    fn project(object: &K) -> Option<Self>;
}

/// The projections of one namespaced kind, by namespace and name. A re-list is collected
/// aside and swapped in whole once complete, as [`super::nodes::NodeCache`] does.
#[derive(Debug, Clone)]
pub struct ProjectionCache<T> {
    objects: BTreeMap<ObjectName, T>,
    relisting: Option<BTreeMap<ObjectName, T>>,
}

impl<T> Default for ProjectionCache<T> {
    fn default() -> Self {
        ProjectionCache {
            objects: BTreeMap::new(),
            relisting: None,
        }
    }
}

impl<T: PartialEq> ProjectionCache<T> {
    pub fn objects(&self) -> &BTreeMap<ObjectName, T> {
        &self.objects
    }

    /// Sets or removes (`None`) one object; returns whether its projection changed.
    fn set(&mut self, name: ObjectName, projection: Option<T>) -> bool {
        match projection {
            Some(new) => {
                if self.objects.get(&name) == Some(&new) {
                    return false;
                }
                self.objects.insert(name, new);
                true
            }
            None => self.objects.remove(&name).is_some(),
        }
    }
}

/// An object's namespace and name.
fn object_name<K: kube::Resource>(object: &K) -> ObjectName {
    (object.namespace().unwrap_or_default(), object.name_any())
}

impl<K, T> WatchCache<K> for ProjectionCache<T>
where
    K: kube::Resource,
    T: Projection<K>,
{
    fn apply(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                if let Some(projection) = T::project(&object) {
                    self.relisting
                        .get_or_insert_with(BTreeMap::new)
                        .insert(object_name(&object), projection);
                }
                false
            }
            Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                let changed = listed != self.objects;
                self.objects = listed;
                changed
            }
            Event::Apply(object) => self.set(object_name(&object), T::project(&object)),
            Event::Delete(object) => self.set(object_name(&object), None),
        }
    }

    fn len(&self) -> usize {
        self.objects.len()
    }
}

//! The engine's records by slot: a vector indexed by slot number. Slots are small and
//! dense (a new entity takes the lowest free one), so a record costs its own size,
//! not the slack of a half-full tree node around it, and a walk over every record
//! (a takeover's) reads memory in order.

use crate::ids::EntityId;

/// Values by entity slot (see the module docs).
#[derive(Clone, Debug)]
pub struct Slots<V> {
    items: Vec<Option<V>>,
    len: usize,
}

impl<V> Default for Slots<V> {
    fn default() -> Self {
        Slots {
            items: Vec::new(),
            len: 0,
        }
    }
}

impl<V> Slots<V> {
    /// How many slots hold a value.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no slot holds a value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value in slot `id`.
    pub fn get(&self, id: &EntityId) -> Option<&V> {
        self.items.get(id.0 as usize)?.as_ref()
    }

    /// The value in slot `id`, to change.
    pub fn get_mut(&mut self, id: &EntityId) -> Option<&mut V> {
        self.items.get_mut(id.0 as usize)?.as_mut()
    }

    /// True if slot `id` holds a value.
    pub fn contains_key(&self, id: &EntityId) -> bool {
        self.get(id).is_some()
    }

    /// Puts `value` in slot `id`; returns what was there.
    pub fn insert(&mut self, id: EntityId, value: V) -> Option<V> {
        let at = id.0 as usize;
        if at >= self.items.len() {
            self.items.resize_with(at + 1, || None);
        }
        let old = self.items[at].replace(value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Empties slot `id`; returns what was there.
    pub fn remove(&mut self, id: &EntityId) -> Option<V> {
        let old = self.items.get_mut(id.0 as usize)?.take();
        if old.is_some() {
            self.len -= 1;
            while matches!(self.items.last(), Some(None)) {
                self.items.pop();
            }
        }
        old
    }

    /// The lowest slot from `first` on that holds no value.
    pub fn first_free(&self, first: u32) -> u32 {
        let from = first as usize;
        self.items
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, v)| v.is_none())
            .map_or(self.items.len().max(from), |(i, _)| i) as u32
    }

    /// Every value, by slot.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.items.iter().flatten()
    }

    /// Every slot that holds a value, with it, by slot.
    pub fn iter(&self) -> impl Iterator<Item = (EntityId, &V)> {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((EntityId(i as u32), v.as_ref()?)))
    }
}

impl<V> std::ops::Index<&EntityId> for Slots<V> {
    type Output = V;

    fn index(&self, id: &EntityId) -> &V {
        match self.get(id) {
            Some(v) => v,
            None => panic!("no record in slot {id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_keep_values_in_order_and_shrink_from_the_top() {
        let mut s = Slots::default();
        assert_eq!(s.first_free(1), 1);
        assert_eq!(s.insert(EntityId(3), "c"), None);
        assert_eq!(s.insert(EntityId(1), "a"), None);
        assert_eq!(s.insert(EntityId(1), "A"), Some("a"));
        assert_eq!(s.len(), 2);
        assert_eq!(s.first_free(1), 2);
        let all: Vec<(EntityId, &&str)> = s.iter().collect();
        assert_eq!(all, vec![(EntityId(1), &"A"), (EntityId(3), &"c")]);
        assert_eq!(s.remove(&EntityId(3)), Some("c"));
        assert_eq!(s.remove(&EntityId(3)), None);
        assert_eq!(s.items.len(), 2, "trailing empty slots are dropped");
        assert_eq!(s[&EntityId(1)], "A");
        assert!(!s.contains_key(&EntityId(7)));
        assert_eq!(s.first_free(1), 2);
        assert_eq!(s.remove(&EntityId(1)), Some("A"));
        assert!(s.is_empty());
    }
}

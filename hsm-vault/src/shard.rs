//! Sharding: which replica group holds a record.
//!
//! The record-id space is cut into [`SLOTS`] slots by the first two bytes of
//! the record id (a token HMAC, so uniform), and a versioned [`ShardMap`]
//! gives every slot to one group. The map is the fleet's (the fleet file
//! declares it); each group adopts it through its own Raft log, so all
//! members of a group route and refuse by the same committed map, whatever
//! their local files say.
//!
//! A record must never be served by two groups: each would keep its own
//! guess counter. So a group refuses a new map version that gives a slot to
//! another owner ([`ShardMap::moved_slots`]): moving slots needs a migration
//! of their records, which is not built yet.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Number of slots of the record-id space.
pub const SLOTS: u32 = 1 << 16;

/// A replica group's id (never 0; 0 means "no group": a lone node).
pub type GroupId = u64;

/// Slots `first..=last` belong to `group`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRange {
    pub first: u16,
    pub last: u16,
    pub group: GroupId,
}

/// Which group holds each slot, at a version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    pub version: u64,
    /// Ascending, contiguous, covering every slot.
    #[serde(rename = "range")]
    pub ranges: Vec<SlotRange>,
}

/// The slot of a record id.
pub fn slot(id: &[u8; 32]) -> u16 {
    u16::from_be_bytes([id[0], id[1]])
}

impl ShardMap {
    /// Version `version`, the slots split evenly over `groups` in order
    /// (with more groups than slots, some groups get none).
    pub fn even(version: u64, groups: &[GroupId]) -> Self {
        let n = groups.len().max(1) as u64;
        let slots = u64::from(SLOTS);
        let ranges = groups
            .iter()
            .enumerate()
            .filter_map(|(i, g)| {
                let i = i as u64;
                let (first, end) = (i * slots / n, (i + 1) * slots / n);
                (end > first).then(|| SlotRange {
                    first: first as u16,
                    last: (end - 1) as u16,
                    group: *g,
                })
            })
            .collect();
        ShardMap { version, ranges }
    }

    /// Checks the map: a version, ranges ascending and contiguous from slot
    /// 0 to the last slot, no group 0.
    pub fn validate(&self) -> Result<(), String> {
        if self.version == 0 {
            return Err("shard map version must be at least 1".into());
        }
        let mut next: u32 = 0;
        for r in &self.ranges {
            if r.group == 0 {
                return Err("group 0 is reserved".into());
            }
            if u32::from(r.first) != next || r.last < r.first {
                return Err(format!(
                    "slot ranges must be ascending and contiguous: expected one starting at {next}, found {}..={}",
                    r.first, r.last
                ));
            }
            next = u32::from(r.last) + 1;
        }
        if next != SLOTS {
            return Err(format!(
                "slot ranges must cover 0..={}, they stop at {next}",
                SLOTS - 1
            ));
        }
        Ok(())
    }

    /// The group holding slot `s` (`None` only for an invalid map).
    pub fn group_of_slot(&self, s: u16) -> Option<GroupId> {
        let i = self.ranges.partition_point(|r| r.last < s);
        self.ranges.get(i).filter(|r| r.first <= s).map(|r| r.group)
    }

    /// The group holding the record `id`.
    pub fn group_of(&self, id: &[u8; 32]) -> Option<GroupId> {
        self.group_of_slot(slot(id))
    }

    /// How many slots `next` gives to another group than this map does.
    pub fn moved_slots(&self, next: &ShardMap) -> u32 {
        (0..SLOTS)
            .filter(|s| self.group_of_slot(*s as u16) != next.group_of_slot(*s as u16))
            .count() as u32
    }

    /// This map with slots `first..=last` given to `group`, at `version`.
    pub fn reassign(&self, first: u16, last: u16, group: GroupId, version: u64) -> ShardMap {
        let mut ranges: Vec<SlotRange> = Vec::new();
        for s in 0..SLOTS {
            let s = s as u16;
            let owner = if (first..=last).contains(&s) {
                group
            } else {
                self.group_of_slot(s).unwrap_or(group)
            };
            match ranges.last_mut() {
                Some(r) if r.group == owner => r.last = s,
                _ => ranges.push(SlotRange {
                    first: s,
                    last: s,
                    group: owner,
                }),
            }
        }
        ShardMap { version, ranges }
    }

    /// The groups holding at least one slot.
    pub fn groups(&self) -> BTreeSet<GroupId> {
        self.ranges.iter().map(|r| r.group).collect()
    }

    /// How many slots `group` holds.
    pub fn slots_of(&self, group: GroupId) -> u32 {
        self.ranges
            .iter()
            .filter(|r| r.group == group)
            .map(|r| u32::from(r.last) - u32::from(r.first) + 1)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_maps_cover_every_slot_once() {
        for n in 1..=7u64 {
            let groups: Vec<GroupId> = (1..=n).collect();
            let map = ShardMap::even(1, &groups);
            map.validate().expect("valid");
            let total: u32 = groups.iter().map(|g| map.slots_of(*g)).sum();
            assert_eq!(total, SLOTS);
            assert_eq!(map.group_of_slot(0), Some(1));
            assert_eq!(map.group_of_slot(u16::MAX), Some(n));
        }
    }

    #[test]
    fn even_maps_over_more_groups_than_slots_stay_valid() {
        // A fleet file naming more groups than there are slots once made
        // the split underflow (a panic in debug builds).
        let groups: Vec<GroupId> = (1..=u64::from(SLOTS) + 5).collect();
        let map = ShardMap::even(1, &groups);
        // Valid: every slot once, in order; so one slot per range here.
        map.validate().expect("valid");
        assert_eq!(map.ranges.len(), SLOTS as usize);
    }

    #[test]
    fn records_go_to_the_group_of_their_slot() {
        let map = ShardMap::even(3, &[4, 9]);
        let mut id = [0u8; 32];
        id[0] = 0x7f;
        id[1] = 0xff;
        assert_eq!(map.group_of(&id), Some(4));
        id[0] = 0x80;
        id[1] = 0x00;
        assert_eq!(map.group_of(&id), Some(9));
    }

    #[test]
    fn broken_maps_are_refused() {
        let good = ShardMap::even(1, &[1, 2]);
        let mut gap = good.clone();
        gap.ranges[1].first += 1;
        let mut short = good.clone();
        short.ranges[1].last -= 1;
        let mut zero = good.clone();
        zero.ranges[0].group = 0;
        let mut unversioned = good.clone();
        unversioned.version = 0;
        let empty = ShardMap {
            version: 1,
            ranges: Vec::new(),
        };
        for bad in [gap, short, zero, unversioned, empty] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reassigning_slots_keeps_the_rest() {
        let map = ShardMap::even(1, &[1, 2]).reassign(100, 199, 3, 2);
        map.validate().expect("valid");
        assert_eq!(map.version, 2);
        assert_eq!(map.ranges.len(), 4);
        assert_eq!((map.slots_of(1), map.slots_of(3)), (32768 - 100, 100));
        assert_eq!(map.group_of_slot(150), Some(3));
        assert_eq!(map.group_of_slot(200), Some(1));
    }

    #[test]
    fn moved_slots_counts_changes_of_owner_only() {
        let a = ShardMap::even(1, &[1, 2]);
        let mut same_owners = a.clone();
        same_owners.version = 2;
        assert_eq!(a.moved_slots(&same_owners), 0);
        let mut moved = same_owners.clone();
        moved.ranges[0].last -= 10;
        moved.ranges[1].first -= 10;
        assert_eq!(a.moved_slots(&moved), 10);
    }
}

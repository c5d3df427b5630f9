//! The fleet file (`hsm-vault/src/geo.rs`, TOML), read by every node and by
//! `fleet` at start: `FleetFile::parse` (TOML, then its consistency
//! checks). Whatever it accepts is consistent (known regions, unique ids and
//! addresses, a valid shard map over the nodes' groups), writes back as
//! TOML that parses to the same fleet, and answers latency and node
//! look-ups.
//!
//! Input: the file's text.

#![no_main]

use std::collections::BTreeSet;

use hsm_vault::geo::FleetFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: vault_fuzz::seeds::init("fleet_file"), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(fleet) = FleetFile::parse(text) else {
        return;
    };
    let regions: BTreeSet<&str> = fleet.regions.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(regions.len(), fleet.regions.len());
    let map = fleet.shard_map();
    map.validate().expect("an accepted fleet has a valid shard map");
    let groups = fleet.groups();
    assert!(map.groups().is_subset(&groups));
    for n in &fleet.nodes {
        assert!(n.id != 0 && n.group != 0);
        assert!(regions.contains(n.region.as_str()));
        assert_eq!(fleet.node(n.id).map(|m| &m.addr), Some(&n.addr));
        assert!(fleet.group_nodes(n.group).any(|m| m.id == n.id));
    }
    for a in &regions {
        for b in &regions {
            assert_eq!(fleet.latency(a, b), fleet.latency(b, a));
        }
    }
    let written = toml::to_string(&fleet).expect("an accepted fleet file writes back");
    let again = FleetFile::parse(&written)
        .unwrap_or_else(|e| panic!("a written fleet file does not parse: {e}\n{written}"));
    assert_eq!(again, fleet);
});

//! Emulated geography and fault switches for the node-to-node transport.
//!
//! This kernel has no `netem`, so inter-region latency, loss and partitions
//! are injected in user space, on outgoing Raft messages:
//!
//! - the **fleet file** names regions, nodes and a region-to-region latency
//!   table (one-way milliseconds); a message waits that long before it is
//!   sent, and its answer again before it is read, so a round trip costs
//!   twice the one-way figure;
//! - the **faults file** holds named switches that tests and operators flip
//!   at run time (the node re-reads it every [`FAULTS_POLL`]): isolate nodes
//!   or whole regions, add delay, drop a share of messages.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::replication::NodeId;
use crate::shard::{GroupId, ShardMap};

/// How often a node re-reads its faults file.
pub const FAULTS_POLL: Duration = Duration::from_millis(100);

/// The fleet file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FleetFile {
    pub fleet: FleetSettings,
    #[serde(default, rename = "region")]
    pub regions: Vec<Region>,
    #[serde(default, rename = "link")]
    pub links: Vec<Link>,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeSpec>,
    /// Which group holds which records; by default the slots are split
    /// evenly over the groups the nodes name, at version 1.
    #[serde(default)]
    pub shard_map: Option<ShardMap>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FleetSettings {
    pub name: String,
    /// One-way latency between two nodes of one region.
    #[serde(default)]
    pub intra_region_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Region {
    pub name: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Link {
    pub between: [String; 2],
    /// One-way latency in milliseconds.
    pub ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeSpec {
    pub id: NodeId,
    pub region: String,
    /// The client API's address (HOST:PORT): TLS with the node's server
    /// certificate.
    pub addr: String,
    /// The peer listener's address (HOST:PORT): the node-to-node and
    /// operator APIs and forwarded client requests, over mutual TLS. Raft
    /// knows the node by this address.
    pub peer_addr: String,
    /// The replica group the node belongs to.
    #[serde(default = "first_group")]
    pub group: GroupId,
    /// The node's metrics listener (HOST:PORT, plain HTTP), for operator
    /// tools watching the fleet from elsewhere (`fleet status` and `fleet
    /// dashboard` with `--fleet-file`). The node itself ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

fn first_group() -> GroupId {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum FleetFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fleet file is not valid TOML: {0}")]
    Parse(String),
    #[error("fleet file is inconsistent: {0}")]
    Invalid(String),
}

impl FleetFile {
    pub fn load(path: &Path) -> Result<Self, FleetFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FleetFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks a fleet file: known regions, unique node ids and
    /// addresses (client and peer), links between known regions.
    pub fn parse(text: &str) -> Result<Self, FleetFileError> {
        let f: FleetFile =
            toml::from_str(text).map_err(|e| FleetFileError::Parse(e.to_string()))?;
        let regions: BTreeSet<&str> = f.regions.iter().map(|r| r.name.as_str()).collect();
        if regions.len() != f.regions.len() {
            return Err(FleetFileError::Invalid("a region is named twice".into()));
        }
        let mut ids = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for n in &f.nodes {
            if n.id == 0 || !ids.insert(n.id) {
                return Err(FleetFileError::Invalid(format!(
                    "node id {} is 0 or repeated",
                    n.id
                )));
            }
            for addr in [&n.addr, &n.peer_addr] {
                if !addrs.insert(addr.as_str()) {
                    return Err(FleetFileError::Invalid(format!(
                        "address {addr} is repeated"
                    )));
                }
            }
            if n.group == 0 {
                return Err(FleetFileError::Invalid(format!(
                    "node {} is in group 0 (reserved)",
                    n.id
                )));
            }
            if !regions.contains(n.region.as_str()) {
                return Err(FleetFileError::Invalid(format!(
                    "node {} is in unknown region {:?}",
                    n.id, n.region
                )));
            }
        }
        for l in &f.links {
            for r in &l.between {
                if !regions.contains(r.as_str()) {
                    return Err(FleetFileError::Invalid(format!(
                        "link names unknown region {r:?}"
                    )));
                }
            }
        }
        let map = f.shard_map();
        map.validate().map_err(FleetFileError::Invalid)?;
        let groups = f.groups();
        if let Some(g) = map.groups().iter().find(|g| !groups.contains(g)) {
            return Err(FleetFileError::Invalid(format!(
                "the shard map gives slots to group {g}, which has no node"
            )));
        }
        Ok(f)
    }

    /// The groups the nodes belong to.
    pub fn groups(&self) -> BTreeSet<GroupId> {
        self.nodes.iter().map(|n| n.group).collect()
    }

    /// The nodes of one group.
    pub fn group_nodes(&self, group: GroupId) -> impl Iterator<Item = &NodeSpec> {
        self.nodes.iter().filter(move |n| n.group == group)
    }

    /// The fleet's shard map: the declared one, or version 1 splitting the
    /// slots evenly over the groups.
    pub fn shard_map(&self) -> ShardMap {
        self.shard_map
            .clone()
            .unwrap_or_else(|| ShardMap::even(1, &self.groups().into_iter().collect::<Vec<_>>()))
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The longest round trip between two members of `group`, from the
    /// latency table.
    pub fn group_round_trip(&self, group: GroupId) -> Duration {
        let members: Vec<&NodeSpec> = self.group_nodes(group).collect();
        members
            .iter()
            .flat_map(|a| members.iter().map(move |b| (a, b)))
            .filter(|(a, b)| a.id != b.id)
            .map(|(a, b)| 2 * self.latency(&a.region, &b.region))
            .max()
            .unwrap_or_default()
    }

    /// One-way latency between two regions (the intra-region figure inside
    /// one; 0 when the table says nothing).
    pub fn latency(&self, a: &str, b: &str) -> Duration {
        if a == b {
            return Duration::from_millis(self.fleet.intra_region_ms);
        }
        let ms = self
            .links
            .iter()
            .find(|l| {
                (l.between[0] == a && l.between[1] == b) || (l.between[0] == b && l.between[1] == a)
            })
            .map_or(0, |l| l.ms);
        Duration::from_millis(ms)
    }
}

/// Runtime fault switches (the faults file, JSON).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Faults {
    /// Nodes cut off from every other node.
    #[serde(default)]
    pub isolated_nodes: BTreeSet<NodeId>,
    /// Regions cut off from the rest (nodes inside still reach each other).
    #[serde(default)]
    pub isolated_regions: BTreeSet<String>,
    /// Extra one-way delay on every message, in milliseconds.
    #[serde(default)]
    pub extra_delay_ms: u64,
    /// Share of messages dropped, in percent (0–100).
    #[serde(default)]
    pub drop_percent: u8,
}

/// What the transport asks before sending a message.
#[derive(Clone, Debug, Default)]
pub struct Geography {
    me: NodeId,
    fleet: Option<Arc<FleetFile>>,
    faults: Arc<RwLock<Faults>>,
}

/// The verdict for one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Deliver after this one-way delay.
    Deliver(Duration),
    /// The link is cut (partition) or the message is lost.
    Drop,
}

impl Geography {
    pub fn new(me: NodeId, fleet: Option<FleetFile>, faults_file: Option<PathBuf>) -> Self {
        let g = Geography {
            me,
            fleet: fleet.map(Arc::new),
            faults: Arc::new(RwLock::new(Faults::default())),
        };
        if let Some(path) = faults_file {
            let faults = Arc::clone(&g.faults);
            tokio::spawn(async move {
                let mut last = None;
                loop {
                    let text = tokio::fs::read_to_string(&path).await.ok();
                    if text != last {
                        let parsed = text
                            .as_deref()
                            .filter(|t| !t.trim().is_empty())
                            .map(serde_json::from_str::<Faults>)
                            .transpose();
                        match parsed {
                            Ok(f) => {
                                let f = f.unwrap_or_default();
                                tracing::info!(faults = ?f, "fault switches changed");
                                if let Ok(mut current) = faults.write() {
                                    *current = f;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "faults file is not valid JSON; ignored")
                            }
                        }
                        last = text;
                    }
                    tokio::time::sleep(FAULTS_POLL).await;
                }
            });
        }
        g
    }

    fn region(&self, id: NodeId) -> Option<&str> {
        self.fleet.as_ref()?.node(id).map(|n| n.region.as_str())
    }

    /// The route of a message from this node to `to`.
    pub fn route(&self, to: NodeId) -> Route {
        let faults = match self.faults.read() {
            Ok(f) => f.clone(),
            Err(_) => Faults::default(),
        };
        let (mine, theirs) = (self.region(self.me), self.region(to));
        let cut = faults.isolated_nodes.contains(&self.me)
            || faults.isolated_nodes.contains(&to)
            || (mine != theirs
                && (mine.is_some_and(|r| faults.isolated_regions.contains(r))
                    || theirs.is_some_and(|r| faults.isolated_regions.contains(r))));
        if cut {
            return Route::Drop;
        }
        if faults.drop_percent > 0 && rand::random::<u8>() % 100 < faults.drop_percent {
            return Route::Drop;
        }
        let base = match (&self.fleet, mine, theirs) {
            (Some(f), Some(a), Some(b)) => f.latency(a, b),
            _ => Duration::ZERO,
        };
        Route::Deliver(base + Duration::from_millis(faults.extra_delay_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = r#"
[fleet]
name = "t"
intra_region_ms = 2

[[region]]
name = "eu"
[[region]]
name = "us"

[[link]]
between = ["eu", "us"]
ms = 40

[[node]]
id = 1
region = "eu"
addr = "127.0.0.1:1"
peer_addr = "127.0.0.1:11"
[[node]]
id = 2
region = "eu"
addr = "127.0.0.1:2"
peer_addr = "127.0.0.1:21"
[[node]]
id = 3
region = "us"
addr = "127.0.0.1:3"
peer_addr = "127.0.0.1:31"
"#;

    fn geo(me: NodeId, faults: Faults) -> Geography {
        let g = Geography {
            me,
            fleet: Some(Arc::new(FleetFile::parse(FLEET).expect("fleet"))),
            faults: Arc::new(RwLock::new(Faults::default())),
        };
        *g.faults.write().expect("lock") = faults;
        g
    }

    #[test]
    fn latency_follows_the_region_table() {
        let g = geo(1, Faults::default());
        assert_eq!(g.route(2), Route::Deliver(Duration::from_millis(2)));
        assert_eq!(g.route(3), Route::Deliver(Duration::from_millis(40)));
    }

    #[test]
    fn switches_cut_nodes_and_regions() {
        let region_cut = Faults {
            isolated_regions: ["us".to_owned()].into(),
            ..Faults::default()
        };
        assert_eq!(geo(1, region_cut.clone()).route(3), Route::Drop);
        assert_eq!(geo(3, region_cut.clone()).route(1), Route::Drop);
        assert!(matches!(geo(1, region_cut).route(2), Route::Deliver(_)));
        let node_cut = Faults {
            isolated_nodes: [2].into(),
            ..Faults::default()
        };
        assert_eq!(geo(1, node_cut.clone()).route(2), Route::Drop);
        assert_eq!(geo(2, node_cut).route(3), Route::Drop);
        let all_lost = Faults {
            drop_percent: 100,
            ..Faults::default()
        };
        assert_eq!(geo(1, all_lost).route(2), Route::Drop);
    }

    #[test]
    fn groups_share_the_slots_unless_the_file_says_otherwise() {
        let two = FLEET.replace(
            "addr = \"127.0.0.1:3\"",
            "addr = \"127.0.0.1:3\"\ngroup = 2",
        );
        let f = FleetFile::parse(&two).expect("two groups");
        assert_eq!(f.groups(), [1, 2].into());
        assert_eq!(f.group_nodes(1).count(), 2);
        let map = f.shard_map();
        assert_eq!(
            (map.version, map.slots_of(1), map.slots_of(2)),
            (1, 32768, 32768)
        );
        let declared = format!(
            "{two}\n[shard_map]\nversion = 4\nrange = [{{ first = 0, last = 99, group = 2 }}, {{ first = 100, last = 65535, group = 1 }}]\n"
        );
        let map = FleetFile::parse(&declared)
            .expect("declared map")
            .shard_map();
        assert_eq!((map.version, map.slots_of(2)), (4, 100));
    }

    #[test]
    fn bad_fleet_files_are_refused() {
        for bad in [
            FLEET.replace("region = \"us\"\naddr", "region = \"mars\"\naddr"),
            FLEET.replace("id = 3", "id = 2"),
            FLEET.replace("127.0.0.1:3\"", "127.0.0.1:2\""),
            FLEET.replace("127.0.0.1:31", "127.0.0.1:2"),
            FLEET.replace("peer_addr = \"127.0.0.1:31\"\n", ""),
            FLEET.replace("addr = \"127.0.0.1:3\"", "addr = \"127.0.0.1:3\"\ngroup = 0"),
            format!("{FLEET}\n[shard_map]\nversion = 1\nrange = [{{ first = 0, last = 65535, group = 7 }}]\n"),
            format!("{FLEET}\n[shard_map]\nversion = 1\nrange = [{{ first = 0, last = 100, group = 1 }}]\n"),
            "not toml [".to_owned(),
        ] {
            assert!(FleetFile::parse(&bad).is_err(), "{bad}");
        }
    }
}

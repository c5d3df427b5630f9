//! The binary encoding of the replication's values (issue 15): log entries,
//! the messages between nodes, snapshot headers, and what the state machine
//! and the token store. Each value has a protobuf message in
//! `proto/vault/raft/v1/raft.proto` (prost); this module converts openraft's
//! and the vault's types to and from them. Decoding checks what the types
//! require (a record id of 32 bytes, a valid membership) and refuses the
//! rest with a [`WireError`].

use std::collections::{BTreeMap, BTreeSet};

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, StreamAppendError, StreamAppendResult,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, EntryPayload};
use prost::Message;
use vault_proto::vault::raft::v1 as pb;

use super::inbox::{ChunkAnswer, SnapshotChunk};
use super::{
    log_id, Command, Entry, ExportedRecord, LogId, SnapshotMeta, StoredMembership, TypeConfig, Vote,
};
use crate::shard::{ShardMap, SlotRange};

/// Bytes that do not decode to the value expected.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not a valid protobuf message: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{0}")]
    Invalid(String),
}

impl From<WireError> for std::io::Error {
    fn from(e: WireError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// A value with a binary encoding.
pub trait Wire: Sized {
    type Proto: Message + Default;
    fn to_proto(&self) -> Self::Proto;
    fn from_proto(proto: Self::Proto) -> Result<Self, WireError>;
}

/// The encoding of `value`.
pub fn encode<T: Wire>(value: &T) -> Vec<u8> {
    value.to_proto().encode_to_vec()
}

/// The value `bytes` encode.
pub fn decode<T: Wire>(bytes: &[u8]) -> Result<T, WireError> {
    T::from_proto(T::Proto::decode(bytes)?)
}

fn required<T>(field: Option<T>, name: &'static str) -> Result<T, WireError> {
    field.ok_or(WireError::Missing(name))
}

fn id32(bytes: &[u8], what: &str) -> Result<[u8; 32], WireError> {
    bytes
        .try_into()
        .map_err(|_| WireError::Invalid(format!("{what} is {} bytes, not 32", bytes.len())))
}

pub(crate) fn log_id_to(l: &LogId) -> pb::LogId {
    pb::LogId {
        term: l.leader_id.term,
        node: l.leader_id.node_id,
        index: l.index,
    }
}

pub(crate) fn log_id_from(p: pb::LogId) -> LogId {
    log_id(p.term, p.node, p.index)
}

pub(crate) fn opt_log_id_to(l: &Option<LogId>) -> Option<pb::LogId> {
    l.as_ref().map(log_id_to)
}

pub(crate) fn opt_log_id_from(p: Option<pb::LogId>) -> Option<LogId> {
    p.map(log_id_from)
}

pub(crate) fn vote_to(v: &Vote) -> pb::Vote {
    pb::Vote {
        term: v.leader_id.term,
        node: v.leader_id.node_id,
        committed: v.committed,
    }
}

pub(crate) fn vote_from(p: pb::Vote) -> Vote {
    if p.committed {
        Vote::new_committed(p.term, p.node)
    } else {
        Vote::new(p.term, p.node)
    }
}

fn vote_of(p: Option<pb::Vote>) -> Result<Vote, WireError> {
    required(p, "vote").map(vote_from)
}

type Membership = openraft::Membership<u64, BasicNode>;

fn membership_to(m: &Membership) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|set| pb::Voters {
                ids: set.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect(),
    }
}

fn membership_from(p: pb::Membership) -> Result<Membership, WireError> {
    if p.configs.is_empty() && p.nodes.is_empty() {
        return Ok(Membership::default());
    }
    let configs: Vec<BTreeSet<u64>> = p
        .configs
        .into_iter()
        .map(|v| v.ids.into_iter().collect())
        .collect();
    let nodes: BTreeMap<u64, BasicNode> = p
        .nodes
        .into_iter()
        .map(|(id, addr)| (id, BasicNode { addr }))
        .collect();
    Membership::new(configs, nodes).map_err(|e| WireError::Invalid(e.to_string()))
}

pub(crate) fn stored_membership_to(m: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: opt_log_id_to(m.log_id()),
        membership: Some(membership_to(m.membership())),
    }
}

pub(crate) fn stored_membership_from(
    p: pb::StoredMembership,
) -> Result<StoredMembership, WireError> {
    let membership = membership_from(p.membership.unwrap_or_default())?;
    Ok(StoredMembership::new(opt_log_id_from(p.log_id), membership))
}

impl Wire for StoredMembership {
    type Proto = pb::StoredMembership;
    fn to_proto(&self) -> pb::StoredMembership {
        stored_membership_to(self)
    }
    fn from_proto(p: pb::StoredMembership) -> Result<Self, WireError> {
        stored_membership_from(p)
    }
}

impl Wire for ShardMap {
    type Proto = pb::ShardMap;
    fn to_proto(&self) -> pb::ShardMap {
        pb::ShardMap {
            version: self.version,
            ranges: self
                .ranges
                .iter()
                .map(|r| pb::SlotRange {
                    first: u32::from(r.first),
                    last: u32::from(r.last),
                    group: r.group,
                })
                .collect(),
        }
    }
    fn from_proto(p: pb::ShardMap) -> Result<Self, WireError> {
        let slot = |s: u32| {
            u16::try_from(s).map_err(|_| WireError::Invalid(format!("slot {s} is out of range")))
        };
        let ranges = p
            .ranges
            .into_iter()
            .map(|r| {
                Ok(SlotRange {
                    first: slot(r.first)?,
                    last: slot(r.last)?,
                    group: r.group,
                })
            })
            .collect::<Result<_, WireError>>()?;
        Ok(ShardMap {
            version: p.version,
            ranges,
        })
    }
}

fn map_from(p: Option<pb::ShardMap>) -> Result<ShardMap, WireError> {
    ShardMap::from_proto(required(p, "shard map")?)
}

impl Wire for Command {
    type Proto = pb::Command;
    fn to_proto(&self) -> pb::Command {
        use pb::command::Kind;
        let kind = match self {
            Command::Put {
                id,
                expect,
                seq,
                sealed,
            } => Kind::Put(pb::command::Put {
                id: id.to_vec(),
                expect: *expect,
                seq: *seq,
                sealed: sealed.clone(),
            }),
            Command::Delete { id, expect } => Kind::Delete(pb::command::Delete {
                id: id.to_vec(),
                expect: *expect,
            }),
            Command::AdoptMap { map } => Kind::AdoptMap(map.to_proto()),
            Command::Freeze { map } => Kind::Freeze(map.to_proto()),
            Command::Import { map, records, last } => Kind::Import(pb::command::Import {
                map: Some(map.to_proto()),
                records: records
                    .iter()
                    .map(|(id, seq, sealed)| pb::ExportedRecord {
                        id: id.to_vec(),
                        seq: *seq,
                        sealed: sealed.clone(),
                    })
                    .collect(),
                last: *last,
            }),
            Command::Check { index, digest } => Kind::Check(pb::command::Check {
                index: *index,
                digest: digest.to_vec(),
            }),
        };
        pb::Command { kind: Some(kind) }
    }
    fn from_proto(p: pb::Command) -> Result<Self, WireError> {
        use pb::command::Kind;
        Ok(match required(p.kind, "command")? {
            Kind::Put(put) => Command::Put {
                id: id32(&put.id, "record id")?,
                expect: put.expect,
                seq: put.seq,
                sealed: put.sealed,
            },
            Kind::Delete(d) => Command::Delete {
                id: id32(&d.id, "record id")?,
                expect: d.expect,
            },
            Kind::AdoptMap(map) => Command::AdoptMap {
                map: ShardMap::from_proto(map)?,
            },
            Kind::Freeze(map) => Command::Freeze {
                map: ShardMap::from_proto(map)?,
            },
            Kind::Import(i) => Command::Import {
                map: map_from(i.map)?,
                records: i
                    .records
                    .into_iter()
                    .map(|r| -> Result<ExportedRecord, WireError> {
                        Ok((id32(&r.id, "record id")?, r.seq, r.sealed))
                    })
                    .collect::<Result<_, _>>()?,
                last: i.last,
            },
            Kind::Check(c) => Command::Check {
                index: c.index,
                digest: id32(&c.digest, "state digest")?,
            },
        })
    }
}

impl Wire for Entry {
    type Proto = pb::Entry;
    fn to_proto(&self) -> pb::Entry {
        use pb::entry::Payload;
        let payload = match &self.payload {
            EntryPayload::Blank => Payload::Blank(pb::Blank {}),
            EntryPayload::Normal(c) => Payload::Normal(c.to_proto()),
            EntryPayload::Membership(m) => Payload::Membership(membership_to(m)),
        };
        pb::Entry {
            log_id: Some(log_id_to(&self.log_id)),
            payload: Some(payload),
        }
    }
    fn from_proto(p: pb::Entry) -> Result<Self, WireError> {
        use pb::entry::Payload;
        let payload = match required(p.payload, "entry payload")? {
            Payload::Blank(_) => EntryPayload::Blank,
            Payload::Normal(c) => EntryPayload::Normal(Command::from_proto(c)?),
            Payload::Membership(m) => EntryPayload::Membership(membership_from(m)?),
        };
        Ok(Entry {
            log_id: log_id_from(required(p.log_id, "log id")?),
            payload,
        })
    }
}

impl Wire for AppendEntriesRequest<TypeConfig> {
    type Proto = pb::AppendEntriesRequest;
    fn to_proto(&self) -> pb::AppendEntriesRequest {
        pb::AppendEntriesRequest {
            vote: Some(vote_to(&self.vote)),
            prev_log_id: opt_log_id_to(&self.prev_log_id),
            entries: self.entries.iter().map(Wire::to_proto).collect(),
            leader_commit: opt_log_id_to(&self.leader_commit),
        }
    }
    fn from_proto(p: pb::AppendEntriesRequest) -> Result<Self, WireError> {
        Ok(AppendEntriesRequest {
            vote: vote_of(p.vote)?,
            prev_log_id: opt_log_id_from(p.prev_log_id),
            entries: p
                .entries
                .into_iter()
                .map(Entry::from_proto)
                .collect::<Result<_, _>>()?,
            leader_commit: opt_log_id_from(p.leader_commit),
        })
    }
}

impl Wire for VoteRequest<TypeConfig> {
    type Proto = pb::VoteRequest;
    fn to_proto(&self) -> pb::VoteRequest {
        pb::VoteRequest {
            vote: Some(vote_to(&self.vote)),
            last_log_id: opt_log_id_to(&self.last_log_id),
            leadership_transfer: self.leadership_transfer,
        }
    }
    fn from_proto(p: pb::VoteRequest) -> Result<Self, WireError> {
        let mut request = VoteRequest::new(vote_of(p.vote)?, opt_log_id_from(p.last_log_id));
        request.leadership_transfer = p.leadership_transfer;
        Ok(request)
    }
}

pub(crate) fn snapshot_meta_to(m: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: opt_log_id_to(&m.last_log_id),
        last_membership: Some(stored_membership_to(&m.last_membership)),
    }
}

pub(crate) fn snapshot_meta_from(p: pb::SnapshotMeta) -> Result<SnapshotMeta, WireError> {
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from(p.last_log_id),
        last_membership: stored_membership_from(p.last_membership.unwrap_or_default())?,
    })
}

impl Wire for SnapshotMeta {
    type Proto = pb::SnapshotMeta;
    fn to_proto(&self) -> pb::SnapshotMeta {
        snapshot_meta_to(self)
    }
    fn from_proto(p: pb::SnapshotMeta) -> Result<Self, WireError> {
        snapshot_meta_from(p)
    }
}

/// A chunk's header: its data travels beside it.
impl Wire for SnapshotChunk {
    type Proto = pb::SnapshotChunk;
    fn to_proto(&self) -> pb::SnapshotChunk {
        pb::SnapshotChunk {
            vote: Some(vote_to(&self.vote)),
            meta: Some(snapshot_meta_to(&self.meta)),
            transfer: self.transfer,
            offset: self.offset,
            done: self.done,
        }
    }
    fn from_proto(p: pb::SnapshotChunk) -> Result<Self, WireError> {
        Ok(SnapshotChunk {
            vote: vote_of(p.vote)?,
            meta: snapshot_meta_from(required(p.meta, "snapshot meta")?)?,
            transfer: p.transfer,
            offset: p.offset,
            done: p.done,
            data: Vec::new(),
        })
    }
}

/// A node's answer to a Raft request: the answer, or the text of the error
/// that stopped its Raft.
pub type Remote<T> = Result<T, String>;

/// An answer that travels inside [`pb::Answer`].
trait AnswerKind: Sized {
    fn wrap(&self) -> pb::answer::Kind;
    fn unwrap(kind: pb::answer::Kind) -> Result<Self, WireError>;
}

impl<T: AnswerKind> Wire for Remote<T> {
    type Proto = pb::Answer;
    fn to_proto(&self) -> pb::Answer {
        let kind = match self {
            Ok(answer) => answer.wrap(),
            Err(fatal) => pb::answer::Kind::Fatal(fatal.clone()),
        };
        pb::Answer { kind: Some(kind) }
    }
    fn from_proto(p: pb::Answer) -> Result<Self, WireError> {
        match required(p.kind, "answer")? {
            pb::answer::Kind::Fatal(fatal) => Ok(Err(fatal)),
            kind => T::unwrap(kind).map(Ok),
        }
    }
}

fn other_answer() -> WireError {
    WireError::Invalid("an answer to another kind of request".to_owned())
}

impl AnswerKind for AppendEntriesResponse<TypeConfig> {
    fn wrap(&self) -> pb::answer::Kind {
        use pb::append_entries_response::{Kind, PartialSuccess};
        let kind = match self {
            AppendEntriesResponse::Success => Kind::Success(pb::Blank {}),
            AppendEntriesResponse::PartialSuccess(matching) => {
                Kind::PartialSuccess(PartialSuccess {
                    matching: opt_log_id_to(matching),
                })
            }
            AppendEntriesResponse::Conflict => Kind::Conflict(pb::Blank {}),
            AppendEntriesResponse::HigherVote(v) => Kind::HigherVote(vote_to(v)),
        };
        pb::answer::Kind::Append(pb::AppendEntriesResponse { kind: Some(kind) })
    }
    fn unwrap(kind: pb::answer::Kind) -> Result<Self, WireError> {
        use pb::append_entries_response::Kind;
        let pb::answer::Kind::Append(a) = kind else {
            return Err(other_answer());
        };
        Ok(match required(a.kind, "append answer")? {
            Kind::Success(_) => AppendEntriesResponse::Success,
            Kind::PartialSuccess(p) => {
                AppendEntriesResponse::PartialSuccess(opt_log_id_from(p.matching))
            }
            Kind::Conflict(_) => AppendEntriesResponse::Conflict,
            Kind::HigherVote(v) => AppendEntriesResponse::HigherVote(vote_from(v)),
        })
    }
}

impl AnswerKind for StreamAppendResult<TypeConfig> {
    fn wrap(&self) -> pb::answer::Kind {
        use pb::stream_append_result::{Kind, Matched};
        let kind = match self {
            Ok(matching) => Kind::Matched(Matched {
                matching: opt_log_id_to(matching),
            }),
            Err(StreamAppendError::Conflict(l)) => Kind::Conflict(log_id_to(l)),
            Err(StreamAppendError::HigherVote(v)) => Kind::HigherVote(vote_to(v)),
        };
        pb::answer::Kind::StreamAppend(pb::StreamAppendResult { kind: Some(kind) })
    }
    fn unwrap(kind: pb::answer::Kind) -> Result<Self, WireError> {
        use pb::stream_append_result::Kind;
        let pb::answer::Kind::StreamAppend(a) = kind else {
            return Err(other_answer());
        };
        Ok(match required(a.kind, "stream answer")? {
            Kind::Matched(m) => Ok(opt_log_id_from(m.matching)),
            Kind::Conflict(l) => Err(StreamAppendError::Conflict(log_id_from(l))),
            Kind::HigherVote(v) => Err(StreamAppendError::HigherVote(vote_from(v))),
        })
    }
}

impl AnswerKind for VoteResponse<TypeConfig> {
    fn wrap(&self) -> pb::answer::Kind {
        pb::answer::Kind::Vote(pb::VoteResponse {
            vote: Some(vote_to(&self.vote)),
            vote_granted: self.vote_granted,
            last_log_id: opt_log_id_to(&self.last_log_id),
        })
    }
    fn unwrap(kind: pb::answer::Kind) -> Result<Self, WireError> {
        let pb::answer::Kind::Vote(v) = kind else {
            return Err(other_answer());
        };
        Ok(VoteResponse {
            vote: vote_of(v.vote)?,
            vote_granted: v.vote_granted,
            last_log_id: opt_log_id_from(v.last_log_id),
        })
    }
}

impl AnswerKind for ChunkAnswer {
    fn wrap(&self) -> pb::answer::Kind {
        use pb::chunk_answer::Kind;
        let kind = match self {
            ChunkAnswer::Taken { vote } => Kind::Taken(vote_to(vote)),
            ChunkAnswer::Resend { offset } => Kind::Resend(*offset),
            ChunkAnswer::Stopped(why) => Kind::Stopped(why.clone()),
        };
        pb::answer::Kind::Chunk(pb::ChunkAnswer { kind: Some(kind) })
    }
    fn unwrap(kind: pb::answer::Kind) -> Result<Self, WireError> {
        use pb::chunk_answer::Kind;
        let pb::answer::Kind::Chunk(c) = kind else {
            return Err(other_answer());
        };
        Ok(match required(c.kind, "chunk answer")? {
            Kind::Taken(v) => ChunkAnswer::Taken { vote: vote_from(v) },
            Kind::Resend(offset) => ChunkAnswer::Resend { offset },
            Kind::Stopped(why) => ChunkAnswer::Stopped(why),
        })
    }
}

/// The last entry a state machine applied.
impl Wire for Option<LogId> {
    type Proto = pb::Applied;
    fn to_proto(&self) -> pb::Applied {
        pb::Applied {
            log_id: opt_log_id_to(self),
        }
    }
    fn from_proto(p: pb::Applied) -> Result<Self, WireError> {
        Ok(opt_log_id_from(p.log_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put() -> Command {
        Command::Put {
            id: [0x11; 32],
            expect: Some(4),
            seq: 5,
            sealed: vec![0xaa, 0xbb],
        }
    }

    fn members() -> Membership {
        let voters = BTreeSet::from([1, 2, 3]);
        let nodes =
            [(1, "a"), (2, "b"), (3, "c")].map(|(id, addr)| (id, BasicNode { addr: addr.into() }));
        Membership::new(vec![voters], BTreeMap::from(nodes)).expect("a valid membership")
    }

    fn entry(index: u64, payload: EntryPayload<Command, u64, BasicNode>) -> Entry {
        Entry {
            log_id: log_id(3, 1, index),
            payload,
        }
    }

    /// A value's encoding, and the encoding of what that decodes to.
    type Encoded = (Vec<u8>, Vec<u8>);

    fn both<T: Wire>(value: &T) -> Encoded {
        let bytes = encode(value);
        let again = encode(&decode::<T>(&bytes).expect("an encoding decodes"));
        (bytes, again)
    }

    /// One value of each kind the replication encodes, with its name.
    fn samples() -> Vec<(&'static str, Encoded)> {
        let map = ShardMap::even(2, &[1, 2]);
        let commands = [
            put(),
            Command::Delete {
                id: [0x22; 32],
                expect: None,
            },
            Command::AdoptMap { map: map.clone() },
            Command::Freeze { map: map.clone() },
            Command::Import {
                map: map.clone(),
                records: vec![([0x33; 32], 9, vec![1, 2, 3])],
                last: true,
            },
            Command::Check {
                index: 12,
                digest: [0x44; 32],
            },
        ];
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(3, 1, 40)),
            last_membership: StoredMembership::new(Some(log_id(1, 1, 0)), members()),
        };
        let mut out = vec![
            ("entry blank", both(&entry(7, EntryPayload::Blank))),
            (
                "entry membership",
                both(&entry(0, EntryPayload::Membership(members()))),
            ),
        ];
        for (name, c) in ["put", "delete", "adopt map", "freeze", "import", "check"]
            .into_iter()
            .zip(commands)
        {
            out.push((name, both(&entry(8, EntryPayload::Normal(c)))));
        }
        out.extend([
            (
                "append entries",
                both(&AppendEntriesRequest::<TypeConfig> {
                    vote: Vote::new_committed(3, 1),
                    prev_log_id: Some(log_id(3, 1, 6)),
                    entries: vec![entry(7, EntryPayload::Blank)],
                    leader_commit: Some(log_id(3, 1, 6)),
                }),
            ),
            (
                "vote request",
                both(&VoteRequest::<TypeConfig>::new(
                    Vote::new(4, 2),
                    Some(log_id(3, 1, 7)),
                )),
            ),
            (
                "append success",
                both(&Ok::<_, String>(
                    AppendEntriesResponse::<TypeConfig>::Success,
                )),
            ),
            (
                "append partial",
                both(&Ok::<_, String>(
                    AppendEntriesResponse::<TypeConfig>::PartialSuccess(Some(log_id(3, 1, 7))),
                )),
            ),
            (
                "append conflict",
                both(&Ok::<_, String>(
                    AppendEntriesResponse::<TypeConfig>::Conflict,
                )),
            ),
            (
                "append higher vote",
                both(&Ok::<_, String>(
                    AppendEntriesResponse::<TypeConfig>::HigherVote(Vote::new(5, 3)),
                )),
            ),
            (
                "append fatal",
                both(&Err::<AppendEntriesResponse<TypeConfig>, _>(
                    "stopped".to_owned(),
                )),
            ),
            (
                "stream matched",
                both(&Ok::<StreamAppendResult<TypeConfig>, String>(Ok(Some(
                    log_id(3, 1, 7),
                )))),
            ),
            (
                "stream conflict",
                both(&Ok::<StreamAppendResult<TypeConfig>, String>(Err(
                    StreamAppendError::Conflict(log_id(3, 1, 6)),
                ))),
            ),
            (
                "stream higher vote",
                both(&Ok::<StreamAppendResult<TypeConfig>, String>(Err(
                    StreamAppendError::HigherVote(Vote::new(5, 3)),
                ))),
            ),
            (
                "vote response",
                both(&Ok::<_, String>(VoteResponse::<TypeConfig>::new(
                    Vote::new(4, 2),
                    Some(log_id(3, 1, 7)),
                    true,
                ))),
            ),
            (
                "chunk taken",
                both(&Ok::<_, String>(ChunkAnswer::Taken {
                    vote: Vote::new_committed(4, 2),
                })),
            ),
            (
                "chunk resend",
                both(&Ok::<_, String>(ChunkAnswer::Resend { offset: 65536 })),
            ),
            (
                "chunk stopped",
                both(&Ok::<_, String>(ChunkAnswer::Stopped("gone".into()))),
            ),
            (
                "snapshot chunk",
                both(&SnapshotChunk {
                    vote: Vote::new_committed(3, 1),
                    meta: meta.clone(),
                    transfer: 7,
                    offset: 16384,
                    done: false,
                    data: vec![9; 4],
                }),
            ),
            ("snapshot meta", both(&meta)),
            ("shard map", both(&map)),
            ("applied", both(&Some(log_id(3, 1, 7)))),
            ("applied none", both(&None::<LogId>)),
        ]);
        out
    }

    /// The encodings of [`samples`], in hex.
    const GOLDEN: [(&str, &str); 27] = [
        ("entry blank", "0a060803100118071200"),
        ("entry membership", "0a0408031001221c0a050a03010203120508011201611205080212016212050803120163"),
        ("put", "0a060803100118081a2c0a2a0a201111111111111111111111111111111111111111111111111111111111111111100418052202aabb"),
        ("delete", "0a060803100118081a2412220a202222222222222222222222222222222222222222222222222222222222222222"),
        ("adopt map", "0a060803100118081a181a160802120610ffff011801120a0880800210ffff031802"),
        ("freeze", "0a060803100118081a1822160802120610ffff011801120a0880800210ffff031802"),
        ("import", "0a060803100118081a472a450a160802120610ffff011801120a0880800210ffff03180212290a20333333333333333333333333333333333333333333333333333333333333333310091a030102031801"),
        ("check", "0a060803100118081a263224080c12204444444444444444444444444444444444444444444444444444444444444444"),
        ("append entries", "0a0608031001180112060803100118061a0a0a0608031001180712002206080310011806"),
        ("vote request", "0a04080410021206080310011807"),
        ("append success", "0a020a00"),
        ("append partial", "0a0a12080a06080310011807"),
        ("append conflict", "0a021a00"),
        ("append higher vote", "0a06220408051003"),
        ("append fatal", "2a0773746f70706564"),
        ("stream matched", "120a0a080a06080310011807"),
        ("stream conflict", "12081206080310011806"),
        ("stream higher vote", "12061a0408051003"),
        ("vote response", "1a100a040804100210011a06080310011807"),
        ("chunk taken", "22080a06080410021801"),
        ("chunk resend", "220410808004"),
        ("chunk stopped", "22061a04676f6e65"),
        ("snapshot chunk", "0a06080310011801122e0a0608031001182812240a0408011001121c0a050a03010203120508011201611205080212016212050803120163180720808001"),
        ("snapshot meta", "0a0608031001182812240a0408011001121c0a050a03010203120508011201611205080212016212050803120163"),
        ("shard map", "0802120610ffff011801120a0880800210ffff031802"),
        ("applied", "0a06080310011807"),
        ("applied none", ""),
    ];

    /// Every encoding is pinned: a change here means that stored logs,
    /// state machine values and snapshots no longer read back, and that
    /// nodes of the new version no longer talk with the old. Each decodes
    /// back to the same value.
    #[test]
    fn each_encoding_is_pinned_and_decodes_back() {
        let samples = samples();
        assert_eq!(samples.len(), GOLDEN.len());
        for ((name, (bytes, again)), (golden_name, golden)) in samples.into_iter().zip(GOLDEN) {
            assert_eq!(name, golden_name);
            assert_eq!(hex::encode(&bytes), golden, "{name}");
            assert_eq!(again, bytes, "{name}: decoding changed the value");
        }
    }

    /// A record id or a digest of another length, a missing vote, an
    /// invalid membership: refused, not guessed at.
    #[test]
    fn a_value_the_types_cannot_hold_is_refused() {
        let short_id = pb::Command {
            kind: Some(pb::command::Kind::Delete(pb::command::Delete {
                id: vec![1; 31],
                expect: None,
            })),
        };
        assert!(decode::<Command>(&short_id.encode_to_vec()).is_err());
        let no_vote = pb::AppendEntriesRequest::default();
        assert!(decode::<AppendEntriesRequest<TypeConfig>>(&no_vote.encode_to_vec()).is_err());
        let learner_only_voters = pb::Membership {
            configs: vec![pb::Voters { ids: vec![9] }],
            nodes: BTreeMap::from([(1, "a".to_owned())]),
        };
        let entry = pb::Entry {
            log_id: Some(pb::LogId::default()),
            payload: Some(pb::entry::Payload::Membership(learner_only_voters)),
        };
        assert!(decode::<Entry>(&entry.encode_to_vec()).is_err());
        assert!(decode::<Entry>(&[0xff, 0xff]).is_err());
        let vote_answer = Ok::<_, String>(VoteResponse::<TypeConfig>::new(
            Vote::new(4, 2),
            None,
            false,
        ));
        assert!(
            decode::<Remote<AppendEntriesResponse<TypeConfig>>>(&encode(&vote_answer)).is_err(),
            "an answer to another kind of request"
        );
    }
}

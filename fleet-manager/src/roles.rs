//! Who leads each group, from the nodes' `GetInfo` answers.
//!
//! A node's own claim is not enough: openraft restores a restarted former
//! leader as leader of its old term, and a leader cut off from its group
//! keeps claiming until it learns of a newer term. Both would show as a
//! second leader. A group's leader is therefore the node that claims to
//! lead and that a majority of its voters name as their leader; another
//! node that claims to lead is shown as `unconfirmed`.

use std::collections::BTreeMap;

use vault_proto::vault::v1 as pb;

/// One node's answer: its id, its group and what it said.
pub type Answer<'a> = (u64, u64, &'a pb::GetInfoResponse);

/// Per group, the id of the leader a majority of its voters acknowledge
/// (groups without one are absent).
pub fn acknowledged_leaders<'a>(
    answers: &[Answer<'a>],
) -> BTreeMap<u64, (u64, &'a pb::GetInfoResponse)> {
    let mut leaders = BTreeMap::new();
    for &(id, group, claim) in answers {
        if claim.leader_id != id || claim.voters.is_empty() {
            continue;
        }
        let acknowledged = answers
            .iter()
            .filter(|(other, g, info)| {
                *g == group && info.leader_id == id && claim.voters.contains(other)
            })
            .count();
        if 2 * acknowledged > claim.voters.len() {
            leaders.insert(group, (id, claim));
        }
    }
    leaders
}

/// A node's role: `no-leader`, `leader`, `unconfirmed` (claims to lead, not
/// acknowledged by a majority), `learner` (not a voter of the acknowledged
/// leader's membership) or `follower`.
pub fn role(
    id: u64,
    info: &pb::GetInfoResponse,
    leader: Option<(u64, &pb::GetInfoResponse)>,
) -> &'static str {
    match (info.leader_id, leader) {
        (0, _) => "no-leader",
        (l, Some((acknowledged, _))) if l == id && acknowledged == id => "leader",
        (l, _) if l == id => "unconfirmed",
        (_, Some((_, by))) if !by.voters.contains(&id) => "learner",
        _ => "follower",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(leader_id: u64, voters: &[u64]) -> pb::GetInfoResponse {
        pb::GetInfoResponse {
            leader_id,
            voters: voters.to_vec(),
            ..pb::GetInfoResponse::default()
        }
    }

    #[test]
    fn a_restarted_former_leader_is_unconfirmed_and_the_acknowledged_one_leads() {
        // Node 1 came back claiming its old term; 2 leads, 3 follows 2.
        let (a, b, c) = (
            info(1, &[1, 2, 3]),
            info(2, &[1, 2, 3]),
            info(2, &[1, 2, 3]),
        );
        let answers = [(1, 7, &a), (2, 7, &b), (3, 7, &c)];
        let leaders = acknowledged_leaders(&answers);
        assert_eq!(leaders.get(&7).map(|(id, _)| *id), Some(2));
        let leader = leaders.get(&7).copied();
        assert_eq!(role(1, &a, leader), "unconfirmed");
        assert_eq!(role(2, &b, leader), "leader");
        assert_eq!(role(3, &c, leader), "follower");
    }

    #[test]
    fn a_claim_without_a_majority_leads_nothing() {
        // Two of five name node 1: not a majority of its five voters.
        let v = [1, 2, 3, 4, 5];
        let (a, b, c) = (info(1, &v), info(1, &v), info(0, &v));
        let answers = [(1, 1, &a), (2, 1, &b), (3, 1, &c)];
        let leaders = acknowledged_leaders(&answers);
        assert!(leaders.is_empty());
        assert_eq!(role(1, &a, None), "unconfirmed");
        assert_eq!(role(3, &c, None), "no-leader");
        // Answers from another group do not count towards this one.
        let d = info(1, &v);
        let answers = [(1, 1, &a), (2, 1, &b), (4, 2, &d)];
        assert!(acknowledged_leaders(&answers).is_empty());
    }

    #[test]
    fn a_lone_voter_leads_and_a_non_voter_is_a_learner() {
        let (a, b) = (info(1, &[1]), info(1, &[1]));
        let answers = [(1, 3, &a), (2, 3, &b)];
        let leaders = acknowledged_leaders(&answers);
        let leader = leaders.get(&3).copied();
        assert_eq!(leader.map(|(id, _)| id), Some(1));
        assert_eq!(role(1, &a, leader), "leader");
        assert_eq!(role(2, &b, leader), "learner");
    }
}

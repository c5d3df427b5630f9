//! The operator's API on a node: the source side of a cloning ceremony and
//! membership changes. Every request is signed by the operator's key and
//! fresh (`vault_proto::operator`); nothing here reveals a secret.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::{BasicNode, Raft};
use p256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use vault_proto::operator;
use vault_proto::vault::node::v1 as pb;
use vault_proto::vault::node::v1::operator_server::Operator;
use zeroize::Zeroizing;

use super::{NodeId, TypeConfig};
use crate::partition::Partition;

/// Body of `ExportKeys`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportKeys {
    /// The target token's ephemeral transport public key (hex SEC1).
    pub transport: String,
}

/// Body of `AddLearner`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddLearner {
    pub id: NodeId,
    pub addr: String,
}

/// Body of `ChangeMembership`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChangeMembership {
    pub voters: BTreeSet<NodeId>,
}

/// The operator service of one node.
#[derive(Clone)]
pub struct OperatorService {
    pub raft: Raft<TypeConfig>,
    pub partition: Arc<Partition>,
    pub operator_key: VerifyingKey,
    /// This token's user PIN, kept to log the user back in after the
    /// ceremony's security-officer step.
    pub user_pin: Arc<Zeroizing<String>>,
    /// The token's SO PIN file; without it this node cannot be a ceremony
    /// source.
    pub so_pin_file: Option<PathBuf>,
}

impl std::fmt::Debug for OperatorService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorService").finish_non_exhaustive()
    }
}

impl OperatorService {
    fn check<T: for<'de> Deserialize<'de>>(
        &self,
        kind: &str,
        req: &pb::OperatorRequest,
    ) -> Result<T, Status> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        operator::verify(
            &self.operator_key,
            kind,
            req.issued_at,
            &req.body,
            &req.signature,
            now,
        )
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
        serde_json::from_slice(&req.body)
            .map_err(|e| Status::invalid_argument(format!("malformed {kind} body: {e}")))
    }
}

fn reply<T: Serialize>(v: &T) -> Result<Response<pb::OperatorReply>, Status> {
    Ok(Response::new(pb::OperatorReply {
        body: serde_json::to_vec(v).map_err(|e| Status::internal(e.to_string()))?,
    }))
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn export_keys(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::OperatorReply>, Status> {
        let body: ExportKeys = self.check("ExportKeys", request.get_ref())?;
        let transport = hex::decode(&body.transport)
            .map_err(|_| Status::invalid_argument("transport key is not hex"))?;
        let so_pin_file = self.so_pin_file.clone().ok_or_else(|| {
            Status::failed_precondition("this node has no SO PIN: it cannot be a ceremony source")
        })?;
        let partition = Arc::clone(&self.partition);
        let user_pin = Arc::clone(&self.user_pin);
        let package = tokio::task::spawn_blocking(move || {
            let so_pin =
                Zeroizing::new(std::fs::read_to_string(&so_pin_file).map_err(|e| e.to_string())?);
            partition
                .export_for_clone(so_pin.trim(), user_pin.as_str(), &transport)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| Status::internal("worker failed"))?
        .map_err(|e| Status::failed_precondition(format!("ceremony failed: {e}")))?;
        tracing::info!("domain keys exported for an operator-vouched transport key");
        reply(&package)
    }

    async fn add_learner(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::OperatorReply>, Status> {
        let body: AddLearner = self.check("AddLearner", request.get_ref())?;
        self.raft
            .add_learner(body.id, BasicNode::new(body.addr), true)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        tracing::info!(node = body.id, "learner added");
        reply(&"ok")
    }

    async fn change_membership(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::OperatorReply>, Status> {
        let body: ChangeMembership = self.check("ChangeMembership", request.get_ref())?;
        if body.voters.is_empty() {
            return Err(Status::invalid_argument("a group needs at least one voter"));
        }
        self.raft
            .change_membership(body.voters.clone(), false)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        tracing::info!(voters = ?body.voters, "membership changed");
        reply(&"ok")
    }
}

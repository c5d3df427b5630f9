//! Client SDK for the HSM-backed backup key vault.
//!
//! - [`VaultClient`] registers, recovers and deletes a 32-byte backup key.
//!   The secret the vault stores is the backup key wrapped under the OPAQUE
//!   export key, so the vault never holds the plaintext backup key, and the
//!   client refuses a vault whose OPAQUE public key differs from the pinned
//!   one. It talks to the vault over TLS ([`VaultClient::connect_tls`],
//!   `https://`, the vault's certificate checked against the fleet CA);
//!   plaintext (`http://`) only when asked for by name
//!   ([`VaultClient::connect_plaintext`], development vaults).
//! - [`backup`] encrypts and decrypts backup files.

#![forbid(unsafe_code)]

pub mod backup;

use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, RegistrationResponse,
};
use rand::rngs::OsRng;
use rand::RngCore;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request};
use vault_proto::suite::{
    benchmark_ksf, client_ksf, open_with, seal_with, Suite, RELEASE_AAD, RELEASE_INFO, SUITE_NAME,
    WRAP_AAD, WRAP_INFO,
};
use vault_proto::vault::v1 as pb;
use vault_proto::vault::v1::vault_client::VaultClient as PbClient;
use zeroize::Zeroizing;

pub use backup::BackupKey;

/// What went wrong, phrased for the person at the keyboard.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("vault unreachable at {endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("{0}")]
    BadEndpoint(String),
    /// The guess was wrong and stays counted. The vault does not say how
    /// many remain to whoever asks (a count would tell a real account from
    /// an unknown one); the owner sees it with [`VaultClient::status`].
    #[error(
        "wrong password: the guess was counted; the account's owner can see how many \
         remain (`vault status`)"
    )]
    WrongPassword,
    #[error("locked: too many wrong passwords, the key has been destroyed for good")]
    Locked,
    #[error("this vault's public key does not match the pinned key; refusing to talk to it")]
    KeyMismatch,
    #[error("vault speaks cipher suite {0:?}, this client only {SUITE_NAME:?}")]
    WrongSuite(String),
    #[error("not authorized: {0}")]
    Unauthenticated(String),
    #[error("bad key format: {0}")]
    BadKey(String),
    #[error("vault answered {code:?}: {message}")]
    Vault { code: Code, message: String },
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            Code::Unauthenticated => ClientError::Unauthenticated(s.message().to_owned()),
            code => ClientError::Vault {
                code,
                message: s.message().to_owned(),
            },
        }
    }
}

/// The owner's view of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordStatus {
    NotRegistered,
    Registered {
        guesses_remaining: u32,
        max_guesses: u32,
    },
    Locked,
}

/// Parses a published vault public key file (hex SEC1 compressed).
pub fn parse_pinned_key(text: &str) -> Result<[u8; 33], ClientError> {
    let bytes = hex::decode(text.trim())
        .map_err(|_| ClientError::BadKey("vault public key file is not hex".into()))?;
    bytes
        .try_into()
        .map_err(|_| ClientError::BadKey("vault public key must be 33 bytes".into()))
}

fn bearer<T>(message: T, token: &str) -> Result<Request<T>, ClientError> {
    let mut req = Request::new(message);
    let mut header = Zeroizing::new(String::with_capacity(7 + token.len()));
    header.push_str("Bearer ");
    header.push_str(token);
    let value = header.parse().map_err(|_| {
        ClientError::Unauthenticated("bearer token is not valid header text".into())
    })?;
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

/// How the client reaches the vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TLS (`https://` endpoints): the vault's server certificate must chain
    /// to this CA certificate (PEM) and name the endpoint's host.
    Tls { ca_pem: Vec<u8> },
    /// Plaintext (`http://` endpoints): development vaults only.
    Plaintext,
}

impl Transport {
    /// A gRPC channel to `endpoint`, whose scheme must match the transport.
    pub async fn channel(&self, endpoint: &str) -> Result<Channel, ClientError> {
        let unreachable = |detail: String| ClientError::Unreachable {
            endpoint: endpoint.to_owned(),
            detail,
        };
        let e = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| ClientError::BadEndpoint(format!("{endpoint:?}: {e}")))?;
        let e = match (self, e.uri().scheme_str()) {
            (Transport::Tls { ca_pem }, Some("https")) => e
                .tls_config(
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem.clone())),
                )
                .map_err(|e| unreachable(error_chain(&e)))?,
            (Transport::Plaintext, Some("http")) => e,
            (Transport::Tls { .. }, _) => {
                return Err(ClientError::BadEndpoint(format!(
                    "{endpoint} is not an https:// endpoint: TLS needs one"
                )))
            }
            (Transport::Plaintext, _) => {
                return Err(ClientError::BadEndpoint(format!(
                    "{endpoint} is not an http:// endpoint: plaintext needs one"
                )))
            }
        };
        e.connect_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| unreachable(error_chain(&e)))
    }
}

/// An error and its causes, as one line ("transport error" alone does not
/// say that a certificate was refused).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// A connection to one vault, pinned to its OPAQUE public key.
#[derive(Debug, Clone)]
pub struct VaultClient {
    rpc: PbClient<Channel>,
    pinned: [u8; 33],
    stretching: KeyStretching,
}

/// How the client stretches the password before OPAQUE uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyStretching {
    /// The suite's Argon2id parameters ([`client_ksf`]): every real client.
    #[default]
    Suite,
    /// Argon2id at its smallest cost ([`benchmark_ksf`]), for load
    /// generators that measure the vault rather than the client. Records
    /// registered this way recover only this way.
    MinimalForBenchmarks,
}

impl KeyStretching {
    fn ksf(self) -> argon2::Argon2<'static> {
        match self {
            KeyStretching::Suite => client_ksf(),
            KeyStretching::MinimalForBenchmarks => benchmark_ksf(),
        }
    }
}

/// A login whose KE2 the vault released, before the client's KE3.
struct Login {
    login_id: Vec<u8>,
    ke3: Option<Vec<u8>>,
    session_key: Zeroizing<Vec<u8>>,
    export_key: Zeroizing<Vec<u8>>,
}

impl VaultClient {
    /// Connects over TLS to an `https://` endpoint whose certificate chains
    /// to `ca_pem` (the fleet CA, PEM), and checks the vault's suite and
    /// public key against the pin.
    pub async fn connect_tls(
        endpoint: &str,
        ca_pem: &[u8],
        pinned: [u8; 33],
    ) -> Result<Self, ClientError> {
        let transport = Transport::Tls {
            ca_pem: ca_pem.to_vec(),
        };
        Self::connect(endpoint, &transport, pinned).await
    }

    /// Connects without TLS to an `http://` endpoint: development vaults
    /// only (bearer tokens and OPAQUE messages travel in the clear).
    pub async fn connect_plaintext(endpoint: &str, pinned: [u8; 33]) -> Result<Self, ClientError> {
        Self::connect(endpoint, &Transport::Plaintext, pinned).await
    }

    /// Connects with `transport` and checks the vault's suite and public
    /// key against the pin.
    pub async fn connect(
        endpoint: &str,
        transport: &Transport,
        pinned: [u8; 33],
    ) -> Result<Self, ClientError> {
        let mut rpc = PbClient::new(transport.channel(endpoint).await?);
        let info = rpc
            .get_info(pb::GetInfoRequest {})
            .await
            .map_err(|e| ClientError::Unreachable {
                endpoint: endpoint.to_owned(),
                detail: e.message().to_owned(),
            })?
            .into_inner();
        if info.cipher_suite != SUITE_NAME {
            return Err(ClientError::WrongSuite(info.cipher_suite));
        }
        if info.server_public_key != pinned {
            return Err(ClientError::KeyMismatch);
        }
        Ok(VaultClient {
            rpc,
            pinned,
            stretching: KeyStretching::Suite,
        })
    }

    /// Uses `stretching` for the password from now on.
    pub fn with_key_stretching(mut self, stretching: KeyStretching) -> Self {
        self.stretching = stretching;
        self
    }

    /// Registers `key` under `password` for `account`, replacing any
    /// earlier record. Returns the guess limit the vault applied.
    pub async fn register_key(
        &mut self,
        account: &[u8],
        token: &str,
        password: &[u8],
        key: &BackupKey,
        max_guesses: u32,
    ) -> Result<u32, ClientError> {
        let start = ClientRegistration::<Suite>::start(&mut OsRng, password)
            .map_err(|_| ClientError::Protocol("registration start"))?;
        let response = self
            .rpc
            .register_start(bearer(
                pb::RegisterStartRequest {
                    account_id: account.to_vec(),
                    registration_request: start.message.serialize().to_vec(),
                },
                token,
            )?)
            .await?
            .into_inner();
        let registration_id = response.registration_id;
        let response = RegistrationResponse::deserialize(&response.registration_response)
            .map_err(|_| ClientError::Protocol("registration response"))?;
        let ksf = self.stretching.ksf();
        let finish = start
            .state
            .finish(
                &mut OsRng,
                password,
                response,
                ClientRegistrationFinishParameters::new(Default::default(), Some(&ksf)),
            )
            .map_err(|_| ClientError::Protocol("registration response"))?;
        if finish.server_s_pk.serialize().as_slice() != self.pinned {
            return Err(ClientError::KeyMismatch);
        }
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let wrapped = seal_with(
            &finish.export_key,
            WRAP_INFO,
            WRAP_AAD,
            nonce,
            key.0.as_ref(),
        );
        let done = self
            .rpc
            .register_finish(bearer(
                pb::RegisterFinishRequest {
                    account_id: account.to_vec(),
                    registration_upload: finish.message.serialize().to_vec(),
                    secret: wrapped,
                    max_guesses,
                    registration_id,
                },
                token,
            )?)
            .await?
            .into_inner();
        Ok(done.max_guesses)
    }

    /// Runs KE1 → KE2 and the client's side of the login. A wrong password
    /// yields `ke3: None`.
    async fn login(&mut self, account: &[u8], password: &[u8]) -> Result<Login, ClientError> {
        let start = ClientLogin::<Suite>::start(&mut OsRng, password)
            .map_err(|_| ClientError::Protocol("login start"))?;
        let answer = self
            .rpc
            .recover_start(pb::RecoverStartRequest {
                account_id: account.to_vec(),
                ke1: start.message.serialize().to_vec(),
            })
            .await?
            .into_inner();
        let challenge = match answer.outcome {
            Some(pb::recover_start_response::Outcome::Challenge(c)) => c,
            Some(pb::recover_start_response::Outcome::Locked(_)) => {
                return Err(ClientError::Locked)
            }
            None => return Err(ClientError::Protocol("empty recovery answer")),
        };
        let ke2 = CredentialResponse::deserialize(&challenge.ke2)
            .map_err(|_| ClientError::Protocol("KE2"))?;
        let ksf = self.stretching.ksf();
        let finished = start.state.finish(
            &mut OsRng,
            password,
            ke2,
            ClientLoginFinishParameters::new(None, Default::default(), Some(&ksf)),
        );
        let mut login = Login {
            login_id: challenge.login_id,
            ke3: None,
            session_key: Zeroizing::new(Vec::new()),
            export_key: Zeroizing::new(Vec::new()),
        };
        if let Ok(f) = finished {
            if f.server_s_pk.serialize().as_slice() != self.pinned {
                // Give the login up so it does not linger, then refuse.
                let _ = self.abandon(&login.login_id).await;
                return Err(ClientError::KeyMismatch);
            }
            login.ke3 = Some(f.message.serialize().to_vec());
            login.session_key = Zeroizing::new(f.session_key.to_vec());
            login.export_key = Zeroizing::new(f.export_key.to_vec());
        }
        Ok(login)
    }

    /// Tells the vault the client gives up on a login (empty KE3).
    async fn abandon(&mut self, login_id: &[u8]) -> Result<ClientError, ClientError> {
        let answer = self
            .rpc
            .recover_finish(pb::RecoverFinishRequest {
                login_id: login_id.to_vec(),
                ke3: Vec::new(),
            })
            .await?
            .into_inner();
        Ok(match answer.outcome {
            Some(pb::recover_finish_response::Outcome::WrongPassword(_)) => {
                ClientError::WrongPassword
            }
            Some(pb::recover_finish_response::Outcome::Locked(_)) => ClientError::Locked,
            _ => ClientError::Protocol("unexpected answer to an abandoned login"),
        })
    }

    /// Recovers the key registered for `account`. Each call spends one of
    /// the record's guesses until it succeeds.
    pub async fn recover_key(
        &mut self,
        account: &[u8],
        password: &[u8],
    ) -> Result<BackupKey, ClientError> {
        let login = self.login(account, password).await?;
        let Some(ke3) = login.ke3.clone() else {
            return Err(self.abandon(&login.login_id).await?);
        };
        let answer = self
            .rpc
            .recover_finish(pb::RecoverFinishRequest {
                login_id: login.login_id.clone(),
                ke3,
            })
            .await?
            .into_inner();
        match answer.outcome {
            Some(pb::recover_finish_response::Outcome::Recovered(r)) => {
                let mut sealed = r.nonce;
                sealed.extend_from_slice(&r.sealed_secret);
                let wrapped = open_with(&login.session_key, RELEASE_INFO, RELEASE_AAD, &sealed)
                    .map_err(|_| ClientError::Protocol("released secret does not authenticate"))?;
                let key = open_with(&login.export_key, WRAP_INFO, WRAP_AAD, &wrapped)
                    .map_err(|_| ClientError::Protocol("stored key does not unwrap"))?;
                if key.len() != 32 {
                    return Err(ClientError::Protocol("stored key has the wrong length"));
                }
                // Straight into its wiped home: no copy on the stack.
                let mut out = BackupKey(Zeroizing::new([0u8; 32]));
                out.0.copy_from_slice(&key);
                Ok(out)
            }
            Some(pb::recover_finish_response::Outcome::WrongPassword(_)) => {
                Err(ClientError::WrongPassword)
            }
            Some(pb::recover_finish_response::Outcome::Locked(_)) => Err(ClientError::Locked),
            None => Err(ClientError::Protocol("empty recovery answer")),
        }
    }

    /// Deletes the account's record; needs the owner's token and the
    /// password.
    pub async fn delete(
        &mut self,
        account: &[u8],
        token: &str,
        password: &[u8],
    ) -> Result<(), ClientError> {
        let login = self.login(account, password).await?;
        let Some(ke3) = login.ke3.clone() else {
            return Err(self.abandon(&login.login_id).await?);
        };
        let answer = self
            .rpc
            .delete(bearer(
                pb::DeleteRequest {
                    account_id: account.to_vec(),
                    login_id: login.login_id,
                    ke3,
                },
                token,
            )?)
            .await?
            .into_inner();
        match answer.outcome {
            Some(pb::delete_response::Outcome::Deleted(_)) => Ok(()),
            Some(pb::delete_response::Outcome::WrongPassword(_)) => Err(ClientError::WrongPassword),
            Some(pb::delete_response::Outcome::Locked(_)) => Err(ClientError::Locked),
            None => Err(ClientError::Protocol("empty deletion answer")),
        }
    }

    /// The owner's view of the account's record.
    pub async fn status(
        &mut self,
        account: &[u8],
        token: &str,
    ) -> Result<RecordStatus, ClientError> {
        use pb::status_response::State;
        let s = self
            .rpc
            .status(bearer(
                pb::StatusRequest {
                    account_id: account.to_vec(),
                },
                token,
            )?)
            .await?
            .into_inner();
        Ok(match State::try_from(s.state) {
            Ok(State::Registered) => RecordStatus::Registered {
                guesses_remaining: s.guesses_remaining,
                max_guesses: s.max_guesses,
            },
            Ok(State::Locked) => RecordStatus::Locked,
            _ => RecordStatus::NotRegistered,
        })
    }

    /// The raw gRPC client, for tests that send malformed messages.
    pub fn raw(&mut self) -> &mut PbClient<Channel> {
        &mut self.rpc
    }
}

//! Invariant 6: nothing readable outside the token. Known test secrets are
//! searched for, byte for byte, in everything the vault wrote.

use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, RegistrationResponse,
};
use rand::rngs::OsRng;
use vault_e2e::{all_bytes, contains, VaultNode};
use vault_proto::suite::{client_ksf, open_with, Suite, RELEASE_AAD, RELEASE_INFO};
use vault_proto::vault::v1 as pb;

const ACCOUNT: &str = "secret-owner@example.org";
const PASSWORD: &[u8] = b"Pa55word-that-must-never-appear";
const SECRET: &[u8] = b"STORED-SECRET-MARKER-0123456789abcdef-must-never-appear-in-the-clear";

fn authed<T>(token: &str, m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant6_no_plaintext_secret_in_store_or_logs() {
    let mut node = VaultNode::start("secrets");
    let mut c = node.client().await;
    let ksf = client_ksf();
    let token = node.bearer(ACCOUNT);

    // Register by hand so the test knows the exact password file and secret.
    let start = ClientRegistration::<Suite>::start(&mut OsRng, PASSWORD).expect("start");
    let response = c
        .raw()
        .register_start(authed(
            &token,
            pb::RegisterStartRequest {
                account_id: ACCOUNT.as_bytes().to_vec(),
                registration_request: start.message.serialize().to_vec(),
            },
        ))
        .await
        .expect("register start")
        .into_inner();
    let finish = start
        .state
        .finish(
            &mut OsRng,
            PASSWORD,
            RegistrationResponse::deserialize(&response.registration_response).expect("response"),
            ClientRegistrationFinishParameters::new(Default::default(), Some(&ksf)),
        )
        .expect("finish");
    let password_file = finish.message.serialize().to_vec();
    c.raw()
        .register_finish(authed(
            &token,
            pb::RegisterFinishRequest {
                account_id: ACCOUNT.as_bytes().to_vec(),
                registration_upload: password_file.clone(),
                secret: SECRET.to_vec(),
                max_guesses: 0,
                registration_id: response.registration_id.clone(),
            },
        ))
        .await
        .expect("register finish");

    // A wrong guess and a successful recovery, so every path has logged.
    for password in [&b"wrong"[..], PASSWORD] {
        let login = ClientLogin::<Suite>::start(&mut OsRng, password).expect("login");
        let answer = c
            .raw()
            .recover_start(pb::RecoverStartRequest {
                account_id: ACCOUNT.as_bytes().to_vec(),
                ke1: login.message.serialize().to_vec(),
            })
            .await
            .expect("start")
            .into_inner();
        let Some(pb::recover_start_response::Outcome::Challenge(ch)) = answer.outcome else {
            panic!("expected a challenge");
        };
        let ke2 = CredentialResponse::deserialize(&ch.ke2).expect("ke2");
        let done = login.state.finish(
            &mut OsRng,
            password,
            ke2,
            ClientLoginFinishParameters::new(None, Default::default(), Some(&ksf)),
        );
        let (ke3, session_key) = match &done {
            Ok(f) => (f.message.serialize().to_vec(), Some(f.session_key.to_vec())),
            Err(_) => (Vec::new(), None),
        };
        let out = c
            .raw()
            .recover_finish(pb::RecoverFinishRequest {
                login_id: ch.login_id,
                ke3,
            })
            .await
            .expect("finish")
            .into_inner();
        if let (Some(sk), Some(pb::recover_finish_response::Outcome::Recovered(r))) =
            (session_key, out.outcome)
        {
            let mut sealed = r.nonce;
            sealed.extend_from_slice(&r.sealed_secret);
            let got = open_with(&sk, RELEASE_INFO, RELEASE_AAD, &sealed).expect("release opens");
            assert_eq!(&got[..], SECRET, "the recovery really released the secret");
        }
    }
    node.kill9();

    let mut haystack = all_bytes(&node.data_dir());
    assert!(haystack.len() > 1000, "the store has content to search");
    haystack.extend(std::fs::read(node.log_path()).expect("log"));
    let needles: [(&str, &[u8]); 5] = [
        ("password", PASSWORD),
        ("stored secret", SECRET),
        ("password file", &password_file),
        (
            "password file's envelope",
            &password_file[password_file.len() - 64..],
        ),
        ("account id", ACCOUNT.as_bytes()),
    ];
    for (what, needle) in needles {
        assert!(
            !contains(&haystack, needle),
            "{what} found in plaintext in the store or logs"
        );
        let hexed = hex::encode(needle);
        assert!(
            !contains(&haystack, hexed.as_bytes()),
            "{what} found hex-encoded"
        );
    }
}

//! `fleet certs`: the certificates of a local fleet, issued by a fleet CA of
//! its own (rcgen, ECDSA P-256).
//!
//! Layout of the certificate directory (`FLEET_DIR/tls` by default):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` | the fleet CA; every node, the operator and clients trust `ca.pem`; only this command reads `ca.key` |
//! | `node-<id>/server.pem`, `.key` | the node's server certificate (client API and peer listener): `node-<id>`, `localhost`, `127.0.0.1`, `::1` and the hosts of its addresses |
//! | `node-<id>/client.pem`, `.key` | the node's client certificate, naming `node-<id>`: its identity toward its peers |
//! | `operator/client.pem`, `.key` | the operator's client certificate, naming `operator`: the only one the operator API accepts |
//!
//! Private keys are written with mode 0600. Run again, it issues only what
//! is missing; a new CA (its files were removed) re-issues everything.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hsm_vault::tls::{node_name, OPERATOR_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// How long the certificates of a local fleet are valid.
const VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// The CA's subject. A CA whose certificate file is kept but whose
/// parameters are rebuilt for signing must keep this name.
const CA_NAME: &str = "hsm-vault fleet CA";

/// A node to issue certificates for: its id and the hosts (names or IP
/// addresses) its server certificate must be valid for, besides the
/// loopback ones.
#[derive(Debug, Clone)]
pub struct NodeHosts {
    pub id: u64,
    pub hosts: Vec<String>,
}

/// The host part of `HOST:PORT` (brackets of an IPv6 address removed).
pub fn host_of(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => a.ip().to_string(),
        Err(_) => addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_matches(['[', ']'])
            .to_owned(),
    }
}

/// Paths of the certificate directory.
#[derive(Debug, Clone)]
pub struct Layout(pub PathBuf);

impl Layout {
    pub fn ca(&self) -> PathBuf {
        self.0.join("ca.pem")
    }
    fn ca_key(&self) -> PathBuf {
        self.0.join("ca.key")
    }
    /// A node's server certificate and key.
    pub fn server(&self, id: u64) -> (PathBuf, PathBuf) {
        self.pair(&node_name(id), "server")
    }
    /// A node's client certificate and key.
    pub fn client(&self, id: u64) -> (PathBuf, PathBuf) {
        self.pair(&node_name(id), "client")
    }
    /// The operator's client certificate and key.
    pub fn operator(&self) -> (PathBuf, PathBuf) {
        self.pair(OPERATOR_NAME, "client")
    }
    fn pair(&self, holder: &str, kind: &str) -> (PathBuf, PathBuf) {
        let dir = self.0.join(holder);
        (
            dir.join(format!("{kind}.pem")),
            dir.join(format!("{kind}.key")),
        )
    }
}

fn validity(params: &mut CertificateParams) -> anyhow::Result<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    // An hour of slack for clocks a little behind.
    params.not_before = epoch + now.saturating_sub(Duration::from_secs(3600));
    params.not_after = epoch + now + VALIDITY;
    Ok(())
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p)?;
    Ok(p)
}

/// An end-entity certificate for `name`, valid for `names` (DNS names or IP
/// addresses) and one purpose.
fn leaf_params(
    name: &str,
    names: Vec<String>,
    purpose: ExtendedKeyUsagePurpose,
) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(names).context("a certificate name")?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![purpose];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p)?;
    Ok(p)
}

/// What [`issue`] did.
#[derive(Debug, Default)]
pub struct Issued {
    pub new_ca: bool,
    pub files: Vec<PathBuf>,
}

/// Issues every certificate of the layout that is missing: the CA, each
/// node's server and client certificates, the operator's.
pub fn issue(layout: &Layout, nodes: &[NodeHosts]) -> anyhow::Result<Issued> {
    std::fs::create_dir_all(&layout.0)
        .with_context(|| format!("creating {}", layout.0.display()))?;
    let mut issued = Issued::default();
    let (ca_cert, ca_key) = (layout.ca(), layout.ca_key());
    let ca = match (ca_cert.exists(), ca_key.exists()) {
        (true, true) => {
            let pem = zeroize::Zeroizing::new(
                std::fs::read_to_string(&ca_key)
                    .with_context(|| format!("reading {}", ca_key.display()))?,
            );
            let key = KeyPair::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM private key", ca_key.display()))?;
            Issuer::new(ca_params()?, key)
        }
        (true, false) => bail!(
            "{} exists without its key {}: the CA cannot issue; remove the directory to start a new CA",
            ca_cert.display(),
            ca_key.display()
        ),
        _ => {
            let key = KeyPair::generate()?;
            let cert = ca_params()?.self_signed(&key)?;
            super::write_secret(&ca_key, key.serialize_pem().as_bytes())?;
            std::fs::write(&ca_cert, cert.pem())
                .with_context(|| format!("writing {}", ca_cert.display()))?;
            issued.new_ca = true;
            issued.files.push(ca_cert);
            Issuer::new(ca_params()?, key)
        }
    };
    let mut wanted = Vec::new();
    for node in nodes {
        let name = node_name(node.id);
        let mut names = vec![
            name.clone(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        for h in &node.hosts {
            if !names.contains(h) {
                names.push(h.clone());
            }
        }
        wanted.push((
            layout.server(node.id),
            leaf_params(&name, names, ExtendedKeyUsagePurpose::ServerAuth)?,
        ));
        wanted.push((
            layout.client(node.id),
            leaf_params(
                &name,
                vec![name.clone()],
                ExtendedKeyUsagePurpose::ClientAuth,
            )?,
        ));
    }
    wanted.push((
        layout.operator(),
        leaf_params(
            OPERATOR_NAME,
            vec![OPERATOR_NAME.to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?,
    ));
    for ((cert_path, key_path), params) in wanted {
        if !issued.new_ca && cert_path.exists() && key_path.exists() {
            continue;
        }
        if let Some(dir) = cert_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        super::write_secret(&key_path, key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, cert.pem())
            .with_context(|| format!("writing {}", cert_path.display()))?;
        issued.files.push(cert_path);
    }
    Ok(issued)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7701"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7701"), "::1");
        assert_eq!(host_of("vault-1.example.org:7701"), "vault-1.example.org");
    }

    #[test]
    fn certificates_name_their_holders_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let layout = Layout(dir.path().join("tls"));
        let nodes = [NodeHosts {
            id: 3,
            hosts: vec!["10.1.2.3".into()],
        }];
        let first = issue(&layout, &nodes).expect("issue");
        assert!(first.new_ca);
        assert_eq!(first.files.len(), 4, "CA, server, client, operator");
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, UnixTime};
        let der = |p: &Path| CertificateDer::from_pem_file(p).expect("PEM certificate");
        let ca = der(&layout.ca());
        let anchors = [webpki::anchor_from_trusted_cert(&ca).expect("CA")];
        let chains = |leaf: &Path, usage: webpki::KeyUsage| {
            let leaf = der(leaf);
            webpki::EndEntityCert::try_from(&leaf)
                .expect("leaf")
                .verify_for_usage(
                    webpki::ALL_VERIFICATION_ALGS,
                    &anchors,
                    &[],
                    UnixTime::now(),
                    usage,
                    None,
                    None,
                )
                .is_ok()
        };
        assert!(chains(&layout.server(3).0, webpki::KeyUsage::server_auth()));
        assert!(chains(&layout.client(3).0, webpki::KeyUsage::client_auth()));
        assert!(chains(
            &layout.operator().0,
            webpki::KeyUsage::client_auth()
        ));
        // A server certificate is no client certificate, and the reverse.
        assert!(!chains(
            &layout.server(3).0,
            webpki::KeyUsage::client_auth()
        ));
        assert!(!chains(
            &layout.client(3).0,
            webpki::KeyUsage::server_auth()
        ));
        let server = der(&layout.server(3).0);
        for name in ["node-3", "localhost", "127.0.0.1", "::1", "10.1.2.3"] {
            assert!(hsm_vault::tls::names(&server, name), "{name}");
        }
        assert!(!hsm_vault::tls::names(&server, "node-4"));
        assert!(hsm_vault::tls::names(&der(&layout.client(3).0), "node-3"));
        assert!(hsm_vault::tls::names(
            &der(&layout.operator().0),
            "operator"
        ));
        assert!(!hsm_vault::tls::names(&der(&layout.operator().0), "node-3"));
        for key in [
            layout.ca_key(),
            layout.server(3).1,
            layout.client(3).1,
            layout.operator().1,
        ] {
            let mode = std::fs::metadata(&key).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        // Again: nothing is missing, nothing is issued; a new node gets its
        // two certificates from the same CA.
        assert!(issue(&layout, &nodes).expect("again").files.is_empty());
        let more = [
            nodes[0].clone(),
            NodeHosts {
                id: 4,
                hosts: vec![],
            },
        ];
        let added = issue(&layout, &more).expect("added");
        assert!(!added.new_ca);
        assert_eq!(added.files.len(), 2);
        // Signed by the CA as reloaded from its files, they chain to it.
        assert!(chains(&layout.client(4).0, webpki::KeyUsage::client_auth()));
        assert!(chains(&layout.server(4).0, webpki::KeyUsage::server_auth()));
    }
}

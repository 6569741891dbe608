//! TLS 1.3 for node-to-node connections, with rustls: how a node proves itself and whom it trusts, decided
//! once per node ([`Security`]) and checked at start, so that a bad key file or certificate is named before
//! the first peer connects.
//!
//! Two modes, the identity rules of `vpn_packet.transport.tls` and `handshake` (issue 20, item 1):
//!
//! - **Key mode**: each node has an Ed25519 key and a self-signed certificate that only carries it (the key
//!   file `vpn-packet genkey` writes: a PKCS#8 private key and the certificate, PEM). The server presents
//!   that certificate; the client accepts exactly a certificate whose Ed25519 key is the one configured for
//!   the peer it dialled ([`KeyServerVerifier`]: no chain, no name, no dates: the key is the trust), and
//!   TLS's CertificateVerify, checked with the provider, proves the server holds it. There is no client
//!   certificate: the client proves its key by signing the hello ([`crate::handshake::hello_transcript`]),
//!   and the server finds the peer by that key ([`PeerKeys`]).
//! - **CA mode**: mutual TLS. webpki checks the chain against the configured CA on both sides; whom a
//!   certificate names is [`certificate_names`]' rule (subjectAltName DNS entries, else subject common
//!   names), applied by the client's verifier to the peer it dialled ([`CaServerVerifier`]) and by the
//!   server when it judges the hello (the id claimed must be named, and no other peer). Ids need not be
//!   valid DNS names, which is why webpki's own name check is not used. [`check_ca_files`] runs webpki on
//!   this node's own certificate at start and names what it refuses.
//!
//! Both modes: TLS 1.3 only; key exchange X25519MLKEM768 (hybrid post-quantum: traffic recorded today stays
//! private against a future quantum computer) preferred and X25519 also offered, so that an older peer still
//! completes TLS and is answered `unsupported_version` instead of failing in TLS; no resumption and no
//! tickets (every connection proves its keys); no SNI (ids are not host names, and need not be sent in
//! clear). The provider is rustls' aws-lc-rs, the one with X25519MLKEM768.
//!
//! A third mode has no TLS at all: **insecure** ([`Security::insecure`], `[node] insecure = true`, for labs
//! and benchmarks), plaintext connections on the same core, a peer being the configured id it claims.
//!
//! Every key accepted from a certificate or a configuration goes through [`crate::key_checks`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock, PoisonError, RwLock, RwLockReadGuard};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, Resumption};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::SigningKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error as TlsError, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::ed25519::KeyProblem;
use crate::framing::DEFAULT_MAX_FRAME_SIZE;
use crate::handshake::{MAX_PEER_ID_LEN, PUBLIC_KEY_LEN};
use crate::key_checks::{accept_public_key, verify_signature};

/// The key exchange groups offered, preferred first.
pub const KEY_EXCHANGE_GROUPS: [&str; 2] = ["X25519MLKEM768", "X25519"];

/// The OID of Ed25519 keys (RFC 8410): 1.3.101.112.
const ED25519_OID: &[u64] = &[1, 3, 101, 112];

/// The provider every connection uses: aws-lc-rs, TLS 1.3 suites, the groups of [`KEY_EXCHANGE_GROUPS`].
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = aws_lc_rs::default_provider();
            provider.kx_groups = vec![aws_lc_rs::kx_group::X25519MLKEM768, aws_lc_rs::kx_group::X25519];
            Arc::new(provider)
        })
        .clone()
}

/// A provider that offers X25519 alone: what an older or classical peer offers (tests and timings).
pub fn classical_provider() -> Arc<CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    provider.kx_groups = vec![aws_lc_rs::kx_group::X25519];
    Arc::new(provider)
}

/// A key file, certificate or peer table this node cannot use; said at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// A short stable name: `key_file`, `certificate`, `ca`, `certificate_refused`, `peers`, `tls`.
    pub reason: &'static str,
    /// What is wrong, for the person who configured it.
    pub detail: String,
}

impl ConfigError {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        ConfigError {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for ConfigError {}

/// Why a verifier of ours refused a peer's certificate; carried inside rustls' error so that the
/// connection can report the reason (see [`refusal_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRefusal {
    /// `key_mismatch`, `identity_mismatch`, `no_ed25519_key`, `weak_key` (any key the strict check of
    /// [`crate::ed25519::check_public_key`] refuses; the detail says which problem).
    pub reason: &'static str,
    pub detail: String,
}

impl fmt::Display for CertificateRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for CertificateRefusal {}

fn refuse(reason: &'static str, detail: String) -> TlsError {
    let refusal = CertificateRefusal { reason, detail };
    TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(refusal))))
}

/// Our own refusal inside a rustls error, if it is one.
pub fn refusal_of(err: &TlsError) -> Option<&CertificateRefusal> {
    match err {
        TlsError::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner.downcast_ref(),
        _ => None,
    }
}

fn parse_certificate(der: &[u8]) -> Option<X509Certificate<'_>> {
    X509Certificate::from_der(der).ok().map(|(_, cert)| cert)
}

/// The identities a DER certificate names: its subjectAltName DNS entries, or, only when it has none, its
/// subject common names (RFC 6125; `vpn_packet.transport.tls.certificate_names` is the same rule). Empty
/// for a certificate that does not parse.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Some(cert) = parse_certificate(der) else {
        return Vec::new();
    };
    let dns: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if !dns.is_empty() {
        return dns;
    }
    cert.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect()
}

/// The raw Ed25519 public key of a DER certificate, `None` when it does not parse or holds another kind of
/// key. Not yet checked: see [`certificate_key`].
pub fn certificate_ed25519_key(der: &[u8]) -> Option<Vec<u8>> {
    let cert = parse_certificate(der)?;
    let spki = cert.public_key();
    let is_ed25519 = spki
        .algorithm
        .algorithm
        .iter()
        .is_some_and(|arcs| arcs.eq(ED25519_OID.iter().copied()));
    is_ed25519.then(|| spki.subject_public_key.data.to_vec())
}

/// The Ed25519 key of a certificate, through [`accept_public_key`].
fn certificate_key(der: &[u8]) -> Result<[u8; PUBLIC_KEY_LEN], TlsError> {
    let raw = certificate_ed25519_key(der)
        .ok_or_else(|| refuse("no_ed25519_key", "the certificate holds no Ed25519 key".into()))?;
    accept_public_key(&raw).map_err(|err| {
        refuse(
            "weak_key",
            format!("the certificate's key is refused ({}): {err}", err.reason()),
        )
    })
}

/// The public key string of raw key bytes (standard base64, as `vpn-packet pubkey` prints).
pub fn encode_public_key(raw: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(raw.len().div_ceil(3) * 4);
    for chunk in raw.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// This node's key: the private key (to present in TLS and sign hellos), its certificate, its public key.
#[derive(Debug, Clone)]
pub struct NodeKey {
    public_key: [u8; PUBLIC_KEY_LEN],
    certificate: CertificateDer<'static>,
    private_key: Arc<PrivateKeyDer<'static>>,
    signer: Arc<dyn SigningKey>,
}

impl NodeKey {
    /// A key file as `vpn-packet genkey` writes it: a PEM PKCS#8 Ed25519 private key and its self-signed
    /// certificate. Refuses a file without both, a key that is not Ed25519, or a certificate of another key.
    pub fn from_pem(pem: &[u8]) -> Result<NodeKey, ConfigError> {
        let private_key = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|err| ConfigError::new("key_file", format!("no usable private key: {err}")))?;
        let certificate = CertificateDer::pem_slice_iter(pem)
            .next()
            .ok_or_else(|| ConfigError::new("key_file", "no certificate"))?
            .map_err(|err| ConfigError::new("key_file", format!("unreadable certificate: {err}")))?;
        let signer = provider()
            .key_provider
            .load_private_key(private_key.clone_key())
            .map_err(|err| ConfigError::new("key_file", format!("unusable private key: {err}")))?;
        if signer.algorithm() != rustls::SignatureAlgorithm::ED25519 {
            return Err(ConfigError::new(
                "key_file",
                "the private key is not Ed25519 (make one with `vpn-packet genkey`)",
            ));
        }
        let raw = certificate_ed25519_key(&certificate)
            .ok_or_else(|| ConfigError::new("key_file", "the certificate holds no Ed25519 key"))?;
        let public_key = accept_public_key(&raw)
            .map_err(|err| ConfigError::new("key_file", format!("the certificate's key: {err}")))?;
        let own = signer.public_key().map(|spki| spki.as_ref().to_vec());
        if !own.is_some_and(|spki| spki.ends_with(&public_key)) {
            return Err(ConfigError::new(
                "key_file",
                "the certificate is not the one of this private key",
            ));
        }
        Ok(NodeKey {
            public_key,
            certificate,
            private_key: Arc::new(private_key),
            signer,
        })
    }

    /// The raw public key (32 bytes).
    pub fn public_key(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.public_key
    }

    /// The Ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, TlsError> {
        self.signer
            .choose_scheme(&[SignatureScheme::ED25519])
            .ok_or_else(|| TlsError::General("the key cannot sign with Ed25519".into()))?
            .sign(message)
    }
}

/// The peers trusted in key mode: id and public key, looked up by key (a peer is who its key proves).
///
/// One table shared by every clone of the [`Security`] it belongs to, changed in place by
/// [`PeerKeys::update`]: a peer joining or leaving costs the same with 10 peers known or 10,000, and the
/// connections already made keep their setup. A server reads the table when it judges a hello, so a key
/// removed is refused from the next hello on.
#[derive(Debug, Clone, Default)]
pub struct PeerKeys {
    table: Arc<RwLock<KeyTable>>,
}

#[derive(Debug, Default)]
struct KeyTable {
    by_key: HashMap<[u8; PUBLIC_KEY_LEN], String>,
    by_id: HashMap<String, [u8; PUBLIC_KEY_LEN]>,
}

fn peer_key(id: &str, key: &[u8]) -> Result<[u8; PUBLIC_KEY_LEN], ConfigError> {
    accept_public_key(key).map_err(|err: KeyProblem| ConfigError::new("peers", format!("peer {id:?}: {err}")))
}

impl PeerKeys {
    /// The table of `peers` (id, raw key); refuses a key [`accept_public_key`] refuses, two peers with one
    /// key, or one id twice.
    pub fn new<'a>(peers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<PeerKeys, ConfigError> {
        let mut table = KeyTable::default();
        for (id, key) in peers {
            let key = peer_key(id, key)?;
            if let Some(other) = table.by_key.get(&key) {
                return Err(ConfigError::new(
                    "peers",
                    format!("peers {other:?} and {id:?} have the same public key"),
                ));
            }
            if table.by_id.insert(id.to_owned(), key).is_some() {
                return Err(ConfigError::new(
                    "peers",
                    format!("peer {id:?} is configured twice"),
                ));
            }
            table.by_key.insert(key, id.to_owned());
        }
        Ok(PeerKeys {
            table: Arc::new(RwLock::new(table)),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, KeyTable> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the keys of `set`'s peers (added, or given a new key) and drops `removed`'s, in place: the
    /// work of the peers changed only. Checked before anything changes: a key [`accept_public_key`]
    /// refuses, one id twice in `set`, or a key another peer keeps (a key freed by a peer removed or
    /// rekeyed in the same change may be given again) is refused and the table stays as it was. An id of
    /// `removed` that is not in the table is ignored; one in both is set.
    pub fn update<'a>(
        &self,
        set: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        removed: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ConfigError> {
        let mut checked: Vec<(&str, [u8; PUBLIC_KEY_LEN])> = Vec::new();
        for (id, key) in set {
            checked.push((id, peer_key(id, key)?)); // outside the lock: a scalar multiplication at most
        }
        let mut leaving: HashSet<&str> = removed.into_iter().collect();
        let mut ids: HashSet<&str> = HashSet::with_capacity(checked.len());
        for (id, _) in &checked {
            if !ids.insert(id) {
                return Err(ConfigError::new(
                    "peers",
                    format!("peer {id:?} is configured twice"),
                ));
            }
            leaving.insert(id);
        }
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let mut claimed: HashMap<[u8; PUBLIC_KEY_LEN], &str> = HashMap::with_capacity(checked.len());
        for (id, key) in &checked {
            let holder = claimed.get(key).copied().or_else(|| {
                table
                    .by_key
                    .get(key)
                    .map(String::as_str)
                    .filter(|h| !leaving.contains(h))
            });
            if let Some(other) = holder {
                return Err(ConfigError::new(
                    "peers",
                    format!("peers {other:?} and {id:?} have the same public key"),
                ));
            }
            claimed.insert(*key, id);
        }
        for id in leaving {
            if let Some(old) = table.by_id.remove(id) {
                if table.by_key.get(&old).is_some_and(|holder| holder == id) {
                    table.by_key.remove(&old);
                }
            }
        }
        for (id, key) in checked {
            table.by_id.insert(id.to_owned(), key);
            table.by_key.insert(key, id.to_owned());
        }
        Ok(())
    }

    /// The peer that has `key`.
    pub fn peer_of_key(&self, key: &[u8]) -> Option<String> {
        let key: &[u8; PUBLIC_KEY_LEN] = key.try_into().ok()?;
        self.read().by_key.get(key).cloned()
    }

    /// The key configured for `id`.
    pub fn key_of(&self, id: &str) -> Option<[u8; PUBLIC_KEY_LEN]> {
        self.read().by_id.get(id).copied()
    }

    /// Whether `id` is a configured peer.
    pub fn contains(&self, id: &str) -> bool {
        self.read().by_id.contains_key(id)
    }

    /// How many peers are trusted.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Whether no peer is trusted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The peers trusted in CA mode, by id (their certificates prove the id). Like [`PeerKeys`], one set
/// shared by every clone of its [`Security`] and changed in place by [`PeerIds::update`].
#[derive(Debug, Clone, Default)]
pub struct PeerIds {
    ids: Arc<RwLock<HashSet<String>>>,
}

impl PeerIds {
    /// The set of `ids`.
    pub fn new<'a>(ids: impl IntoIterator<Item = &'a str>) -> PeerIds {
        PeerIds {
            ids: Arc::new(RwLock::new(ids.into_iter().map(str::to_owned).collect())),
        }
    }

    /// Drops `removed`, then adds `added`: the work of the peers changed.
    pub fn update<'a>(
        &self,
        added: impl IntoIterator<Item = &'a str>,
        removed: impl IntoIterator<Item = &'a str>,
    ) {
        let mut ids = self.ids.write().unwrap_or_else(PoisonError::into_inner);
        for id in removed {
            ids.remove(id);
        }
        ids.extend(added.into_iter().map(str::to_owned));
    }

    /// Whether `id` is a configured peer.
    pub fn contains(&self, id: &str) -> bool {
        self.ids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id)
    }

    /// How many peers are configured.
    pub fn len(&self) -> usize {
        self.ids.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no peer is configured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The client side's check of a key-mode server: exactly a certificate holding `expected`.
#[derive(Debug)]
pub struct KeyServerVerifier {
    peer_id: String,
    expected: [u8; PUBLIC_KEY_LEN],
}

impl ServerCertVerifier for KeyServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let key = certificate_key(end_entity)?;
        if key != self.expected {
            return Err(refuse(
                "key_mismatch",
                format!(
                    "{} presented key {}, but its configured public_key is {}",
                    self.peer_id,
                    encode_public_key(&key),
                    encode_public_key(&self.expected)
                ),
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        strict_certificate_verify(message, cert, dss.scheme, dss.signature())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The client side's check of a CA-mode server: webpki checks the chain, [`certificate_names`] must name
/// the peer dialled.
#[derive(Debug)]
pub struct CaServerVerifier {
    peer_id: String,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for CaServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_ed25519_if_any(end_entity)?;
        let names = certificate_names(end_entity);
        if !names.contains(&self.peer_id) {
            return Err(refuse(
                "identity_mismatch",
                format!(
                    "server certificate names {}, not the peer id {:?} it was dialled as",
                    if names.is_empty() {
                        "nobody".to_owned()
                    } else {
                        names.join(", ")
                    },
                    self.peer_id
                ),
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A key-mode server's CertificateVerify, checked with the project's strict verifier (canonical `s`, no
/// small-order `R`), the same one the hello's signature goes through; the key passes the strict key check.
fn strict_certificate_verify(
    message: &[u8],
    cert: &CertificateDer<'_>,
    scheme: SignatureScheme,
    signature: &[u8],
) -> Result<HandshakeSignatureValid, TlsError> {
    if scheme != SignatureScheme::ED25519 {
        return Err(TlsError::PeerIncompatible(
            rustls::PeerIncompatible::NoSignatureSchemesInCommon,
        ));
    }
    let key = certificate_key(cert)?;
    if verify_signature(&key, message, signature) {
        Ok(HandshakeSignatureValid::assertion())
    } else {
        Err(TlsError::InvalidCertificate(CertificateError::BadSignature))
    }
}

/// An Ed25519 key in a CA-issued certificate goes through the same strict check as any other.
fn check_ed25519_if_any(der: &[u8]) -> Result<(), TlsError> {
    match certificate_ed25519_key(der) {
        Some(_) => certificate_key(der).map(|_| ()),
        None => Ok(()),
    }
}

/// The server side's check of a CA-mode client certificate: webpki's client verifier (the chain), plus
/// the strict key check. The name is judged with the hello (the id it claims).
#[derive(Debug)]
pub struct CaClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for CaClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_ed25519_if_any(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// This node's CA-mode credentials, checked ([`check_ca_files`]).
#[derive(Debug, Clone)]
pub struct CaFiles {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
}

impl CaFiles {
    /// The names this node's own certificate carries.
    pub fn names(&self) -> Vec<String> {
        certificate_names(&self.chain[0])
    }
}

fn webpki_refusal(role: &str, err: &TlsError) -> ConfigError {
    ConfigError::new(
        "certificate_refused",
        format!(
            "webpki refuses this node's certificate as a TLS {role} certificate for the configured CA: {err}"
        ),
    )
}

/// Reads and checks this node's CA-mode files (PEM): `cert` (its certificate, then any intermediates),
/// `key` (its private key), `ca` (the CA certificates peers chain to). webpki must accept the certificate
/// for both roles a node plays (TLS server and TLS client) today; what it refuses is named here, at start,
/// rather than as a failed handshake later.
pub fn check_ca_files(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<CaFiles, ConfigError> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| ConfigError::new("certificate", format!("unreadable certificate: {err}")))?;
    if chain.is_empty() {
        return Err(ConfigError::new(
            "certificate",
            "no certificate in the certificate file",
        ));
    }
    let private_key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|err| ConfigError::new("key_file", format!("no usable private key: {err}")))?;
    let signer = provider()
        .key_provider
        .load_private_key(private_key.clone_key())
        .map_err(|err| ConfigError::new("key_file", format!("unusable private key: {err}")))?;
    let cert_spki = parse_certificate(&chain[0])
        .map(|c| c.public_key().raw.to_vec())
        .ok_or_else(|| ConfigError::new("certificate", "the certificate does not parse as X.509"))?;
    if signer.public_key().map(|spki| spki.as_ref().to_vec()) != Some(cert_spki) {
        return Err(ConfigError::new(
            "key_file",
            "the private key is not the one of the certificate",
        ));
    }
    let mut roots = RootCertStore::empty();
    let mut cas = 0usize;
    for der in CertificateDer::pem_slice_iter(ca) {
        let der = der.map_err(|err| ConfigError::new("ca", format!("unreadable CA certificate: {err}")))?;
        roots
            .add(der)
            .map_err(|err| ConfigError::new("ca", format!("webpki refuses the CA certificate: {err}")))?;
        cas += 1;
    }
    if cas == 0 {
        return Err(ConfigError::new("ca", "no certificate in the CA file"));
    }
    let provider = provider();
    let now = UnixTime::now();
    let parsed = ParsedCertificate::try_from(&chain[0]).map_err(|err| webpki_refusal("server", &err))?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &chain[1..],
        now,
        provider.signature_verification_algorithms.all,
    )
    .map_err(|err| webpki_refusal("server", &err))?;
    check_ed25519_if_any(&chain[0]).map_err(|err| webpki_refusal("server", &err))?;
    let roots = Arc::new(roots);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|err| ConfigError::new("ca", format!("{err}")))?;
    client_verifier
        .verify_client_cert(&chain[0], &chain[1..], now)
        .map_err(|err| webpki_refusal("client", &err))?;
    Ok(CaFiles {
        chain,
        key: Arc::new(private_key),
        roots,
    })
}

/// How this node proves itself and whom it trusts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Key mode: this node's key, and the peers' keys.
    Keys { key: NodeKey, peers: PeerKeys },
    /// CA mode: this node's certificate and key, the CA, and the ids of the configured peers.
    Ca { files: CaFiles, peers: PeerIds },
    /// Insecure mode (`[node] insecure = true`, labs and benchmarks): no TLS, bytes pass through
    /// unchanged, and a peer is whoever it claims to be, if that id is one of the configured peers'.
    Insecure { peers: PeerIds },
}

impl Trust {
    /// The mode's name: `key`, `ca` or `insecure` (`vpn_packet.transport.handshake.SecurityMode`).
    pub fn mode(&self) -> &'static str {
        match self {
            Trust::Keys { .. } => "key",
            Trust::Ca { .. } => "ca",
            Trust::Insecure { .. } => "insecure",
        }
    }
}

/// A node's TLS setup: the server configuration (shared by every accepted connection) and what it takes
/// to make a client configuration for a dial; or, in insecure mode, no TLS at all (the connections are
/// plaintext, every stage after TLS the same). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Security {
    inner: Arc<SecurityInner>,
}

#[derive(Debug)]
struct SecurityInner {
    local_id: String,
    trust: Trust,
    /// None in insecure mode.
    server: Option<Arc<ServerConfig>>,
    max_frame_size: usize,
    provider: Arc<CryptoProvider>,
}

fn tls_error(err: TlsError) -> ConfigError {
    ConfigError::new("tls", err.to_string())
}

fn plaintext_error() -> ConfigError {
    ConfigError::new(
        "tls",
        "an insecure node speaks plaintext: it has no TLS configuration",
    )
}

fn check_local_id(local_id: &str) -> Result<(), ConfigError> {
    if local_id.is_empty() || local_id.len() > MAX_PEER_ID_LEN {
        return Err(ConfigError::new(
            "peers",
            format!("the node id {local_id:?} must be 1..={MAX_PEER_ID_LEN} bytes"),
        ));
    }
    Ok(())
}

impl Security {
    /// Key mode: `key_file` is this node's key file (PEM), `peers` the trusted peers' ids and raw keys.
    pub fn with_keys<'a>(
        local_id: &str,
        key_file: &[u8],
        peers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Security, ConfigError> {
        Self::with_keys_and_provider(local_id, key_file, peers, provider())
    }

    /// [`Security::with_keys`] with another provider (tests and timings: an X25519-only node).
    pub fn with_keys_and_provider<'a>(
        local_id: &str,
        key_file: &[u8],
        peers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Security, ConfigError> {
        check_local_id(local_id)?;
        let key = NodeKey::from_pem(key_file)?;
        let peers = PeerKeys::new(peers)?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .with_no_client_auth()
            .with_single_cert(vec![key.certificate.clone()], key.private_key.clone_key())
            .map_err(tls_error)?;
        Ok(Self::finish(
            local_id,
            Trust::Keys { key, peers },
            server,
            provider,
        ))
    }

    /// CA mode: this node's certificate (and intermediates), key and CA file (PEM, checked by
    /// [`check_ca_files`]), and the ids of the configured peers.
    pub fn with_ca<'a>(
        local_id: &str,
        cert: &[u8],
        key: &[u8],
        ca: &[u8],
        peers: impl IntoIterator<Item = &'a str>,
    ) -> Result<Security, ConfigError> {
        check_local_id(local_id)?;
        let files = check_ca_files(cert, key, ca)?;
        let names = files.names();
        if !names.iter().any(|name| name == local_id) {
            return Err(ConfigError::new(
                "certificate_refused",
                format!(
                    "this node's certificate names {}, not its id {local_id:?}: peers would refuse it",
                    if names.is_empty() {
                        "nobody".to_owned()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        }
        let provider = provider();
        let inner = WebPkiClientVerifier::builder_with_provider(files.roots.clone(), provider.clone())
            .build()
            .map_err(|err| ConfigError::new("ca", format!("{err}")))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .with_client_cert_verifier(Arc::new(CaClientVerifier { inner }))
            .with_single_cert(files.chain.clone(), files.key.clone_key())
            .map_err(tls_error)?;
        let peers = PeerIds::new(peers);
        Ok(Self::finish(
            local_id,
            Trust::Ca { files, peers },
            server,
            provider,
        ))
    }

    fn finish(
        local_id: &str,
        trust: Trust,
        mut server: ServerConfig,
        provider: Arc<CryptoProvider>,
    ) -> Security {
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Security {
            inner: Arc::new(SecurityInner {
                local_id: local_id.to_owned(),
                trust,
                server: Some(Arc::new(server)),
                max_frame_size: DEFAULT_MAX_FRAME_SIZE,
                provider,
            }),
        }
    }

    /// Insecure mode: plaintext connections, and a peer is whoever it claims to be among `peers` (the
    /// configured peers' ids). For labs and benchmarks only; a node says so loudly at every start.
    pub fn insecure<'a>(
        local_id: &str,
        peers: impl IntoIterator<Item = &'a str>,
    ) -> Result<Security, ConfigError> {
        check_local_id(local_id)?;
        Ok(Security {
            inner: Arc::new(SecurityInner {
                local_id: local_id.to_owned(),
                trust: Trust::Insecure {
                    peers: PeerIds::new(peers),
                },
                server: None,
                max_frame_size: DEFAULT_MAX_FRAME_SIZE,
                provider: provider(),
            }),
        })
    }

    /// Whether connections of this setup run TLS (every mode but insecure).
    pub fn encrypted(&self) -> bool {
        self.inner.server.is_some()
    }

    /// The same setup refusing packet frames above `max_frame_size` on the connections it accepts.
    pub fn with_max_frame_size(self, max_frame_size: usize) -> Security {
        let inner = &self.inner;
        Security {
            inner: Arc::new(SecurityInner {
                local_id: inner.local_id.clone(),
                trust: inner.trust.clone(),
                server: inner.server.clone(),
                max_frame_size,
                provider: inner.provider.clone(),
            }),
        }
    }

    /// The id this node announces.
    pub fn local_id(&self) -> &str {
        &self.inner.local_id
    }

    /// How this node proves itself and whom it trusts.
    pub fn trust(&self) -> &Trust {
        &self.inner.trust
    }

    /// The largest packet frame accepted connections take.
    pub fn max_frame_size(&self) -> usize {
        self.inner.max_frame_size
    }

    /// The configuration every accepted connection uses; an error in insecure mode (no TLS).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, ConfigError> {
        self.inner.server.clone().ok_or_else(plaintext_error)
    }

    /// A client configuration for dialling `peer_id`: its configured key (key mode) or its name (CA mode)
    /// is what the server must prove. Refuses a peer without a configured key in key mode.
    pub fn client_config(&self, peer_id: &str) -> Result<Arc<ClientConfig>, ConfigError> {
        let provider = self.inner.provider.clone();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .dangerous();
        let mut config = match &self.inner.trust {
            Trust::Keys { peers, .. } => {
                let expected = peers.key_of(peer_id).ok_or_else(|| {
                    ConfigError::new(
                        "peers",
                        format!("no public key is configured for peer {peer_id:?}"),
                    )
                })?;
                builder
                    .with_custom_certificate_verifier(Arc::new(KeyServerVerifier {
                        peer_id: peer_id.to_owned(),
                        expected,
                    }))
                    .with_no_client_auth()
            }
            Trust::Insecure { .. } => return Err(plaintext_error()),
            Trust::Ca { files, .. } => builder
                .with_custom_certificate_verifier(Arc::new(CaServerVerifier {
                    peer_id: peer_id.to_owned(),
                    roots: files.roots.clone(),
                    provider,
                }))
                .with_client_auth_cert(files.chain.clone(), files.key.clone_key())
                .map_err(tls_error)?,
        };
        config.resumption = Resumption::disabled();
        config.enable_sni = false;
        Ok(Arc::new(config))
    }
}

/// The name rustls is given for a dial: unused by our verifiers (they know the peer), never sent (no SNI).
pub(crate) fn placeholder_server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strong_key() -> [u8; 32] {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        pair.public_key_raw().try_into().unwrap()
    }

    #[test]
    fn base64_matches_the_python_encoding() {
        assert_eq!(
            encode_public_key(&[0u8; 32]),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        );
        assert_eq!(encode_public_key(b"ab"), "YWI=");
        assert_eq!(encode_public_key(b"abc"), "YWJj");
        assert_eq!(encode_public_key(b"a"), "YQ==");
    }

    /// A key-mode node certificate whose Ed25519 key bytes are replaced by `key` (its signature no longer
    /// matches, which key mode never checks: the key is the trust).
    fn certificate_with_key(key: &[u8; 32]) -> CertificateDer<'static> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&pair)
            .unwrap();
        let mut der = cert.der().to_vec();
        let public = pair.public_key_raw().to_vec();
        let at = der.windows(32).position(|w| w == public).unwrap();
        der[at..at + 32].copy_from_slice(key);
        CertificateDer::from(der)
    }

    #[test]
    fn a_server_certificate_with_a_weak_key_is_refused_even_when_configured() {
        // The identity point (y = 1): of small order, a key with which signatures are forged at will.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        let verifier = KeyServerVerifier {
            peer_id: "b".into(),
            expected: weak,
        };
        let err = verifier
            .verify_server_cert(
                &certificate_with_key(&weak),
                &[],
                &placeholder_server_name(),
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        let refusal = refusal_of(&err).unwrap();
        assert_eq!(refusal.reason, "weak_key");
        assert!(refusal.detail.contains("small_order"), "{}", refusal.detail);
        // And a weak key cannot be configured for a peer in the first place.
        let err = PeerKeys::new([("b", &weak[..])]).unwrap_err();
        assert!(err.detail.contains("small order"), "{err}");
    }

    #[test]
    fn certificate_verify_is_checked_strictly() {
        use ed25519_dalek::{Signer, SigningKey};
        let signer = SigningKey::from_bytes(&[7; 32]);
        let public = signer.verifying_key().to_bytes();
        let cert = certificate_with_key(&public);
        let message = b"TLS 1.3, server CertificateVerify transcript";
        let honest = signer.sign(message).to_bytes();
        let check =
            |signature: &[u8]| strict_certificate_verify(message, &cert, SignatureScheme::ED25519, signature);
        assert!(check(&honest).is_ok());
        // s + L: the same signature to a lax verifier, a second encoding refused here.
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut malleated = honest;
        let mut carry = 0u16;
        for i in 0..32 {
            let sum = u16::from(malleated[32 + i]) + u16::from(L[i]) + carry;
            malleated[32 + i] = sum as u8;
            carry = sum >> 8;
        }
        if carry == 0 {
            assert!(check(&malleated).is_err());
        }
        let mut bent = honest;
        bent[0] ^= 1;
        assert!(check(&bent).is_err());
    }

    #[test]
    fn a_key_update_changes_the_shared_table_in_place_or_nothing() {
        let (a, b, c) = (strong_key(), strong_key(), strong_key());
        let table = PeerKeys::new([("a", &a[..])]).unwrap();
        let shared = table.clone(); // another holder of the same setup sees the change
        table.update([("b", &b[..])], []).unwrap();
        assert_eq!(shared.peer_of_key(&b).as_deref(), Some("b"));
        assert_eq!(shared.key_of("b"), Some(b));
        assert_eq!(shared.len(), 2);
        // Refused before anything changes: a key another peer keeps, a weak key, an id twice.
        let err = table.update([("c", &a[..])], []).unwrap_err();
        assert!(err.detail.contains("the same public key"), "{err}");
        assert!(table.update([("c", &c[..]), ("d", &[0u8; 32][..])], []).is_err());
        let err = table.update([("c", &c[..]), ("c", &c[..])], []).unwrap_err();
        assert!(err.detail.contains("configured twice"), "{err}");
        assert!(!table.contains("c") && table.peer_of_key(&c).is_none());
        assert_eq!(table.len(), 2);
        // A key freed in the same change may be given again; a removed peer's key finds nobody.
        table.update([("c", &a[..])], ["a"]).unwrap();
        assert_eq!(table.peer_of_key(&a).as_deref(), Some("c"));
        assert!(!table.contains("a"));
        table.update([("b", &c[..])], []).unwrap(); // rekeyed
        assert!(table.peer_of_key(&b).is_none());
        assert_eq!(table.peer_of_key(&c).as_deref(), Some("b"));
        table.update([], ["b", "nobody"]).unwrap();
        assert!(table.peer_of_key(&c).is_none() && !table.contains("b"));
        assert_eq!(shared.len(), 1);
    }

    #[test]
    fn a_ca_peer_update_changes_the_shared_set_in_place() {
        let ids = PeerIds::new(["a"]);
        let shared = ids.clone();
        ids.update(["b", "c"], []);
        assert!(shared.contains("b") && shared.contains("c") && shared.len() == 3);
        ids.update([], ["a", "nobody"]);
        assert!(!shared.contains("a") && shared.len() == 2);
    }

    #[test]
    fn duplicate_keys_and_ids_are_refused() {
        let (k, other) = (strong_key(), strong_key());
        let err = PeerKeys::new([("a", &k[..]), ("b", &k[..])]).unwrap_err();
        assert!(err.detail.contains("the same public key"), "{err}");
        let err = PeerKeys::new([("a", &k[..]), ("a", &other[..])]).unwrap_err();
        assert!(err.detail.contains("configured twice"), "{err}");
        assert!(PeerKeys::new([("a", &[1u8; 31][..])]).is_err());
    }
}

//! Fresh certificates for one control plane, made in memory with rcgen (ring backend, a few
//! milliseconds): nothing is shared between runs, so no test depends on a key that outlives it.
//!
//! Every key is ECDSA P-256. ring cannot generate RSA keys, and Kubernetes accepts ECDSA for
//! everything here, the service-account signing key included (tokens are then signed ES256).

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The names the apiserver's serving certificate answers to: loopback for the tests, the
/// first service IP and the in-cluster DNS names for clients that think they run in a pod.
const SERVING_NAMES: &[&str] = &[
    "127.0.0.1",
    "10.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// The common name the apiserver presents to aggregated API servers (`--requestheader-allowed-names`).
pub(super) const FRONT_PROXY_CLIENT_CN: &str = "front-proxy-client";

/// A certificate and its private key, both PEM.
pub(super) struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Everything one control plane needs.
pub(super) struct Pki {
    pub ca_pem: String,
    pub apiserver: CertAndKey,
    /// O=system:masters: bound to cluster-admin by the bootstrap RBAC policy.
    pub admin: CertAndKey,
    pub controller_manager: CertAndKey,
    pub scheduler: CertAndKey,
    pub front_proxy_ca_pem: String,
    pub front_proxy_client: CertAndKey,
    /// The service-account token signing key (PKCS#8) and its public half (SPKI).
    pub service_account_key_pem: String,
    pub service_account_pub_pem: String,
}

impl Pki {
    pub(super) fn generate() -> anyhow::Result<Pki> {
        let (ca_pem, ca) = new_ca("repobox-test-ca")?;
        let (front_proxy_ca_pem, front_proxy_ca) = new_ca("repobox-test-front-proxy-ca")?;
        let service_account = KeyPair::generate().context("generate the service-account key")?;
        Ok(Pki {
            ca_pem,
            apiserver: leaf(&ca, "kube-apiserver", None, SERVING_NAMES, true)?,
            admin: leaf(
                &ca,
                "repobox-test-admin",
                Some("system:masters"),
                &[],
                false,
            )?,
            controller_manager: leaf(&ca, "system:kube-controller-manager", None, &[], false)?,
            scheduler: leaf(&ca, "system:kube-scheduler", None, &[], false)?,
            front_proxy_ca_pem,
            front_proxy_client: leaf(&front_proxy_ca, FRONT_PROXY_CLIENT_CN, None, &[], false)?,
            service_account_key_pem: service_account.serialize_pem(),
            service_account_pub_pem: service_account.public_key_pem(),
        })
    }
}

/// A self-signed CA: its PEM and the issuer that signs leaves.
fn new_ca(common_name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().context("generate a CA key")?;
    let cert = params
        .self_signed(&key)
        .with_context(|| format!("self-sign {common_name}"))?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// A certificate signed by `issuer`: a server certificate for `names`, or a client certificate
/// whose CN is the Kubernetes user name and whose O (if any) is its group.
fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    organization: Option<&str>,
    names: &[&str],
    server: bool,
) -> anyhow::Result<CertAndKey> {
    let names: Vec<String> = names.iter().map(|n| (*n).to_string()).collect();
    let mut params = CertificateParams::new(names)
        .with_context(|| format!("certificate parameters for {common_name}"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = KeyPair::generate().with_context(|| format!("generate a key for {common_name}"))?;
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("sign the certificate of {common_name}"))?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

//! A TLS front for a plain-HTTP test server (the [`crate::githost::GitHost`] and its forge API):
//! a fresh CA and a certificate for `127.0.0.1`, made in memory with rcgen; each accepted
//! connection is decrypted and copied to the backend port. Tests point the runner at
//! `https://127.0.0.1:{port}` with `GIT_SSL_CAINFO` = [`TlsProxy::ca_pem`] to prove that git and
//! the API client both trust that CA (and only through it, without `ALLOW_INSECURE_HTTP`).
//!
//! Like the git host it runs on its own thread and runtime, so a test that blocks its own
//! runtime cannot stall it.

use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::oneshot;

/// A running TLS front; stops on drop.
pub struct TlsProxy {
    port: u16,
    ca_pem: String,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TlsProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsProxy")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl TlsProxy {
    /// Serves TLS on a free loopback port, forwarding to `127.0.0.1:{backend_port}`.
    pub fn start(backend_port: u16) -> anyhow::Result<TlsProxy> {
        repobox_contract::install_tls_provider();
        let (ca_pem, chain, key) = certificates()?;
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("build the TLS server configuration")?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("bind the TLS proxy's port")?;
        listener
            .set_nonblocking(true)
            .context("make the listener non-blocking")?;
        let port = listener.local_addr().context("read the TLS port")?.port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tls-proxy")
            .enable_all()
            .build()
            .context("build the TLS proxy's runtime")?;
        let (tx, mut rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("tls-proxy-{port}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        let accepted = tokio::select! {
                            a = listener.accept() => a,
                            _ = &mut rx => return,
                        };
                        let Ok((tcp, _)) = accepted else { continue };
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            // A client that refuses the certificate ends here; nothing to do.
                            let Ok(mut tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let Ok(mut backend) =
                                tokio::net::TcpStream::connect(("127.0.0.1", backend_port)).await
                            else {
                                return;
                            };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut backend).await;
                        });
                    }
                });
                drop(runtime);
            })
            .context("spawn the TLS proxy thread")?;
        Ok(TlsProxy {
            port,
            ca_pem,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:{port}`.
    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA that signed the proxy's certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A CA (PEM) and a server certificate for `127.0.0.1` / `localhost` it signed, with its key.
fn certificates() -> anyhow::Result<(String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>
{
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "repobox-test-forge-ca");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().context("generate the CA key")?;
    let ca_cert = ca.self_signed(&ca_key).context("self-sign the CA")?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .context("server certificate parameters")?;
    leaf.distinguished_name
        .push(DnType::CommonName, "repobox-test-forge");
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().context("generate the server key")?;
    let cert = leaf
        .signed_by(&key, &issuer)
        .context("sign the server certificate")?;
    Ok((
        ca_cert.pem(),
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    ))
}

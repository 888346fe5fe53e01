//! Certificates for TLS servers, generated per server with rcgen.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A CA and a server certificate for `localhost` / `127.0.0.1`.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl TlsMaterial {
    /// Generates a fresh CA and a server certificate signed by it.
    pub fn generate() -> Self {
        let ca_key = KeyPair::generate().expect("generate the CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "tollgate test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().expect("generate the server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params
            .signed_by(&key, &issuer)
            .expect("sign the server cert");
        TlsMaterial {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub(crate) fn write(&self, dir: &Path) {
        for (name, body) in [
            ("ca.crt", &self.ca_pem),
            ("server.crt", &self.cert_pem),
            ("server.key", &self.key_pem),
        ] {
            std::fs::write(dir.join(name), body).expect("write TLS material");
        }
    }

    /// A TLS-only server on `port`, with the default user off and one ACL
    /// user.
    pub(crate) fn server_args(&self, dir: &Path, port: u16) -> Vec<String> {
        let mut a = self.tls_args(dir, 0, port);
        a.extend(["--user".into(), "default".into(), "off".into()]);
        a
    }

    /// A cluster node: clients over TLS on `tls_port` as the ACL user, the
    /// cluster bus over TLS, and a plaintext `port` (default user) for the
    /// test kit.
    pub(crate) fn cluster_args(&self, dir: &Path, port: u16, tls_port: u16) -> Vec<String> {
        let mut a = self.tls_args(dir, port, tls_port);
        a.extend(["--tls-cluster".into(), "yes".into()]);
        a
    }

    fn tls_args(&self, dir: &Path, port: u16, tls_port: u16) -> Vec<String> {
        let p = |n: &str| dir.join(n).display().to_string();
        vec![
            "--port".into(),
            port.to_string(),
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            p("server.crt"),
            "--tls-key-file".into(),
            p("server.key"),
            "--tls-ca-cert-file".into(),
            p("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
            "--user".into(),
            super::TLS_USER.into(),
            "on".into(),
            format!(">{}", super::TLS_PASSWORD),
            "~*".into(),
            "&*".into(),
            "+@all".into(),
        ]
    }
}

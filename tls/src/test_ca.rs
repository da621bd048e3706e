//! A certificate authority made for one test: its root for a client to pin, and server
//! certificates for any names, valid or expired, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};

use crate::CertificateFiles;

pub struct TestCa {
    certificate: Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let certificate = params.self_signed(&key).expect("self-signed");
        Self { certificate, key }
    }

    /// Writes the CA's certificate (what a client pins) to `path`.
    pub fn write_root(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.certificate.pem()).expect("write CA");
        path.to_owned()
    }

    /// A server certificate for `names` (host names or IP addresses) and its key, written to
    /// `dir/{stem}.pem` and `dir/{stem}.key`; `expired` makes one that ran out in 2020.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str], expired: bool) -> CertificateFiles {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, stem);
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let certificate = params.signed_by(&key, &self.certificate, &self.key).expect("sign");
        let files = CertificateFiles {
            certificate: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.certificate, certificate.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}

//! A throwaway certificate authority, server and client certificates for TLS tests, made with
//! openssl.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::netns::run;

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Creates the CA and a server certificate for `server_ip` plus a client certificate, in `dir`.
pub fn generate(dir: &Path, server_ip: &str) -> Result<TlsFiles> {
    let path = |name: &str| dir.join(name);
    let files = TlsFiles {
        ca: path("ca.pem"),
        server_cert: path("server.pem"),
        server_key: path("server-key.pem"),
        client_cert: path("client.pem"),
        client_key: path("client-key.pem"),
    };
    let ca_key = path("ca-key.pem");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=overlay test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        &display(&ca_key),
        "-out",
        &display(&files.ca),
    ])?;
    let sign = |name: &str, cert: &Path, key: &Path, extensions: &str| -> Result<()> {
        let request = path(&format!("{name}.csr"));
        let extfile = path(&format!("{name}.ext"));
        std::fs::write(&extfile, extensions)?;
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &display(key),
            "-out",
            &display(&request),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &display(&request),
            "-CA",
            &display(&files.ca),
            "-CAkey",
            &display(&ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &display(&extfile),
            "-out",
            &display(cert),
        ])
    };
    sign(
        "server",
        &files.server_cert,
        &files.server_key,
        &format!(
            "subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n"
        ),
    )?;
    sign(
        "client",
        &files.client_cert,
        &files.client_key,
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
    )?;
    Ok(files)
}

fn openssl(args: &[&str]) -> Result<()> {
    run(Command::new("openssl").args(args)).map(drop)
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

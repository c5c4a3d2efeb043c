//! Mutual TLS on every internal hop, with the four real binaries: `[internal_tls]` (a CA and one
//! certificate from `scripts/certs.sh`) in the stack's config file. A chat through the gateway
//! crosses gateway → backend manager → scheduler and registry, all over mutual TLS; the
//! management status reaches all three. On each internal port: a plain-text client, a TLS client
//! without a certificate and a TLS client with a certificate from another CA are refused; one
//! with the stack's CA-signed certificate is served.
//!
//! Skipped LOUDLY where `openssl` (which the certificate script uses) is missing.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use securellm_e2e::{ModelSpec, Options, Stack};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn certs(dir: &Path) -> bool {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/certs.sh");
    match Command::new(script)
        .arg(dir)
        .arg("local=localhost,127.0.0.1")
        .output()
    {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!(
            "scripts/certs.sh failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("scripts/certs.sh: {e}"),
    }
}

/// A health check on `addr` with `tls` (`None`: plain text); `Ok` when served.
async fn health(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(t) = tls {
        e = e.tls_config(t).map_err(|e| e.to_string())?;
    }
    let ch = e.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(drop)
        .map_err(|e| format!("check: {e}"))
}

fn client(ca: &Path, identity: Option<(&Path, &Path)>) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        c = c.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_internal_hop_is_mutual_tls_and_strangers_are_refused() {
    securellm_common::tls::install_crypto_provider();
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("WARNING: openssl is missing: the mutual TLS test is SKIPPED");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (good, rogue) = (dir.path().join("ca"), dir.path().join("rogue"));
    assert!(certs(&good) && certs(&rogue));
    let s = Stack::start(Options {
        models: vec![ModelSpec::tiny("tiny")],
        extra_toml: format!(
            "[internal_tls]\nca_file = \"{0}/ca.pem\"\ncert_file = \"{0}/local.pem\"\nkey_file = \"{0}/local.key\"\n",
            good.display()
        ),
        ..Default::default()
    })
    .await;

    // gateway → backend manager → scheduler + registry, all over mutual TLS.
    let r = s.chat(&s.api_key, "tiny", 8, "mtls-1").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let status: serde_json::Value = s
        .http()
        .get(format!(
            "{}/admin/v1/status",
            s.base_url().trim_end_matches("/v1")
        ))
        .bearer_auth(&s.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["up"], true, "{status}");

    let ca = good.join("ca.pem");
    for svc in [&s.scheduler, &s.registry, &s.backend] {
        let a = svc.grpc;
        let plain = health(a, None).await;
        assert!(plain.is_err(), "{}: plain text was served", svc.name);
        let anonymous = health(a, Some(client(&ca, None))).await;
        assert!(
            anonymous.is_err(),
            "{}: a client without a certificate was served",
            svc.name
        );
        let stranger = health(
            a,
            Some(client(
                &ca,
                Some((&rogue.join("local.pem"), &rogue.join("local.key"))),
            )),
        )
        .await;
        assert!(
            stranger.is_err(),
            "{}: another CA's certificate was accepted",
            svc.name
        );
        let member = health(
            a,
            Some(client(
                &ca,
                Some((&good.join("local.pem"), &good.join("local.key"))),
            )),
        )
        .await;
        assert!(
            member.is_ok(),
            "{}: the stack's own certificate: {member:?}",
            svc.name
        );
    }
}

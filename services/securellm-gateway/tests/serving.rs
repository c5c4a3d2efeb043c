//! The HTTP listener on its own (no backends needed): TLS with HTTP/1.1 and HTTP/2, and the limits
//! that keep slow, idle or oversized clients from exhausting the gateway.

use std::path::Path;
use std::time::{Duration, Instant};

use securellm_gateway::config::GatewayConfig;
use securellm_gateway::keys::NewKey;
use securellm_testkit::gateway::{read_until_closed, standalone_gateway};
use securellm_testkit::{ready_word, spawn_ready};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn openssl(args: &[&str], dir: &Path) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command is needed to make test certificates");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate for 127.0.0.1 / localhost signed by it (made by the
/// `openssl` command). Returns (ca.pem, cert.pem, key.pem).
fn test_pki(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-days",
        "2",
        "-subj",
        "/CN=securellm test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&ca, dir);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-subj",
        "/CN=localhost",
        "-keyout",
        "key.pem",
        "-out",
        "server.csr",
    ]);
    openssl(&csr, dir);
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "cert.pem",
        ],
        dir,
    );
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_http1_and_http2_and_refuses_plain_text() {
    securellm_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, cert, key) = test_pki(dir.path());
    let gw = standalone_gateway(&dir.path().join("gw"), |c| {
        c.tls = Some(securellm_gateway::listener::TlsConfig {
            cert_file: cert.clone(),
            key_file: key.clone(),
        })
    })
    .await;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca_pem).unwrap()).unwrap();
    let url = format!("https://127.0.0.1:{}/health", gw.http_addr.port());
    for (h1, want) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        let mut b = reqwest::Client::builder().add_root_certificate(ca.clone());
        if h1 {
            b = b.http1_only();
        }
        let r = b.build().unwrap().get(&url).send().await.unwrap();
        assert_eq!((r.status().as_u16(), r.version()), (200, want));
    }
    // The gRPC port speaks TLS too (ALPN h2): a raw gRPC health check over HTTP/2.
    let grpc = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = grpc
        .post(format!(
            "https://127.0.0.1:{}/grpc.health.v1.Health/Check",
            gw.grpc_addr.port()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        // One uncompressed message: HealthCheckRequest { service: "" } is zero bytes.
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_2)
    );
    let body = r.bytes().await.unwrap();
    // HealthCheckResponse { status: SERVING (1) } = field 1, varint 1.
    assert_eq!(&body[..], &[0u8, 0, 0, 0, 2, 8, 1], "{body:?}");
    assert!(
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap()
            .post(format!(
                "http://{}/grpc.health.v1.Health/Check",
                gw.grpc_addr
            ))
            .header("content-type", "application/grpc")
            .body(vec![0u8, 0, 0, 0, 0])
            .send()
            .await
            .is_err(),
        "plain-text gRPC on the TLS port must not work"
    );
    // An unknown certificate authority is refused by the client, plain HTTP by the server.
    assert!(reqwest::get(&url).await.is_err());
    let plain = reqwest::get(format!("http://{}/health", gw.http_addr)).await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP on the TLS port must not work"
    );
    gw.shutdown().await;

    // Bad certificate files fail the start with the field named.
    let bad = GatewayConfig {
        listen: "127.0.0.1:0".into(),
        http_listen: "127.0.0.1:0".into(),
        data_dir: Some(dir.path().join("gw2")),
        tls: Some(securellm_gateway::listener::TlsConfig {
            cert_file: dir.path().join("missing.pem"),
            key_file: key.clone(),
        }),
        ..Default::default()
    };
    let e = securellm_gateway::start(&bad).await.err().unwrap();
    assert!(e.to_string().contains("gateway.tls.cert_file"), "{e}");
    let bad = GatewayConfig {
        tls: Some(securellm_gateway::listener::TlsConfig {
            cert_file: cert.clone(),
            key_file: cert.clone(),
        }),
        ..bad
    };
    let e = securellm_gateway::start(&bad).await.err().unwrap();
    assert!(e.to_string().contains("gateway.tls.key_file"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_oversized_clients_are_cut_off() {
    securellm_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let gw = standalone_gateway(&dir.path().join("gw"), |c| {
        c.header_read_timeout_ms = 400;
        c.body_read_timeout_ms = 400;
        c.max_header_bytes = securellm_common::ByteSize(16 << 10);
    })
    .await;
    let addr = gw.http_addr;
    let limit = Duration::from_secs(5);

    // Slowloris on headers: half a request head, then silence → closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut s, limit).await;
    let t = closed.expect("a connection stuck in its headers is closed");
    assert!(t >= Duration::from_millis(300), "{t:?}");

    // A connection that never sends anything → closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(read_until_closed(&mut s, limit).await.1.is_some());

    // An idle keep-alive connection after a complete request → answered, then closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (text, closed) = read_until_closed(&mut s, limit).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(closed.is_some(), "an idle keep-alive connection is closed");

    // Half an HTTP/2 preface, then silence → closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(
        read_until_closed(&mut s, limit).await.1.is_some(),
        "a stalled HTTP/2 preface is closed"
    );

    // A complete HTTP/2 connection (preface + empty SETTINGS) that never sends a request → closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut s, limit).await;
    assert!(closed.is_some(), "an idle HTTP/2 connection is closed");

    // A request head over the limit → 431 (or the connection closed), never served.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let (text, _) = read_until_closed(&mut s, limit).await;
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );

    // Slowloris on the body: an authenticated request whose body stalls → 408, audited.
    let (key, _) = gw
        .state
        .keys
        .create(NewKey {
            name: "k".into(),
            models: vec!["*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\nX-Request-Id: slow-body\r\n\r\n{{\"model\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (text, _) = read_until_closed(&mut s, limit).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));
    gw.state.audit.flush().await;
    let rows = gw.state.audit.query(Default::default()).await.unwrap();
    assert!(
        rows.iter()
            .any(|r| r.entry.request_id == "slow-body" && r.entry.status == 408),
        "the stalled request has its audit row"
    );

    // The gateway still serves normal clients.
    let r = reqwest::get(format!("http://{addr}/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_limit_an_idle_connection_makes_room_and_a_busy_one_does_not() {
    securellm_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let gw = standalone_gateway(&dir.path().join("gw"), |c| {
        c.max_connections = 1;
        // Long: only shedding can explain a prompt answer below.
        c.header_read_timeout_ms = 30_000;
        c.body_read_timeout_ms = 4_000;
    })
    .await;
    let addr = gw.http_addr;
    // An idle connection holding the only slot is closed to make room for a new caller.
    let mut hog = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        reqwest::get(format!("http://{addr}/health")),
    )
    .await
    .expect("an idle connection kept the only slot")
    .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    assert!(
        read_until_closed(&mut hog, Duration::from_secs(5))
            .await
            .1
            .is_some(),
        "the idle connection was shed"
    );
    // A connection with a request in progress (an upload whose body has not all arrived) keeps
    // its slot: the next caller waits until it ends (408 at the body deadline).
    let (key, rec) = gw
        .state
        .keys
        .create(NewKey {
            name: "k".into(),
            models: vec!["*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut busy = TcpStream::connect(addr).await.unwrap();
    busy.write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 100\r\n\r\n{{").as_bytes())
        .await
        .unwrap();
    for _ in 0..200 {
        if gw.state.inflight.of_key(&rec.id) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.state.inflight.of_key(&rec.id), 1);
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        reqwest::get(format!("http://{addr}/health")),
    )
    .await
    .expect("never served after the busy connection ended")
    .unwrap();
    assert_eq!(r.status(), 200);
    let waited = started.elapsed();
    let (text, _) = read_until_closed(&mut busy, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        waited >= Duration::from_millis(1_000),
        "served while the only slot had a request in progress ({waited:?})"
    );
    // The gRPC port has its own cap, with the same rule: an idle connection makes room.
    let hog = TcpStream::connect(gw.grpc_addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.grpc_addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(10));
    let ch = ch.connect().await.unwrap();
    let mut c = securellm_proto::v1::gateway_client::GatewayClient::new(ch);
    let e = c
        .list_models(securellm_proto::v1::GatewayListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::Unauthenticated,
        "served: the idle connection made room"
    );
    drop(hog);
    gw.shutdown().await;
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, field) in [
        (
            "[gateway]\nmax_connections = 0\n",
            "gateway.max_connections",
        ),
        (
            "[gateway]\nheader_read_timeout_ms = 1\n",
            "gateway.header_read_timeout_ms",
        ),
        (
            "[gateway]\nmax_header_bytes = \"1KiB\"\n",
            "gateway.max_header_bytes",
        ),
        ("[gateway]\ntls = { cert_file = \"c.pem\" }\n", "key_file"),
    ] {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml).unwrap();
        let args = <securellm_gateway::config::Args as clap::Parser>::parse_from([
            "securellm-gateway",
            "--config",
            p.to_str().unwrap(),
        ]);
        let e = GatewayConfig::resolve(&args).unwrap_err().to_string();
        assert!(e.contains(field), "{toml}: {e}");
    }
}

/// The gateway binary on `data`, with a bootstrap key; returns the child and its addresses.
async fn spawn_gateway(data: &Path) -> (tokio::process::Child, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_securellm-gateway"));
    cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--backend", "127.0.0.1:1", "--registry", "127.0.0.1:1"])
        .arg("--data-dir")
        .arg(data)
        .arg("--bootstrap-key-file")
        .arg(data.join("api-key"))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null());
    let (child, ready) = spawn_ready(cmd, Duration::from_secs(20)).await;
    (
        child,
        ready_word(&ready, "grpc="),
        ready_word(&ready, "http="),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_audit_rows_survive_kill_9_of_the_gateway_and_the_chain_stays_valid() {
    use securellm_proto::v1 as pb;
    use securellm_proto::v1::gateway_admin_client::GatewayAdminClient;
    securellm_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gw");
    let (mut child, grpc, http_addr) = spawn_gateway(&data).await;
    let key = std::fs::read_to_string(data.join("api-key"))
        .unwrap()
        .trim()
        .to_string();
    let token = std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let http = reqwest::Client::new();
    let url = format!("http://{http_addr}/v1/chat/completions");
    let (h, u, k) = (http.clone(), url.clone(), key.clone());
    let send = move |rid: String| {
        let http = h.clone();
        let url = u.clone();
        let key = k.clone();
        async move {
            // No backend runs: each request is answered 503 and audited.
            let _ = http
                .post(&url)
                .bearer_auth(&key)
                .header("x-request-id", rid)
                .json(&serde_json::json!({"model": "tiny", "messages": []}))
                .send()
                .await;
        }
    };
    for i in 0..100 {
        send(format!("before-{i}")).await;
    }
    // Acknowledged = readable through the admin API (it reads the committed database).
    let ch = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut admin = GatewayAdminClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", auth.clone());
        Ok(r)
    });
    let mut committed = 0;
    for _ in 0..100 {
        committed = admin
            .query_audit(pb::QueryAuditRequest {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .rows
            .iter()
            .filter(|r| r.request_id.starts_with("before-"))
            .count();
        if committed == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(committed, 100);
    // A flood in flight, then kill -9 in the middle of it.
    let flood: Vec<_> = (0..8)
        .map(|t| {
            let send = send.clone();
            tokio::spawn(async move {
                for i in 0..10_000 {
                    send(format!("during-{t}-{i}")).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    for f in flood {
        f.abort();
    }
    let db = data.join("gateway-audit.db");
    let v = securellm_gateway::audit::verify_file(&db).await.unwrap();
    assert!(v.ok, "after kill -9: {v:?}");
    assert!(v.rows_checked >= 100);
    // Restarted on the same file, the gateway extends the same chain.
    let (mut child, _, http_addr) = spawn_gateway(&data).await;
    let r = reqwest::Client::new()
        .get(format!("http://{http_addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let url2 = format!("http://{http_addr}/v1/chat/completions");
    let _ = http
        .post(&url2)
        .bearer_auth(&key)
        .header("x-request-id", "after-restart")
        .json(&serde_json::json!({"model": "tiny", "messages": []}))
        .send()
        .await
        .unwrap();
    // SIGTERM: a graceful stop flushes the audit log.
    let pid = child.id().unwrap() as i32;
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the gateway stops on SIGTERM")
        .unwrap();
    let v2 = securellm_gateway::audit::verify_file(&db).await.unwrap();
    assert!(v2.ok, "{v2:?}");
    assert!(v2.rows_checked > v.rows_checked, "the restart appended");
    let conn = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit WHERE request_id LIKE 'before-%'")
        .fetch_one(&conn)
        .await
        .unwrap();
    assert_eq!(n, 100, "every acknowledged row survived");
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM audit WHERE request_id = 'after-restart'")
            .fetch_one(&conn)
            .await
            .unwrap();
    assert_eq!(n, 1, "the SIGTERM stop flushed the last row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_names_the_backends_it_cannot_reach() {
    securellm_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let gw = standalone_gateway(&dir.path().join("gw"), |_| {}).await;
    let r = reqwest::get(format!("http://{}/ready", gw.http_addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("registry") && msg.contains("backend manager"),
        "{msg}"
    );
    // Liveness does not depend on them.
    let r = reqwest::get(format!("http://{}/health", gw.http_addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gw.shutdown().await;
}

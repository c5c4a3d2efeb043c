//! The real scheduler over real gRPC on loopback: in-process servers for most behaviours, the
//! built binary for restart / re-attach, reflection and the internal token.

use std::process::Stdio;
use std::time::Duration;

use securellm_common::internal_auth::{AuthChannel, InternalToken, authenticated};
use securellm_proto::v1 as pb;
use securellm_proto::v1::acquire_lease_update::Update;
use securellm_proto::v1::lease_event::Kind;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use vram_scheduler::config::{InventoryMode, SchedulerConfig};

const GIB: u64 = 1 << 30;

fn config(sizes: &[u64], grace_ms: u64) -> SchedulerConfig {
    SchedulerConfig {
        listen: "127.0.0.1:0".into(),
        inventory: InventoryMode::Simulated,
        simulate_gpus: sizes
            .iter()
            .map(|&s| securellm_common::ByteSize(s))
            .collect(),
        eviction_grace_ms: grace_ms,
        ..SchedulerConfig::default()
    }
}

async fn start(
    sizes: &[u64],
    grace_ms: u64,
) -> (
    vram_scheduler::RunningScheduler,
    VramSchedulerClient<AuthChannel>,
) {
    let s = vram_scheduler::start(&config(sizes, grace_ms))
        .await
        .unwrap();
    let ch = Channel::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (s, VramSchedulerClient::new(authenticated(ch, None)))
}

fn acq(holder: &str, bytes: u64, priority: i32, wait_ms: u64) -> pb::AcquireLeaseRequest {
    pb::AcquireLeaseRequest {
        holder: holder.into(),
        bytes,
        priority,
        gpu_index: None,
        ttl_ms: 60_000,
        wait_ms,
        label: String::new(),
    }
}

/// Acquire and wait for the grant.
async fn lease(c: &mut VramSchedulerClient<AuthChannel>, r: pb::AcquireLeaseRequest) -> pb::Lease {
    let mut s = c.acquire_lease(r).await.unwrap().into_inner();
    while let Some(u) = s.next().await {
        if let Update::Granted(l) = u.unwrap().update.unwrap() {
            return l;
        }
    }
    panic!("stream ended without a grant");
}

async fn next_event(w: &mut tonic::Streaming<pb::LeaseEvent>, kind: Kind) -> pb::LeaseEvent {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = w.next().await.unwrap().unwrap();
            if e.kind == kind as i32 {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind:?} event within 10 s"))
}

#[tokio::test]
async fn acquire_status_release() {
    let (_s, mut c) = start(&[8 * GIB], 10_000).await;
    let l = lease(&mut c, acq("a", 3 * GIB, 0, 0)).await;
    assert_eq!(l.bytes, 3 * GIB);
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.inventory, "simulated");
    assert_eq!(st.gpus[0].leased_bytes, 3 * GIB);
    assert_eq!(st.gpus[0].grantable_bytes, 5 * GIB);
    assert_eq!(st.leases.len(), 1);
    c.release_lease(pb::ReleaseLeaseRequest {
        lease_id: l.id.clone(),
    })
    .await
    .unwrap();
    let e = c
        .release_lease(pb::ReleaseLeaseRequest { lease_id: l.id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.gpus[0].leased_bytes, 0);
}

#[tokio::test]
async fn bad_input_gets_clear_status_codes() {
    let (_s, mut c) = start(&[8 * GIB], 10_000).await;
    let cases = [
        (acq("", GIB, 0, 0), Code::InvalidArgument, "holder"),
        (acq("a", 0, 0, 0), Code::InvalidArgument, "bytes"),
        (acq("a", 100 * GIB, 0, 0), Code::InvalidArgument, "bytes"),
        (
            pb::AcquireLeaseRequest {
                ttl_ms: 0,
                ..acq("a", GIB, 0, 0)
            },
            Code::InvalidArgument,
            "ttl_ms",
        ),
        (
            pb::AcquireLeaseRequest {
                ttl_ms: u64::MAX,
                ..acq("a", GIB, 0, 0)
            },
            Code::InvalidArgument,
            "ttl_ms",
        ),
        (
            pb::AcquireLeaseRequest {
                gpu_index: Some(3),
                ..acq("a", GIB, 0, 0)
            },
            Code::NotFound,
            "gpu_index",
        ),
    ];
    for (r, code, field) in cases {
        let e = c.acquire_lease(r).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message().contains(field),
            "{} should name {field}",
            e.message()
        );
    }
    // What can never fit says so in a form a program reads (not only in words); other invalid
    // input carries no such reason.
    use securellm_common::errors::{Reason, reason_of};
    let e = c
        .acquire_lease(acq("a", 100 * GIB, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&e), Some(Reason::NeverFits), "{e:?}");
    let e = c.acquire_lease(acq("a", 0, 0, 0)).await.unwrap_err();
    assert_eq!(reason_of(&e), None, "{e:?}");
    let e = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .resize_lease(pb::ResizeLeaseRequest {
            lease_id: "nope".into(),
            bytes: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    lease(&mut c, acq("a", 7 * GIB, 0, 0)).await;
    let e = c.acquire_lease(acq("b", 2 * GIB, 0, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.leases.len(), 1, "refused requests changed nothing");
    assert!(st.queue.is_empty());
}

#[tokio::test]
async fn queued_request_sees_its_position_and_is_granted_on_release() {
    let (_s, mut c) = start(&[8 * GIB], 10_000).await;
    let a = lease(&mut c, acq("a", 6 * GIB, 0, 0)).await;
    let mut waiting = c
        .acquire_lease(acq("b", 4 * GIB, 0, 30_000))
        .await
        .unwrap()
        .into_inner();
    match waiting.next().await.unwrap().unwrap().update.unwrap() {
        Update::Queued(p) => assert_eq!((p.position, p.queue_length), (0, 1)),
        other => panic!("expected a queue position, got {other:?}"),
    }
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.queue.len(), 1);
    c.release_lease(pb::ReleaseLeaseRequest { lease_id: a.id })
        .await
        .unwrap();
    let granted = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Update::Granted(l) = waiting.next().await.unwrap().unwrap().update.unwrap() {
                return l;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(granted.holder, "b");
}

#[tokio::test]
async fn dropping_a_queued_stream_withdraws_the_request() {
    let (_s, mut c) = start(&[8 * GIB], 10_000).await;
    lease(&mut c, acq("a", 6 * GIB, 0, 0)).await;
    let mut waiting = c
        .acquire_lease(acq("b", 4 * GIB, 0, 30_000))
        .await
        .unwrap()
        .into_inner();
    waiting.next().await.unwrap().unwrap();
    drop(waiting);
    let mut empty = false;
    for _ in 0..50 {
        let st = c
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if st.queue.is_empty() {
            empty = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(empty, "the queue still holds a request nobody waits for");
}

#[tokio::test]
async fn wait_deadline_ends_the_stream_with_deadline_exceeded() {
    let (_s, mut c) = start(&[8 * GIB], 10_000).await;
    lease(&mut c, acq("a", 6 * GIB, 0, 0)).await;
    let mut waiting = c
        .acquire_lease(acq("b", 4 * GIB, 0, 300))
        .await
        .unwrap()
        .into_inner();
    waiting.next().await.unwrap().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), waiting.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end.unwrap_err().code(), Code::DeadlineExceeded);
}

#[tokio::test]
async fn unrenewed_lease_expires_by_ttl() {
    let (_s, mut c) = start(&[8 * GIB], 10_000).await;
    let mut w = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let short = lease(
        &mut c,
        pb::AcquireLeaseRequest {
            ttl_ms: 300,
            ..acq("a", GIB, 0, 0)
        },
    )
    .await;
    let kept = lease(
        &mut c,
        pb::AcquireLeaseRequest {
            ttl_ms: 300,
            ..acq("b", GIB, 0, 0)
        },
    )
    .await;
    let renewer = {
        let mut c = c.clone();
        let id = kept.id.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                c.renew_lease(pb::RenewLeaseRequest {
                    lease_id: id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        })
    };
    let e = next_event(&mut w, Kind::Expired).await;
    assert_eq!(e.lease.unwrap().id, short.id);
    renewer.await.unwrap();
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.leases.iter().map(|l| l.id.clone()).collect::<Vec<_>>(),
        vec![kept.id]
    );
    let e = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: short.id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("expired"), "{}", e.message());
}

#[tokio::test]
async fn lower_priority_holder_releases_on_eviction_notice() {
    let (_s, mut c) = start(&[8 * GIB], 10_000).await;
    let low = lease(&mut c, acq("low", 6 * GIB, 1, 0)).await;
    let mut notices = c
        .watch_events(pb::WatchEventsRequest {
            holder: "low".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The low-priority holder: releases when told to.
    let holder = {
        let mut c = c.clone();
        tokio::spawn(async move {
            let e = next_event(&mut notices, Kind::EvictionNotice).await;
            let l = e.lease.unwrap();
            assert!(l.evict_by_ms.is_some());
            c.release_lease(pb::ReleaseLeaseRequest {
                lease_id: l.id.clone(),
            })
            .await
            .unwrap();
            l.id
        })
    };
    let high = lease(&mut c, acq("high", 6 * GIB, 5, 30_000)).await;
    assert_eq!(holder.await.unwrap(), low.id);
    assert_eq!(high.holder, "high");
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.gpus[0].leased_bytes, 6 * GIB);
}

#[tokio::test]
async fn ignored_eviction_notice_is_revoked_at_the_deadline() {
    let (_s, mut c) = start(&[8 * GIB], 300).await;
    let mut w = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let low = lease(&mut c, acq("low", 6 * GIB, 1, 0)).await;
    let t0 = std::time::Instant::now();
    let high = tokio::time::timeout(
        Duration::from_secs(5),
        lease(&mut c, acq("high", 6 * GIB, 5, 30_000)),
    )
    .await
    .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "granted before the notice deadline"
    );
    assert_eq!(high.holder, "high");
    let e = next_event(&mut w, Kind::Revoked).await;
    assert_eq!(e.lease.unwrap().id, low.id);
    let e = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: low.id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("revoked"), "{}", e.message());
}

#[tokio::test]
async fn resize_settles_a_lease() {
    let (_s, mut c) = start(&[8 * GIB], 10_000).await;
    let a = lease(&mut c, acq("a", 4 * GIB, 0, 0)).await;
    lease(&mut c, acq("b", 3 * GIB, 0, 0)).await;
    let l = c
        .resize_lease(pb::ResizeLeaseRequest {
            lease_id: a.id.clone(),
            bytes: 2 * GIB,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.bytes, 2 * GIB);
    let l = c
        .resize_lease(pb::ResizeLeaseRequest {
            lease_id: a.id.clone(),
            bytes: 5 * GIB,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.bytes, 5 * GIB);
    let e = c
        .resize_lease(pb::ResizeLeaseRequest {
            lease_id: a.id,
            bytes: 6 * GIB,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn simulated_foreign_usage_is_settable_and_not_grantable() {
    let (_s, mut c) = start(&[8 * GIB], 10_000).await;
    let g = c
        .set_simulated_foreign_usage(pb::SetSimulatedForeignUsageRequest {
            gpu_index: 0,
            foreign_bytes: 5 * GIB,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.foreign_bytes, g.grantable_bytes), (5 * GIB, 3 * GIB));
    let e = c.acquire_lease(acq("a", 4 * GIB, 0, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let e = c
        .set_simulated_foreign_usage(pb::SetSimulatedForeignUsageRequest {
            gpu_index: 9,
            foreign_bytes: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

/// A scheduler binary as a child process, and the internal token it created in its data
/// directory.
struct Binary {
    child: tokio::process::Child,
    addr: String,
    token: InternalToken,
}

async fn spawn_binary(data_dir: &std::path::Path) -> Binary {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vram-scheduler"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--simulate-gpu",
            "8GiB",
            "--data-dir",
        ])
        .arg(data_dir)
        .env_remove(securellm_common::internal_auth::TOKEN_FILE_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // `ready vram-scheduler grpc=HOST:PORT metrics=HOST:PORT`
    let addr = line
        .strip_prefix("ready vram-scheduler grpc=")
        .and_then(|rest| rest.split_whitespace().next())
        .expect(&line)
        .to_string();
    assert!(line.contains(" metrics=127.0.0.1:"), "{line}");
    let token = securellm_common::internal_auth::load(&data_dir.join("internal-token")).unwrap();
    Binary { child, addr, token }
}

impl Binary {
    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(&self) -> VramSchedulerClient<AuthChannel> {
        VramSchedulerClient::new(authenticated(self.channel().await, Some(&self.token)))
    }

    async fn stop(mut self) {
        let pid = self.child.id().unwrap() as i32;
        // SIGTERM: graceful, writes the snapshot.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn holder_reattaches_after_a_restart_and_nothing_is_double_booked() {
    let dir = tempfile::tempdir().unwrap();
    let b = spawn_binary(dir.path()).await;
    let mut c = b.client().await;
    let held = lease(&mut c, acq("backend-manager", 5 * GIB, 0, 0)).await;
    b.stop().await;

    let b = spawn_binary(dir.path()).await;
    let mut c = b.client().await;
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.gpus[0].leased_bytes,
        5 * GIB,
        "the snapshot kept the lease"
    );
    // Someone else cannot take the memory the holder still uses.
    let e = c
        .acquire_lease(acq("other", 4 * GIB, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let out = c
        .reattach(pb::ReattachRequest {
            holder: "backend-manager".into(),
            leases: vec![held.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.confirmed.len(), 1);
    assert!(out.lost.is_empty());
    c.renew_lease(pb::RenewLeaseRequest {
        lease_id: held.id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    b.stop().await;

    // Snapshot lost (a fresh data dir): the holder's lease is restored on reattach.
    let fresh = tempfile::tempdir().unwrap();
    let b = spawn_binary(fresh.path()).await;
    let mut c = b.client().await;
    let out = c
        .reattach(pb::ReattachRequest {
            holder: "backend-manager".into(),
            leases: vec![held.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.restored.len(), 1);
    assert_eq!(out.restored[0].id, held.id);
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.gpus[0].leased_bytes, 5 * GIB);
    b.stop().await;
}

#[tokio::test]
async fn reflection_lists_every_contract_and_health_is_serving() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let b = spawn_binary(dir.path()).await;
    let ch = b.channel().await;
    let mut r = ServerReflectionClient::new(authenticated(ch.clone(), Some(&b.token)));
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        resp.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "securellm.v1.VramScheduler",
        "securellm.v1.ModelRegistry",
        "securellm.v1.BackendManager",
        "securellm.v1.Gateway",
        "securellm.v1.GatewayAdmin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let s = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "securellm.v1.VramScheduler".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    b.stop().await;
}

/// The binary creates its internal token (0600) on first start and refuses every call without it
/// or with another one (reflection included); health checks stay open; the token works.
#[tokio::test]
async fn the_binary_refuses_callers_without_the_internal_token() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let b = spawn_binary(dir.path()).await;
    let file = dir.path().join("internal-token");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let ch = b.channel().await;
    let wrong = InternalToken::generate();
    for (what, token) in [("no token", None), ("a wrong token", Some(&wrong))] {
        let mut c = VramSchedulerClient::new(authenticated(ch.clone(), token));
        let e = c.get_status(pb::GetStatusRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        let e = c
            .acquire_lease(acq("intruder", GIB, 100, 0))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        let mut r = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            authenticated(ch.clone(), token),
        );
        let e = r
            .server_reflection_info(tokio_stream::iter([
                tonic_reflection::pb::v1::ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(
                        tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                            String::new(),
                        ),
                    ),
                },
            ]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
    }
    // A raw header without the Bearer scheme is not enough either.
    let raw: tonic::metadata::MetadataValue<_> = b.token.expose().parse().unwrap();
    let mut req = tonic::Request::new(pb::GetStatusRequest {});
    req.metadata_mut().insert("authorization", raw);
    let e = VramSchedulerClient::new(ch.clone())
        .get_status(req)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Health checks need no token.
    let s = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Nothing was granted to the refused callers; the token works.
    let st = b
        .client()
        .await
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.leases.is_empty() && st.queue.is_empty(), "{st:?}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_gets_data_loss_not_a_silent_gap() {
    let (s, mut c) = start(&[8 * GIB], 10_000).await;
    let mut w = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Far more events than the buffers hold (the event channel, HTTP/2 windows and send buffers)
    // while the watcher reads nothing; made in-process, to be quick.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..20_000 {
        let out = s
            .handle
            .acquire(
                vram_scheduler::table::AcquireRequest {
                    holder: format!("h{}", i % 7),
                    label: String::new(),
                    bytes: GIB,
                    priority: 0,
                    gpu: None,
                    ttl_ms: 60_000,
                    wait_ms: 0,
                },
                tx.clone(),
            )
            .await
            .unwrap();
        let vram_scheduler::table::AcquireOutcome::Granted(l) = out else {
            panic!("not granted");
        };
        s.handle.release(l.id).await.unwrap();
    }
    let mut seen = 0;
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match w.next().await {
                Some(Ok(_)) => seen += 1,
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream ends");
    let e = end.expect("an error, not a silent end");
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("fell behind"), "{e:?}");
    assert!(seen > 0, "events before the gap were delivered");
}

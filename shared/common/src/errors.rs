//! One error vocabulary for every hop: gRPC codes, HTTP statuses and machine-readable reasons.
//!
//! - [`http_status`] is **the** table from a gRPC code to an HTTP status (the one in
//!   `google/rpc/code.proto`), used for a service's own refusals (the gateway's admin API and its
//!   audit rows); [`upstream_http_status`] is the same table seen from a proxy whose upstream
//!   failed (the upstream's faults become 502 / 503 / 504); [`code_for_http`] goes back, for
//!   errors born as HTTP (the gateway's own checks, cloud upstreams). So a refusal has one status
//!   wherever it is shown.
//! - A [`Reason`] travels with a [`tonic::Status`] as a `google.rpc.ErrorInfo` detail
//!   ([`status`], [`reason_of`]; domain [`DOMAIN`]), so a caller decides on the reason, never on
//!   the words of the message (which are for people and may change).
//! - [`is_connection_failure`] tells a call that never got an answer (the connection broke or was
//!   refused) from an answer, by the error's source chain rather than its text.

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every reason SecureLLM attaches.
pub const DOMAIN: &str = "securellm.dev";

/// Why a call failed, in words a program can match. The `ErrorInfo.reason` is
/// [`Reason::as_str`] (UPPER_SNAKE_CASE, as `google.rpc.ErrorInfo` asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The memory asked for is more than any eligible GPU could ever grant (scheduler).
    NeverFits,
    /// No GPU memory could be had in time (scheduler queue, backend manager).
    InsufficientGpuMemory,
    /// No model by that name, id or alias (registry, backend manager).
    ModelNotFound,
    /// The model exists but cannot be served (bad file, unsupported format) (registry, backend).
    ModelUnusable,
    /// The lease is unknown, expired or revoked (scheduler).
    LeaseNotFound,
    /// The engine stopped producing output (backend manager).
    EngineStalled,
    /// A service this one depends on did not answer (any hop).
    DependencyUnavailable,
}

impl Reason {
    /// Every reason (for tests and documentation).
    pub const ALL: [Reason; 7] = [
        Reason::NeverFits,
        Reason::InsufficientGpuMemory,
        Reason::ModelNotFound,
        Reason::ModelUnusable,
        Reason::LeaseNotFound,
        Reason::EngineStalled,
        Reason::DependencyUnavailable,
    ];

    /// The `ErrorInfo.reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NeverFits => "NEVER_FITS",
            Reason::InsufficientGpuMemory => "INSUFFICIENT_GPU_MEMORY",
            Reason::ModelNotFound => "MODEL_NOT_FOUND",
            Reason::ModelUnusable => "MODEL_UNUSABLE",
            Reason::LeaseNotFound => "LEASE_NOT_FOUND",
            Reason::EngineStalled => "ENGINE_STALLED",
            Reason::DependencyUnavailable => "DEPENDENCY_UNAVAILABLE",
        }
    }

    /// The reason named `s`, if it is one of ours.
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The gRPC code a status with this reason carries.
    pub fn code(self) -> Code {
        match self {
            // The request itself asks for the impossible: retrying it never helps.
            Reason::NeverFits => Code::InvalidArgument,
            Reason::InsufficientGpuMemory => Code::ResourceExhausted,
            Reason::ModelNotFound | Reason::LeaseNotFound => Code::NotFound,
            Reason::ModelUnusable => Code::FailedPrecondition,
            Reason::EngineStalled => Code::Aborted,
            Reason::DependencyUnavailable => Code::Unavailable,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status with `reason`'s code, `message` for people, and the reason as an `ErrorInfo` detail.
pub fn status(reason: Reason, message: impl Into<String>) -> tonic::Status {
    tonic::Status::with_error_details(
        reason.code(),
        message,
        ErrorDetails::with_error_info(
            reason.as_str(),
            DOMAIN,
            std::collections::HashMap::<String, String>::new(),
        ),
    )
}

/// The reason a SecureLLM service attached to `s`, if any (another domain's reasons are ignored).
pub fn reason_of(s: &tonic::Status) -> Option<Reason> {
    let info = s.get_details_error_info()?;
    (info.domain == DOMAIN)
        .then(|| Reason::parse(&info.reason))
        .flatten()
}

/// The HTTP status of a gRPC code (`google/rpc/code.proto`'s mapping).
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
    }
}

/// The HTTP status a proxy answers when its *upstream* failed with `code`: the caller's own faults
/// keep [`http_status`]; the upstream's faults are the proxy's 502 (it failed), 503 (it is
/// unreachable or out of capacity: GPU memory, not the caller's rate, so never 429) or 504 (it
/// did not answer in time).
pub fn upstream_http_status(code: Code) -> u16 {
    match code {
        Code::Unavailable | Code::ResourceExhausted => 503,
        Code::DeadlineExceeded => 504,
        // The upstream refusing *the proxy's* credentials is the proxy's fault, not the caller's.
        Code::Unauthenticated | Code::PermissionDenied => 502,
        Code::Unknown | Code::Internal | Code::DataLoss | Code::Aborted | Code::Cancelled => 502,
        Code::Unimplemented => 501,
        c => http_status(c),
    }
}

/// The gRPC code of an HTTP status, as `proto/securellm/v1/gateway.proto` documents it for errors
/// born as HTTP (the gateway's own checks, cloud upstreams): 408 and 504 `DEADLINE_EXCEEDED`,
/// 413 and 429 `RESOURCE_EXHAUSTED`, 500 `INTERNAL`, other 5xx `UNAVAILABLE`, other 4xx
/// `FAILED_PRECONDITION`; otherwise the inverse of [`http_status`].
pub fn code_for_http(status: u16) -> Code {
    match status {
        200..=299 => Code::Ok,
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        408 | 504 => Code::DeadlineExceeded,
        409 => Code::Aborted,
        413 | 429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        500 => Code::Internal,
        501 => Code::Unimplemented,
        s if (500..600).contains(&s) => Code::Unavailable,
        s if (400..500).contains(&s) => Code::FailedPrecondition,
        _ => Code::Unknown,
    }
}

/// Whether the call got no answer at all: the connection was refused, reset or broke before a
/// status came back (tonic reports these with a transport, hyper or I/O error as the source; a
/// status a server sent has no source).
pub fn is_connection_failure(s: &tonic::Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = cause {
        if e.is::<tonic::transport::Error>() || e.is::<hyper::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_survives_the_wire_encoding() {
        for r in Reason::ALL {
            let s = status(r, "words for people");
            assert_eq!(s.code(), r.code());
            assert_eq!(s.message(), "words for people");
            // What a client decodes: only code, message and details cross the wire.
            let wire =
                tonic::Status::with_details(s.code(), s.message(), s.details().to_vec().into());
            assert_eq!(reason_of(&wire), Some(r), "{r}");
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn no_reason_without_our_error_info() {
        assert_eq!(reason_of(&tonic::Status::not_found("no model")), None);
        let foreign = tonic::Status::with_error_details(
            Code::NotFound,
            "x",
            ErrorDetails::with_error_info(
                "MODEL_NOT_FOUND",
                "example.com",
                std::collections::HashMap::<String, String>::new(),
            ),
        );
        assert_eq!(reason_of(&foreign), None);
    }

    #[test]
    fn the_table_and_its_inverse_agree() {
        use Code::*;
        // Every code an HTTP status maps to maps back to that status.
        for code in [
            Ok,
            Cancelled,
            InvalidArgument,
            Unauthenticated,
            PermissionDenied,
            NotFound,
            Aborted,
            ResourceExhausted,
            Unimplemented,
            Internal,
            Unavailable,
            DeadlineExceeded,
        ] {
            assert_eq!(code_for_http(http_status(code)), code, "{code:?}");
        }
        assert_eq!(http_status(FailedPrecondition), 400);
        assert_eq!(code_for_http(418), FailedPrecondition);
        assert_eq!(code_for_http(413), ResourceExhausted);
        assert_eq!(code_for_http(502), Unavailable);
        assert_eq!(code_for_http(599), Unavailable);
        assert_eq!(code_for_http(302), Unknown);
        // An upstream's faults are the proxy's 5xx; the caller's own stay 4xx.
        assert_eq!(upstream_http_status(Internal), 502);
        assert_eq!(upstream_http_status(Aborted), 502);
        assert_eq!(upstream_http_status(ResourceExhausted), 503);
        assert_eq!(upstream_http_status(DeadlineExceeded), 504);
        assert_eq!(upstream_http_status(FailedPrecondition), 400);
        assert_eq!(upstream_http_status(NotFound), 404);
    }

    #[test]
    fn a_refused_connection_is_a_connection_failure_and_an_answer_is_not() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // A port nothing listens on: bind, note, drop.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect_lazy();
            let s = tonic_health::pb::health_client::HealthClient::new(ch)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .unwrap_err();
            assert!(is_connection_failure(&s), "{s:?}");
        });
        assert!(!is_connection_failure(&tonic::Status::unavailable(
            "transport error"
        )));
    }
}

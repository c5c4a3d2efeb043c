//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the status code
//! OpenAI uses for the same failure, so the official clients raise their matching exception
//! (`AuthenticationError` for 401, `PermissionDeniedError` 403, `NotFoundError` 404,
//! `BadRequestError` 400, `RateLimitError` 429, ...).

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
            headers: Vec::new(),
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .code("invalid_api_key")
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .code("model_not_found")
        .param("model")
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        for (k, v) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(v) {
                r.headers_mut().insert(HeaderName::from_static(k), v);
            }
        }
        r
    }
}

/// A backend-manager gRPC status as the HTTP error OpenAI clients expect. The status comes from
/// the one table (`securellm_common::errors::upstream_http_status`); the OpenAI `code` from the
/// machine-readable reason where the backend gave one.
pub fn from_status(s: &tonic::Status) -> ApiError {
    use securellm_common::errors::{self, Reason};
    use tonic::Code;
    let msg = s.message().to_string();
    // The connection to the backend manager broke (it died or restarted): nothing answered, so
    // this is "unreachable" (retryable), not an upstream failure. Told by the error's source (a
    // transport error), not by its text.
    if errors::is_connection_failure(s) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("the backend manager is unreachable ({msg})"),
        )
        .code("upstream_unreachable")
        .header("retry-after", "1");
    }
    let status = StatusCode::from_u16(errors::upstream_http_status(s.code()))
        .unwrap_or(StatusCode::BAD_GATEWAY);
    if status.is_client_error() {
        // The caller's request was refused as malformed, out of range or naming no model: its
        // 4xx, never a 5xx.
        let e = ApiError::new(status, "invalid_request_error", msg);
        return match (s.code(), errors::reason_of(s)) {
            (_, Some(Reason::ModelNotFound)) | (Code::NotFound, None) => e.code("model_not_found"),
            _ => e,
        };
    }
    match (s.code(), errors::reason_of(s)) {
        (_, Some(Reason::InsufficientGpuMemory)) | (Code::ResourceExhausted, _) => {
            ApiError::new(status, "server_error", msg)
                .code("insufficient_gpu_memory")
                .header("retry-after", "5")
        }
        (Code::Unavailable, _) => {
            ApiError::new(status, "server_error", msg).header("retry-after", "1")
        }
        (Code::DeadlineExceeded | Code::Aborted, _) => ApiError::new(status, "server_error", msg),
        (Code::Cancelled, _) => ApiError::new(status, "server_error", "the request was cancelled"),
        _ => ApiError::new(status, "server_error", format!("upstream error: {msg}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream's refusal of the request itself is the caller's 400, never relayed as a 5xx.
    #[test]
    fn request_errors_from_the_backend_are_400() {
        for s in [
            tonic::Status::invalid_argument("invalid request body: `messages` must be an array"),
            tonic::Status::out_of_range("max_tokens"),
            tonic::Status::failed_precondition("model is not usable"),
        ] {
            let e = from_status(&s);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{s:?}");
            assert_eq!(e.kind, "invalid_request_error");
        }
        assert_eq!(
            from_status(&tonic::Status::internal("boom")).status,
            StatusCode::BAD_GATEWAY
        );
    }

    /// The OpenAI `code` follows the reason the backend attached, not its words.
    #[test]
    fn reasons_pick_the_openai_code_and_retry_advice() {
        use securellm_common::errors::{Reason, status};
        let e = from_status(&status(Reason::ModelNotFound, "no such thing"));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, Some("model_not_found"))
        );
        let e = from_status(&status(Reason::InsufficientGpuMemory, "full"));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code, Some("insufficient_gpu_memory"));
        assert!(
            e.headers
                .iter()
                .any(|(k, v)| *k == "retry-after" && v == "5")
        );
        // The backend refusing the gateway's own credentials is not the caller's 401.
        let e = from_status(&tonic::Status::unauthenticated("bad internal token"));
        assert_eq!(e.status, StatusCode::BAD_GATEWAY);
        // Words alone decide nothing: "transport error" from an answer is an upstream error.
        let e = from_status(&tonic::Status::unknown("transport error"));
        assert_eq!(e.status, StatusCode::BAD_GATEWAY);
        assert_eq!(e.code, None);
    }
}

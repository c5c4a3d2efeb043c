//! OpenAI request validation, before routing (so HTTP and gRPC share it).
//!
//! Bodies the OpenAI API would refuse are refused here with a 400 naming the field (`param`, as
//! OpenAI writes it: `temperature`, `messages[2].role`, `tools[0].function.name`), instead of
//! reaching llama-server, which answers some of them with a 500 and reads others its own way
//! (`max_tokens: -1` means "no limit" to it). Checked, with the types and ranges OpenAI documents:
//!
//! - chat `messages`: a non-empty array of objects with a known `role`; `content` a string or an
//!   array of typed parts (`text`, `image_url`, `input_audio`, `file`, `refusal`) as the role
//!   allows; `name`, `tool_call_id`, `tool_calls` and `refusal` typed; image, audio and file parts
//!   only for cloud upstreams (no local model takes them: 400 saying so);
//! - completions `prompt` and embeddings `input`: a string, an array of strings, of token ids, or
//!   of token-id arrays (never empty, never mixed);
//! - `max_tokens` / `max_completion_tokens` integers in `1..=cap`, where the cap is the gateway's
//!   `max_tokens_cap` lowered by the caller's own `max_tokens` limit; `temperature` in `[0, 2]`,
//!   `top_p` in `[0, 1]`, `presence_penalty` / `frequency_penalty` in `[-2, 2]`, `n` in
//!   `1..=128`, `stop` a string or at most 4 strings, `logit_bias` an object of token ids to
//!   `[-100, 100]`, `tools` an array of functions with valid names, `tool_choice`,
//!   `response_format`, `stream_options`, `metadata`, `user`, `seed`, `logprobs`...;
//! - for local models, fields OpenAI does not document are refused (`Unrecognized request
//!   argument`), as OpenAI does: llama-server reads extensions of its own (`n_predict`, `id_slot`,
//!   `lora`, ...) that would step around these bounds. A few plain sampler settings are accepted
//!   with their ranges (`top_k`, `min_p`, `repeat_penalty`). Cloud upstreams get unknown fields
//!   (provider extensions) after redaction.
//!
//! A request to a local model without `max_tokens` gets the cap filled in, so generation is never
//! unbounded, and [`Checked`] tells the rate limiter how many tokens to reserve.

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::upstream::Endpoint;

/// `max_tokens_cap` when the configuration says nothing.
pub const DEFAULT_MAX_TOKENS_CAP: u32 = 4096;

/// What validation learnt about a valid request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    /// The generation bound in effect (after filling in the cap for local models); `None` when
    /// the request sets none and goes to a cloud upstream, or for embeddings.
    pub max_tokens: Option<u32>,
    /// Sequences generated per request (`n`, or `best_of` when larger).
    pub choices: u32,
}

impl Checked {
    /// Tokens to reserve against a tokens-per-minute limit: the prompt estimate plus the
    /// generation bound for every choice. With a limit `tpm`, a reservation is clamped to it (a
    /// request whose prompt alone fits can start when the bucket is full; what it really used is
    /// charged when it ends).
    pub fn reservation(&self, prompt: u32, tpm: Option<u32>) -> u32 {
        let generation = self.max_tokens.unwrap_or(0).saturating_mul(self.choices);
        let total = prompt.saturating_add(generation);
        match tpm.filter(|&t| t > 0) {
            Some(t) if prompt <= t => total.min(t),
            _ => total,
        }
    }
}

/// The cap for one caller: the gateway's, lowered by the caller's own limit.
pub fn cap(gateway_cap: u32, key_cap: Option<u32>) -> u32 {
    match key_cap.filter(|&k| k > 0) {
        Some(k) => k.min(gateway_cap).max(1),
        None => gateway_cap.max(1),
    }
}

/// Validate `body` (a JSON object) for `endpoint`; `cloud`: it goes to a cloud upstream. For
/// local models a missing `max_tokens` is filled in with `cap`.
pub fn check(
    endpoint: Endpoint,
    body: &mut Value,
    model: &str,
    cloud: bool,
    cap: u32,
) -> Result<Checked, ApiError> {
    let Value::Object(m) = body else {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object.",
        ));
    };
    let known: &[&str] = match endpoint {
        Endpoint::Chat => CHAT_FIELDS,
        Endpoint::Completions => COMPLETION_FIELDS,
        Endpoint::Embeddings => EMBEDDING_FIELDS,
    };
    if !cloud
        && let Some(k) = m
            .keys()
            .find(|k| !known.contains(&k.as_str()) && !COMMON_FIELDS.contains(&k.as_str()))
    {
        return Err(invalid(
            k,
            "unknown_parameter",
            format!("Unrecognized request argument supplied: {k}"),
        ));
    }
    let v = Fields::top(m);
    match endpoint {
        Endpoint::Chat => messages(m.get("messages"), model, cloud)?,
        Endpoint::Completions => token_input(m.get("prompt"), "prompt", true)?,
        Endpoint::Embeddings => token_input(m.get("input"), "input", false)?,
    }
    v.string("user")?;
    if endpoint == Endpoint::Embeddings {
        v.int("dimensions", 1, i64::from(u32::MAX))?;
        v.one_of("encoding_format", &["float", "base64"])?;
        return Ok(Checked {
            max_tokens: None,
            choices: 1,
        });
    }
    // Generation settings (chat and completions).
    v.number("temperature", 0.0, 2.0)?;
    v.number("top_p", 0.0, 1.0)?;
    v.number("presence_penalty", -2.0, 2.0)?;
    v.number("frequency_penalty", -2.0, 2.0)?;
    v.int("seed", i64::MIN, i64::MAX)?;
    v.int("top_k", 0, 100_000)?;
    v.number("min_p", 0.0, 1.0)?;
    v.number("repeat_penalty", 0.0, 10.0)?;
    v.boolean("stream")?;
    if let Some(o) = v.object("stream_options")? {
        let o = Fields::at(o, "stream_options");
        o.boolean("include_usage")?;
        o.boolean("include_obfuscation")?;
    }
    stop(m.get("stop"))?;
    logit_bias(m.get("logit_bias"))?;
    let n = v.int("n", 1, 128)?.unwrap_or(1);
    let mut choices = n;
    let cap_i = i64::from(cap);
    let mut bound = v.int("max_tokens", 1, cap_i)?;
    if endpoint == Endpoint::Chat {
        if let Some(t) = v.int("max_completion_tokens", 1, cap_i)? {
            bound = Some(bound.map_or(t, |b| b.min(t)));
        }
        v.boolean("logprobs")?;
        v.int("top_logprobs", 0, 20)?;
        v.boolean("parallel_tool_calls")?;
        v.boolean("store")?;
        for k in [
            "reasoning_effort",
            "service_tier",
            "verbosity",
            "prompt_cache_key",
            "safety_identifier",
        ] {
            v.string(k)?;
        }
        for k in ["audio", "prediction", "web_search_options"] {
            v.object(k)?;
        }
        if let Some(a) = v.array("modalities")? {
            for (i, x) in a.iter().enumerate() {
                if !x.is_string() {
                    return Err(wrong_type(&format!("modalities[{i}]"), "a string", x));
                }
            }
        }
        metadata(m.get("metadata"))?;
        tools(m.get("tools"))?;
        tool_choice(m.get("tool_choice"))?;
        functions(m.get("functions"))?;
        function_call(m.get("function_call"), "function_call")?;
        response_format(m.get("response_format"))?;
    } else {
        v.boolean("echo")?;
        v.int("logprobs", 0, 5)?;
        v.string("suffix")?;
        if let Some(b) = v.int("best_of", 1, 20)? {
            if b < n {
                return Err(invalid(
                    "best_of",
                    "invalid_value",
                    format!("`best_of` ({b}) must be at least `n` ({n})."),
                ));
            }
            choices = b;
        }
    }
    if !cloud && bound.is_none() {
        // Local generation is never unbounded: llama-server reads a missing (or -1) limit as
        // "until the context is full".
        m.insert("max_tokens".into(), Value::from(cap));
        bound = Some(cap_i);
    }
    Ok(Checked {
        max_tokens: bound.map(|b| u32::try_from(b).unwrap_or(u32::MAX)),
        choices: u32::try_from(choices).unwrap_or(1),
    })
}

const COMMON_FIELDS: &[&str] = &["model", "user"];

const CHAT_FIELDS: &[&str] = &[
    "messages",
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "metadata",
    "modalities",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "verbosity",
    "web_search_options",
    // llama.cpp sampler settings with plain ranges.
    "top_k",
    "min_p",
    "repeat_penalty",
];

const COMPLETION_FIELDS: &[&str] = &[
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
];

const EMBEDDING_FIELDS: &[&str] = &["input", "dimensions", "encoding_format"];

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

fn invalid(param: &str, code: &'static str, message: String) -> ApiError {
    ApiError::bad_request(message).param(param).code(code)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, want: &str, got: &Value) -> ApiError {
    invalid(
        param,
        "invalid_type",
        format!(
            "Invalid type for '{param}': expected {want}, but got {} instead.",
            type_name(got)
        ),
    )
}

fn missing(param: &str) -> ApiError {
    invalid(
        param,
        "missing_required_parameter",
        format!("Missing required parameter: '{param}'."),
    )
}

fn not_one_of(param: &str, got: &str, allowed: &[&str]) -> ApiError {
    let list = allowed
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(", ");
    // Never echo a long value back.
    let shown: String = got.chars().take(64).collect();
    invalid(
        param,
        "invalid_value",
        format!("Invalid value for '{param}': '{shown}'. Supported values are: {list}."),
    )
}

/// An integer value (a float with no fraction counts), or why not.
fn as_int(param: &str, v: &Value, lo: i64, hi: i64) -> Result<i64, ApiError> {
    let n = if let Some(i) = v.as_i64() {
        i
    } else if v.is_u64() {
        // Above i64::MAX, so above any maximum.
        i64::MAX
    } else if let Some(f) = v.as_f64().filter(|f| f.fract() == 0.0) {
        if f >= i64::MAX as f64 {
            i64::MAX
        } else if f <= i64::MIN as f64 {
            i64::MIN
        } else {
            f as i64
        }
    } else {
        return Err(wrong_type(param, "an integer", v));
    };
    if n < lo {
        return Err(invalid(
            param,
            "integer_below_min_value",
            format!(
                "Invalid '{param}': integer below minimum value. Expected a value >= {lo}, but got {} instead.",
                number_text(v)
            ),
        ));
    }
    if n > hi {
        return Err(invalid(
            param,
            "integer_above_max_value",
            format!(
                "Invalid '{param}': integer above maximum value. Expected a value <= {hi}, but got {} instead.",
                number_text(v)
            ),
        ));
    }
    Ok(n)
}

fn number_text(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 32 {
        format!("{}…", &s[..32])
    } else {
        s
    }
}

/// The fields of one JSON object (at `prefix`, empty at the top), with typed accessors that name
/// the field in their errors. Absent and `null` members are "not given".
struct Fields<'a> {
    m: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn top(m: &'a Map<String, Value>) -> Self {
        Fields { m, prefix: "" }
    }

    fn at(m: &'a Map<String, Value>, prefix: &'a str) -> Self {
        Fields { m, prefix }
    }

    fn get(&self, k: &str) -> Option<&'a Value> {
        self.m.get(k).filter(|v| !v.is_null())
    }

    fn param(&self, k: &str) -> String {
        if self.prefix.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.prefix)
        }
    }

    fn number(&self, k: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        let k = &self.param(k);
        let Some(x) = v.as_f64() else {
            return Err(wrong_type(k, "a number", v));
        };
        if x < lo {
            return Err(invalid(
                k,
                "decimal_below_min_value",
                format!(
                    "Invalid '{k}': decimal below minimum value. Expected a value >= {lo}, but got {} instead.",
                    number_text(v)
                ),
            ));
        }
        if x > hi {
            return Err(invalid(
                k,
                "decimal_above_max_value",
                format!(
                    "Invalid '{k}': decimal above maximum value. Expected a value <= {hi}, but got {} instead.",
                    number_text(v)
                ),
            ));
        }
        Ok(Some(x))
    }

    fn int(&self, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        self.get(k)
            .map(|v| as_int(&self.param(k), v, lo, hi))
            .transpose()
    }

    fn boolean(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(&self.param(k), "a boolean", v)),
        }
    }

    fn string(&self, k: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(&self.param(k), "a string", v)),
        }
    }

    fn object(&self, k: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(v) => Err(wrong_type(&self.param(k), "an object", v)),
        }
    }

    fn array(&self, k: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(wrong_type(&self.param(k), "an array", v)),
        }
    }

    fn one_of(&self, k: &str, allowed: &[&str]) -> Result<Option<&'a str>, ApiError> {
        match self.string(k)? {
            Some(s) if !allowed.contains(&s) => Err(not_one_of(&self.param(k), s, allowed)),
            other => Ok(other),
        }
    }
}

/// A member of a nested object, named `prefix.k` in errors.
fn nested<'a>(o: &'a Map<String, Value>, prefix: &str, k: &str) -> (String, Option<&'a Value>) {
    (format!("{prefix}.{k}"), o.get(k).filter(|v| !v.is_null()))
}

fn req_string<'a>(o: &'a Map<String, Value>, prefix: &str, k: &str) -> Result<&'a str, ApiError> {
    match nested(o, prefix, k) {
        (p, None) => Err(missing(&p)),
        (_, Some(Value::String(s))) => Ok(s),
        (p, Some(v)) => Err(wrong_type(&p, "a string", v)),
    }
}

fn opt_string(o: &Map<String, Value>, prefix: &str, k: &str) -> Result<(), ApiError> {
    match nested(o, prefix, k) {
        (_, None | Some(Value::String(_))) => Ok(()),
        (p, Some(v)) => Err(wrong_type(&p, "a string", v)),
    }
}

fn req_object<'a>(
    o: &'a Map<String, Value>,
    prefix: &str,
    k: &str,
) -> Result<&'a Map<String, Value>, ApiError> {
    match nested(o, prefix, k) {
        (p, None) => Err(missing(&p)),
        (_, Some(Value::Object(x))) => Ok(x),
        (p, Some(v)) => Err(wrong_type(&p, "an object", v)),
    }
}

fn as_object<'a>(v: &'a Value, param: &str) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| wrong_type(param, "an object", v))
}

/// Function (and tool) names as OpenAI allows them: `[A-Za-z0-9_-]{1,64}`.
fn function_name(param: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid(
            param,
            "invalid_value",
            format!(
                "Invalid '{param}': a name of 1 to 64 characters from a-z, A-Z, 0-9, '_' and '-' is expected."
            ),
        ));
    }
    Ok(())
}

fn messages(v: Option<&Value>, model: &str, cloud: bool) -> Result<(), ApiError> {
    let msgs = match v.filter(|v| !v.is_null()) {
        None => return Err(missing("messages")),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(wrong_type("messages", "an array", other)),
    };
    if msgs.is_empty() {
        return Err(invalid(
            "messages",
            "empty_array",
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.".into(),
        ));
    }
    for (i, msg) in msgs.iter().enumerate() {
        let p = format!("messages[{i}]");
        let o = as_object(msg, &p)?;
        let role = req_string(o, &p, "role")?;
        if !ROLES.contains(&role) {
            return Err(not_one_of(&format!("{p}.role"), role, ROLES));
        }
        opt_string(o, &p, "name")?;
        let content = o.get("content").filter(|c| !c.is_null());
        let parts: &[&str] = match role {
            "user" => &["text", "image_url", "input_audio", "file"],
            "assistant" => &["text", "refusal"],
            _ => &["text"],
        };
        match content {
            None => {
                let answered = ["tool_calls", "function_call", "refusal"]
                    .iter()
                    .any(|k| o.get(*k).is_some_and(|v| !v.is_null()));
                if role != "assistant" || !answered {
                    return Err(missing(&format!("{p}.content")));
                }
            }
            Some(Value::String(_)) => {}
            Some(Value::Array(a)) => {
                if a.is_empty() {
                    return Err(invalid(
                        &format!("{p}.content"),
                        "empty_array",
                        format!(
                            "Invalid '{p}.content': empty array. Expected an array with minimum length 1, but got an empty array instead."
                        ),
                    ));
                }
                for (j, part) in a.iter().enumerate() {
                    content_part(part, &format!("{p}.content[{j}]"), parts, model, cloud)?;
                }
            }
            Some(other) => {
                return Err(wrong_type(
                    &format!("{p}.content"),
                    "a string or an array of content parts",
                    other,
                ));
            }
        }
        match role {
            "tool" => {
                req_string(o, &p, "tool_call_id")?;
            }
            "function" => {
                req_string(o, &p, "name")?;
            }
            "assistant" => {
                opt_string(o, &p, "refusal")?;
                if let (fp, Some(fc)) = nested(o, &p, "function_call") {
                    let fc = as_object(fc, &fp)?;
                    req_string(fc, &fp, "name")?;
                    opt_string(fc, &fp, "arguments")?;
                }
                match nested(o, &p, "tool_calls") {
                    (_, None) => {}
                    (tp, Some(Value::Array(calls))) => {
                        for (k, call) in calls.iter().enumerate() {
                            tool_call(call, &format!("{tp}[{k}]"))?;
                        }
                    }
                    (tp, Some(other)) => return Err(wrong_type(&tp, "an array", other)),
                }
            }
            _ => {}
        }
        for k in ["tool_calls", "refusal", "function_call"] {
            if role != "assistant" && o.get(k).is_some_and(|v| !v.is_null()) {
                return Err(invalid(
                    &format!("{p}.{k}"),
                    "unknown_parameter",
                    format!("Invalid '{p}.{k}': only assistant messages have `{k}`."),
                ));
            }
        }
    }
    Ok(())
}

fn content_part(
    part: &Value,
    p: &str,
    allowed: &[&str],
    model: &str,
    cloud: bool,
) -> Result<(), ApiError> {
    let o = as_object(part, p)?;
    let ty = req_string(o, p, "type")?;
    if !allowed.contains(&ty) {
        return Err(not_one_of(&format!("{p}.type"), ty, allowed));
    }
    match ty {
        "text" => {
            req_string(o, p, "text")?;
        }
        "refusal" => {
            req_string(o, p, "refusal")?;
        }
        "image_url" | "input_audio" | "file" => {
            if !cloud {
                let what = match ty {
                    "image_url" => "images",
                    "input_audio" => "audio",
                    _ => "files",
                };
                return Err(invalid(
                    p,
                    "unsupported_content",
                    format!(
                        "Invalid content type: the model `{model}` does not take {what}; send text only."
                    ),
                ));
            }
            let inner = req_object(o, p, ty)?;
            let ip = format!("{p}.{ty}");
            match ty {
                "image_url" => {
                    req_string(inner, &ip, "url")?;
                    if let (dp, Some(d)) = nested(inner, &ip, "detail") {
                        let d = d.as_str().ok_or_else(|| wrong_type(&dp, "a string", d))?;
                        if !["auto", "low", "high"].contains(&d) {
                            return Err(not_one_of(&dp, d, &["auto", "low", "high"]));
                        }
                    }
                }
                "input_audio" => {
                    req_string(inner, &ip, "data")?;
                    req_string(inner, &ip, "format")?;
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}

fn tool_call(call: &Value, p: &str) -> Result<(), ApiError> {
    let o = as_object(call, p)?;
    req_string(o, p, "id")?;
    let ty = req_string(o, p, "type")?;
    match ty {
        "function" => {
            let f = req_object(o, p, "function")?;
            let fp = format!("{p}.function");
            req_string(f, &fp, "name")?;
            req_string(f, &fp, "arguments")?;
        }
        "custom" => {
            let c = req_object(o, p, "custom")?;
            let cp = format!("{p}.custom");
            req_string(c, &cp, "name")?;
            req_string(c, &cp, "input")?;
        }
        other => {
            return Err(not_one_of(
                &format!("{p}.type"),
                other,
                &["function", "custom"],
            ));
        }
    }
    Ok(())
}

/// `prompt` (completions, where `""` is allowed) or `input` (embeddings, where it is not).
fn token_input(v: Option<&Value>, param: &str, empty_ok: bool) -> Result<(), ApiError> {
    let too_short = |p: &str| {
        invalid(
            p,
            "empty_string",
            format!("Invalid '{p}': an empty string is not accepted."),
        )
    };
    let token = |p: &str, x: &Value| as_int(p, x, 0, i64::from(u32::MAX)).map(|_| ());
    let shape =
        "a string, an array of strings, an array of token ids or an array of token-id arrays";
    match v.filter(|v| !v.is_null()) {
        None => Err(missing(param)),
        Some(Value::String(s)) => {
            if s.is_empty() && !empty_ok {
                Err(too_short(param))
            } else {
                Ok(())
            }
        }
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(invalid(
                    param,
                    "empty_array",
                    format!(
                        "Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead."
                    ),
                ));
            }
            if items.len() > 2048 {
                return Err(invalid(
                    param,
                    "array_above_max_length",
                    format!(
                        "Invalid '{param}': array too long. Expected an array with maximum length 2048, but got an array with length {} instead.",
                        items.len()
                    ),
                ));
            }
            match &items[0] {
                Value::String(_) => {
                    for (i, x) in items.iter().enumerate() {
                        let p = format!("{param}[{i}]");
                        match x {
                            Value::String(s) if s.is_empty() && !empty_ok => {
                                return Err(too_short(&p));
                            }
                            Value::String(_) => {}
                            other => return Err(wrong_type(&p, "a string", other)),
                        }
                    }
                }
                Value::Number(_) => {
                    for (i, x) in items.iter().enumerate() {
                        token(&format!("{param}[{i}]"), x)?;
                    }
                }
                Value::Array(_) => {
                    for (i, x) in items.iter().enumerate() {
                        let p = format!("{param}[{i}]");
                        let Value::Array(ids) = x else {
                            return Err(wrong_type(&p, "an array of token ids", x));
                        };
                        if ids.is_empty() {
                            return Err(invalid(
                                &p,
                                "empty_array",
                                format!("Invalid '{p}': empty array."),
                            ));
                        }
                        for (j, id) in ids.iter().enumerate() {
                            token(&format!("{p}[{j}]"), id)?;
                        }
                    }
                }
                other => return Err(wrong_type(&format!("{param}[0]"), shape, other)),
            }
            Ok(())
        }
        Some(other) => Err(wrong_type(param, shape, other)),
    }
}

fn stop(v: Option<&Value>) -> Result<(), ApiError> {
    match v.filter(|v| !v.is_null()) {
        None | Some(Value::String(_)) => Ok(()),
        Some(Value::Array(a)) => {
            if a.len() > 4 {
                return Err(invalid(
                    "stop",
                    "array_above_max_length",
                    format!(
                        "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length {} instead.",
                        a.len()
                    ),
                ));
            }
            for (i, s) in a.iter().enumerate() {
                if !s.is_string() {
                    return Err(wrong_type(&format!("stop[{i}]"), "a string", s));
                }
            }
            Ok(())
        }
        Some(other) => Err(wrong_type("stop", "a string or an array of strings", other)),
    }
}

fn logit_bias(v: Option<&Value>) -> Result<(), ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let o = as_object(v, "logit_bias")?;
    for (k, b) in o {
        if k.parse::<u32>().is_err() {
            return Err(invalid(
                "logit_bias",
                "invalid_value",
                "Invalid 'logit_bias': keys must be token ids (integers as strings).".into(),
            ));
        }
        Fields::at(o, "logit_bias").number(k, -100.0, 100.0)?;
        if b.is_null() {
            return Err(wrong_type(&format!("logit_bias.{k}"), "a number", b));
        }
    }
    Ok(())
}

fn metadata(v: Option<&Value>) -> Result<(), ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let o = as_object(v, "metadata")?;
    if o.len() > 16 {
        return Err(invalid(
            "metadata",
            "object_above_max_properties",
            "Invalid 'metadata': at most 16 keys are accepted.".into(),
        ));
    }
    for (k, x) in o {
        let p = format!("metadata.{k}");
        match x {
            Value::String(s) if k.len() <= 64 && s.len() <= 512 => {}
            Value::String(_) => {
                return Err(invalid(
                    "metadata",
                    "invalid_value",
                    "Invalid 'metadata': keys are at most 64 and values at most 512 characters."
                        .into(),
                ));
            }
            other => return Err(wrong_type(&p, "a string", other)),
        }
    }
    Ok(())
}

fn tools(v: Option<&Value>) -> Result<(), ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let Value::Array(a) = v else {
        return Err(wrong_type("tools", "an array", v));
    };
    if a.len() > 128 {
        return Err(invalid(
            "tools",
            "array_above_max_length",
            format!(
                "Invalid 'tools': array too long. Expected an array with maximum length 128, but got an array with length {} instead.",
                a.len()
            ),
        ));
    }
    for (i, t) in a.iter().enumerate() {
        let p = format!("tools[{i}]");
        let o = as_object(t, &p)?;
        match req_string(o, &p, "type")? {
            "function" => function_def(req_object(o, &p, "function")?, &format!("{p}.function"))?,
            "custom" => {
                let c = req_object(o, &p, "custom")?;
                let cp = format!("{p}.custom");
                function_name(&format!("{cp}.name"), req_string(c, &cp, "name")?)?;
                opt_string(c, &cp, "description")?;
            }
            other => {
                return Err(not_one_of(
                    &format!("{p}.type"),
                    other,
                    &["function", "custom"],
                ));
            }
        }
    }
    Ok(())
}

fn function_def(f: &Map<String, Value>, p: &str) -> Result<(), ApiError> {
    function_name(&format!("{p}.name"), req_string(f, p, "name")?)?;
    opt_string(f, p, "description")?;
    match nested(f, p, "parameters") {
        (_, None | Some(Value::Object(_))) => {}
        (pp, Some(other)) => return Err(wrong_type(&pp, "an object", other)),
    }
    match nested(f, p, "strict") {
        (_, None | Some(Value::Bool(_))) => Ok(()),
        (sp, Some(other)) => Err(wrong_type(&sp, "a boolean", other)),
    }
}

fn functions(v: Option<&Value>) -> Result<(), ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let Value::Array(a) = v else {
        return Err(wrong_type("functions", "an array", v));
    };
    if a.len() > 128 {
        return Err(invalid(
            "functions",
            "array_above_max_length",
            "Invalid 'functions': at most 128 are accepted.".into(),
        ));
    }
    for (i, f) in a.iter().enumerate() {
        let p = format!("functions[{i}]");
        function_def(as_object(f, &p)?, &p)?;
    }
    Ok(())
}

fn function_call(v: Option<&Value>, p: &str) -> Result<(), ApiError> {
    match v.filter(|v| !v.is_null()) {
        None => Ok(()),
        Some(Value::String(s)) if s == "none" || s == "auto" => Ok(()),
        Some(Value::String(s)) => Err(not_one_of(p, s, &["none", "auto"])),
        Some(Value::Object(o)) => req_string(o, p, "name").map(|_| ()),
        Some(other) => Err(wrong_type(p, "a string or an object", other)),
    }
}

fn tool_choice(v: Option<&Value>) -> Result<(), ApiError> {
    const WORDS: &[&str] = &["none", "auto", "required"];
    match v.filter(|v| !v.is_null()) {
        None => Ok(()),
        Some(Value::String(s)) if WORDS.contains(&s.as_str()) => Ok(()),
        Some(Value::String(s)) => Err(not_one_of("tool_choice", s, WORDS)),
        Some(Value::Object(o)) => {
            let p = "tool_choice";
            match req_string(o, p, "type")? {
                "function" => {
                    let f = req_object(o, p, "function")?;
                    req_string(f, "tool_choice.function", "name").map(|_| ())
                }
                "custom" => {
                    let c = req_object(o, p, "custom")?;
                    req_string(c, "tool_choice.custom", "name").map(|_| ())
                }
                "allowed_tools" => req_object(o, p, "allowed_tools").map(|_| ()),
                other => Err(not_one_of(
                    "tool_choice.type",
                    other,
                    &["function", "custom", "allowed_tools"],
                )),
            }
        }
        Some(other) => Err(wrong_type("tool_choice", "a string or an object", other)),
    }
}

fn response_format(v: Option<&Value>) -> Result<(), ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let p = "response_format";
    let o = as_object(v, p)?;
    const TYPES: &[&str] = &["text", "json_object", "json_schema"];
    let ty = req_string(o, p, "type")?;
    if !TYPES.contains(&ty) {
        return Err(not_one_of("response_format.type", ty, TYPES));
    }
    if ty == "json_schema" {
        let s = req_object(o, p, "json_schema")?;
        let sp = "response_format.json_schema";
        function_name(&format!("{sp}.name"), req_string(s, sp, "name")?)?;
        opt_string(s, sp, "description")?;
        match nested(s, sp, "schema") {
            (_, None | Some(Value::Object(_))) => {}
            (pp, Some(other)) => return Err(wrong_type(&pp, "an object", other)),
        }
        match nested(s, sp, "strict") {
            (_, None | Some(Value::Bool(_))) => {}
            (pp, Some(other)) => return Err(wrong_type(&pp, "a boolean", other)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(extra: Value) -> Value {
        let mut b = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    }

    /// The `param` of the 400, or panic if the body passes.
    #[track_caller]
    fn refused(endpoint: Endpoint, mut body: Value, cloud: bool) -> String {
        match check(endpoint, &mut body, "tiny", cloud, 4096) {
            Ok(c) => panic!("accepted: {body} → {c:?}"),
            Err(e) => {
                assert_eq!(e.status, 400, "{}", e.message);
                assert_eq!(e.kind, "invalid_request_error");
                e.param.unwrap_or_default()
            }
        }
    }

    #[track_caller]
    fn accepted(endpoint: Endpoint, body: &mut Value, cloud: bool) -> Checked {
        match check(endpoint, body, "tiny", cloud, 4096) {
            Ok(c) => c,
            Err(e) => panic!("refused: {body}: {} ({:?})", e.message, e.param),
        }
    }

    /// Regression (issue 11): these reached llama-server and came back 500 or 200 (some running
    /// unbounded); each is a 400 naming the field now.
    #[test]
    fn what_the_adversarial_run_sent_is_refused_with_the_field_named() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"messages": [{"content": "hi"}]}), "messages[0].role"),
            (
                json!({"messages": [{"role": "bogus", "content": "hi"}]}),
                "messages[0].role",
            ),
            (json!({"messages": []}), "messages"),
            (json!({"messages": "hello"}), "messages"),
            (json!({"tools": "search"}), "tools"),
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (
                json!({"max_tokens": 9_223_372_036_854_775_808u64}),
                "max_tokens",
            ),
            (json!({"max_tokens": 4097}), "max_tokens"),
            (json!({"max_tokens": "ten"}), "max_tokens"),
            (
                json!({"max_completion_tokens": 100_000}),
                "max_completion_tokens",
            ),
            (json!({"temperature": -3}), "temperature"),
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"presence_penalty": -2.1}), "presence_penalty"),
            (json!({"frequency_penalty": 3}), "frequency_penalty"),
            (json!({"stop": 5}), "stop"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stop": ["a", 1]}), "stop[1]"),
            (json!({"logit_bias": "x"}), "logit_bias"),
            (json!({"logit_bias": {"hello": 1}}), "logit_bias"),
            (json!({"logit_bias": {"15": 101}}), "logit_bias.15"),
            (json!({"n": 0}), "n"),
            (json!({"n": 129}), "n"),
            (json!({"n": 1.5}), "n"),
            (json!({"top_logprobs": 21}), "top_logprobs"),
            (json!({"logprobs": 3}), "logprobs"),
            (json!({"seed": "x"}), "seed"),
            (json!({"stream": "yes"}), "stream"),
            (
                json!({"stream_options": {"include_usage": 1}}),
                "include_usage",
            ),
            (json!({"user": 5}), "user"),
            (json!({"metadata": {"k": 5}}), "metadata.k"),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "has space"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}),
                "tools[0].function.parameters",
            ),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (json!({"tool_choice": "always"}), "tool_choice"),
            (
                json!({"response_format": {"type": "yaml"}}),
                "response_format.type",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
            ),
            (
                json!({"messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": []}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "input_text", "text": "x"}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
                "messages[0].content[0].text",
            ),
            (
                json!({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x", "name": 3}]}),
                "messages[0].name",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].tool_call_id",
            ),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]}]}),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": "x"}]}),
                "messages[0].tool_calls",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
                "messages[0].tool_calls",
            ),
            (
                json!({"messages": [{"role": "assistant"}]}),
                "messages[0].content",
            ),
            (json!({"messages": ["hi"]}), "messages[0]"),
            // llama-server's own bounds, which step around `max_tokens`, are not accepted.
            (json!({"n_predict": -1}), "n_predict"),
            (json!({"id_slot": 0}), "id_slot"),
            (json!({"top_k": -1}), "top_k"),
        ];
        for (extra, param) in cases {
            let body = chat(extra.clone());
            let got = refused(Endpoint::Chat, body, false);
            assert!(
                got == param || got.ends_with(param),
                "{extra}: param {got:?}, expected {param:?}"
            );
        }
        let no_messages = json!({"model": "tiny"});
        assert_eq!(refused(Endpoint::Chat, no_messages, false), "messages");
    }

    #[test]
    fn image_audio_and_file_parts_are_for_cloud_upstreams_only() {
        for (ty, inner, word) in [
            ("image_url", json!({"url": "https://x/y.png"}), "images"),
            (
                "input_audio",
                json!({"data": "AAAA", "format": "wav"}),
                "audio",
            ),
            ("file", json!({"file_id": "f"}), "files"),
        ] {
            let body = chat(json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": ty, ty: inner}
            ]}]}));
            let mut b = body.clone();
            let e = check(Endpoint::Chat, &mut b, "tiny", false, 4096).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.param.as_deref()),
                (400, Some("messages[0].content[1]"))
            );
            assert!(
                e.message.contains("does not take") && e.message.contains(word),
                "{}",
                e.message
            );
            let mut b = body;
            accepted(Endpoint::Chat, &mut b, true);
        }
    }

    #[test]
    fn valid_requests_pass_and_local_ones_get_a_generation_bound() {
        let mut full = chat(json!({
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": [{"type": "text", "text": "really"}]},
                {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "bob"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}], "refusal": null}
            ],
            "temperature": 0, "top_p": 1, "n": 2, "stop": ["\n"], "seed": -5,
            "logit_bias": {"15": -100, "16": 2.5}, "presence_penalty": -2, "frequency_penalty": 2,
            "logprobs": true, "top_logprobs": 3, "user": "u", "metadata": {"a": "b"},
            "tools": [{"type": "function", "function": {"name": "f", "description": "d",
                "parameters": {"type": "object"}, "strict": true}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {}}},
            "stream": true, "stream_options": {"include_usage": true}, "top_k": 40, "min_p": 0.05
        }));
        let c = accepted(Endpoint::Chat, &mut full, false);
        assert_eq!(
            c,
            Checked {
                max_tokens: Some(4096),
                choices: 2
            }
        );
        assert_eq!(
            full["max_tokens"], 4096,
            "the cap is filled in for local models"
        );
        // Given bounds are kept; the smaller of the two names wins.
        let mut b = chat(json!({"max_tokens": 64, "max_completion_tokens": 32}));
        assert_eq!(accepted(Endpoint::Chat, &mut b, false).max_tokens, Some(32));
        assert_eq!(b["max_tokens"], 64);
        // Cloud: nothing filled in, unknown (provider) fields pass.
        let mut b = chat(json!({"provider_extension": {"x": 1}}));
        assert_eq!(accepted(Endpoint::Chat, &mut b, true).max_tokens, None);
        assert!(b.get("max_tokens").is_none());
        // A caller's own cap.
        let mut b = chat(json!({"max_tokens": 100}));
        let e = check(Endpoint::Chat, &mut b, "tiny", false, cap(4096, Some(50))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(
            (cap(4096, Some(50)), cap(4096, Some(0)), cap(10, Some(50))),
            (50, 4096, 10)
        );
    }

    #[test]
    fn completions_and_embeddings_inputs() {
        for ok in [
            json!("once"),
            json!(""),
            json!(["a", "b"]),
            json!([1, 2, 3]),
            json!([[1, 2], [3]]),
        ] {
            let mut b = json!({"model": "tiny", "prompt": ok, "max_tokens": 5, "echo": false, "best_of": 2, "n": 2, "logprobs": 2});
            let c = accepted(Endpoint::Completions, &mut b, false);
            assert_eq!(c.choices, 2);
        }
        for (bad, param) in [
            (json!(null), "prompt"),
            (json!(5), "prompt"),
            (json!([]), "prompt"),
            (json!(["a", 1]), "prompt[1]"),
            (json!([1, "a"]), "prompt[1]"),
            (json!([1, -1]), "prompt[1]"),
            (json!([[1], []]), "prompt[1]"),
            (json!([["a"]]), "prompt[0][0]"),
            (json!([{"x": 1}]), "prompt[0]"),
        ] {
            let b = json!({"model": "tiny", "prompt": bad});
            assert_eq!(refused(Endpoint::Completions, b, false), param, "{bad}");
        }
        let b = json!({"model": "tiny", "prompt": "x", "best_of": 1, "n": 2});
        assert_eq!(refused(Endpoint::Completions, b, false), "best_of");
        // Chat-only fields are not completions fields.
        let b = json!({"model": "tiny", "prompt": "x", "tools": []});
        assert_eq!(refused(Endpoint::Completions, b, false), "tools");

        let mut b = json!({"model": "tiny", "input": ["a", "b"], "encoding_format": "float", "dimensions": 8});
        assert_eq!(
            accepted(Endpoint::Embeddings, &mut b, false),
            Checked {
                max_tokens: None,
                choices: 1
            }
        );
        assert!(b.get("max_tokens").is_none());
        for (bad, param) in [
            (json!({"input": ""}), "input"),
            (json!({"input": []}), "input"),
            (json!({"input": ["a", ""]}), "input[1]"),
            (
                json!({"input": "x", "encoding_format": "hex"}),
                "encoding_format",
            ),
            (json!({"input": "x", "dimensions": 0}), "dimensions"),
            (json!({"input": "x", "max_tokens": 5}), "max_tokens"),
        ] {
            let mut b = bad.clone();
            b["model"] = json!("tiny");
            assert_eq!(refused(Endpoint::Embeddings, b, false), param, "{bad}");
        }
    }

    #[test]
    fn reservations_cover_generation_and_stay_within_a_limit() {
        let c = Checked {
            max_tokens: Some(100),
            choices: 2,
        };
        assert_eq!(c.reservation(10, None), 210);
        assert_eq!(c.reservation(10, Some(50)), 50, "clamped to the limit");
        assert_eq!(
            c.reservation(60, Some(50)),
            260,
            "a prompt alone too big never fits"
        );
        let none = Checked {
            max_tokens: None,
            choices: 1,
        };
        assert_eq!(none.reservation(7, Some(50)), 7);
        let huge = Checked {
            max_tokens: Some(u32::MAX),
            choices: 128,
        };
        assert_eq!(huge.reservation(1, None), u32::MAX);
    }
}

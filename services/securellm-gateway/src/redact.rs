//! Secret detection and redaction for prompts bound to cloud upstreams.
//!
//! A [`Redactor`] holds a fixed set of built-in detectors — PEM private keys,
//! AWS access key ids and (labelled) secret access keys, GitHub tokens, OpenAI
//! and Anthropic API keys, JWTs and passwords embedded in URLs — plus any
//! operator-configured `(name, regex)` patterns. [`Redactor::scan`] returns
//! byte spans only; [`Redactor::redact_text`] replaces each span with
//! `[REDACTED:<kind>]`; [`Redactor::apply_to_request`] walks a request body
//! bound for an upstream and applies the upstream's [`Policy`] to **every
//! string in it** — values and object keys, at any depth, whatever the endpoint
//! or field (tool calls and their arguments, tool definitions, message names,
//! content parts of any type, `refusal`, `user`, `metadata`, response-format
//! schemas, nested prompt arrays, fields no one has thought of yet): `Allow`
//! only counts, `Redact` rewrites, `Block` refuses with the list of kinds
//! found. Only an allow-list is skipped: the values of enum-like members when
//! they are one of the documented words (`"role": "user"`, `"type": "text"`,
//! ...), and keys that are schema member names (`"content"`, `"properties"`):
//! those cannot carry a secret, and skipping them keeps a too-broad configured
//! pattern from corrupting the request's structure.
//! [`Redactor::apply_to_upstream`] also covers the request id sent along. The
//! secret
//! itself never appears in a [`Finding`], an error or a log line — only kinds,
//! offsets and counts, so the count can go straight into the audit row.
//!
//! Every pattern is compiled by the `regex` crate, whose searches are linear
//! in the input (no backtracking blow-up). Iterating over many matches is only
//! linear if a search never reads far past its own match, so the built-in
//! patterns are written that way (a complete PEM block and an END-less PEM
//! header are separate patterns for this reason; an adversarial-input test
//! guards it); configured patterns are the operator's responsibility. A 1 MiB
//! prompt takes about 0.1–0.2 s in the unoptimised test build.
//!
//! When matches of different detectors overlap, they are merged into one
//! redacted span (so no byte of either secret survives) labelled with the
//! longest match; the earliest one and then the more specific detector win
//! ties.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Kind of a PEM private key block (`-----BEGIN … PRIVATE KEY-----`).
pub const KIND_PRIVATE_KEY: &str = "private_key";
/// Kind of an AWS access key id (`AKIA…` / `ASIA…`).
pub const KIND_AWS_ACCESS_KEY_ID: &str = "aws_access_key_id";
/// Kind of a labelled AWS secret access key (`aws_secret_access_key = …`).
pub const KIND_AWS_SECRET_ACCESS_KEY: &str = "aws_secret_access_key";
/// Kind of a GitHub token (`ghp_…`, `gho_…`, `ghu_…`, `ghs_…`, `ghr_…`, `github_pat_…`).
pub const KIND_GITHUB_TOKEN: &str = "github_token";
/// Kind of an OpenAI API key (`sk-…`, `sk-proj-…`).
pub const KIND_OPENAI_API_KEY: &str = "openai_api_key";
/// Kind of an Anthropic API key (`sk-ant-…`).
pub const KIND_ANTHROPIC_API_KEY: &str = "anthropic_api_key";
/// Kind of a JSON Web Token (`eyJ….….…`).
pub const KIND_JWT: &str = "jwt";
/// Kind of the password part of `scheme://user:password@host`.
pub const KIND_URL_PASSWORD: &str = "url_password";

/// Prefix of every replacement; also used to keep redaction idempotent.
const REDACTED_PREFIX: &str = "[REDACTED:";

/// What to do with secrets found in a prompt bound to a given upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Forward unchanged; only count the findings (for the audit row).
    Allow,
    /// Replace each finding with `[REDACTED:<kind>]` and forward.
    #[default]
    Redact,
    /// Refuse the request if anything is found; the error lists kinds only.
    Block,
}

/// One detected secret: its kind and its byte span in the scanned text.
///
/// Deliberately holds no copy of the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Built-in kind (see the `KIND_*` constants) or a configured pattern's name.
    pub kind: Cow<'static, str>,
    /// Byte offset of the first byte of the secret.
    pub start: usize,
    /// Byte offset one past the last byte of the secret.
    pub end: usize,
}

/// Building a [`Redactor`] failed; the message names the offending pattern.
#[derive(Debug, thiserror::Error)]
pub enum RedactError {
    /// A configured (or built-in) regex does not compile.
    #[error("redaction pattern `{name}`: invalid regex: {message}")]
    InvalidPattern {
        /// The pattern's name.
        name: String,
        /// The regex compiler's explanation.
        message: String,
    },
    /// A configured pattern matches the empty string, which would flag every position.
    #[error("redaction pattern `{name}`: regex matches the empty string")]
    MatchesEmpty {
        /// The pattern's name.
        name: String,
    },
    /// A configured pattern's name is empty, too long or has characters outside `[A-Za-z0-9_.-]`.
    #[error(
        "redaction pattern name `{name}` is invalid: use 1 to 64 characters from [A-Za-z0-9_.-]"
    )]
    InvalidName {
        /// The rejected name (escaped for display).
        name: String,
    },
    /// Two configured patterns share a name.
    #[error("redaction pattern `{name}` is configured twice")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
}

/// A request refused under [`Policy::Block`]: the kinds found, never the secrets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("request blocked: the prompt contains secrets ({})", kinds.join(", "))]
pub struct Blocked {
    /// Distinct kinds found, sorted.
    pub kinds: Vec<String>,
}

/// Extra acceptance test for a raw match (the regex crate has no look-around).
type Validator = fn(&str) -> bool;

struct Pattern {
    kind: Cow<'static, str>,
    re: Regex,
    /// Capture group holding the secret; `None` means the whole match.
    group: Option<usize>,
    validator: Option<Validator>,
}

/// Detects and redacts secrets. Build once at start-up and share (it is `Send + Sync`).
pub struct Redactor {
    patterns: Vec<Pattern>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field(
                "patterns",
                &self
                    .patterns
                    .iter()
                    .map(|p| p.kind.as_ref())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// `(?-u:\b)`: an ASCII word boundary, which keeps the fast DFA engines usable on non-ASCII text.
macro_rules! wb {
    () => {
        r"(?-u:\b)"
    };
}

/// Built-in detectors, in tie-break priority order (more specific first).
const BUILTINS: &[(&str, &str, Option<usize>, Option<Validator>)] = &[
    (
        KIND_PRIVATE_KEY,
        // A complete block. Kept apart from the pattern below: an alternation
        // of the two would make every END-less header scan to the end of the
        // text, i.e. quadratic time over many headers.
        concat!(
            r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----",
            r"[\s\S]*?-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----"
        ),
        None,
        None,
    ),
    (
        KIND_PRIVATE_KEY,
        // The header and the base64 body after it, so that a truncated paste
        // (no END line) is caught too; inside a complete block it merges with
        // the match above.
        r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----[A-Za-z0-9+/=\r\n]*",
        None,
        None,
    ),
    (
        KIND_AWS_SECRET_ACCESS_KEY,
        r#"(?i)aws[_\-. ]?secret[_\-. ]?(?:access[_\-. ]?)?key["']?\s*[:=]\s*["']?([A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)"#,
        Some(1),
        None,
    ),
    (
        KIND_AWS_ACCESS_KEY_ID,
        concat!(wb!(), "(?:AKIA|ASIA)[A-Z0-9]{16}", wb!()),
        None,
        None,
    ),
    (
        KIND_GITHUB_TOKEN,
        concat!(wb!(), "gh[pousr]_[A-Za-z0-9]{36,255}", wb!()),
        None,
        None,
    ),
    (
        KIND_GITHUB_TOKEN,
        concat!(wb!(), "github_pat_[A-Za-z0-9_]{22,255}", wb!()),
        None,
        None,
    ),
    (
        KIND_ANTHROPIC_API_KEY,
        concat!(wb!(), r"sk-ant-[A-Za-z0-9_\-]{20,}"),
        None,
        None,
    ),
    (
        KIND_OPENAI_API_KEY,
        concat!(wb!(), r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}"),
        None,
        Some(looks_random),
    ),
    (
        KIND_JWT,
        concat!(
            wb!(),
            r"eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"
        ),
        None,
        None,
    ),
    (
        KIND_URL_PASSWORD,
        // user may be empty (`redis://:pw@host`); the password runs to the
        // last `@` of the authority, as URL parsers read it.
        concat!(
            wb!(),
            r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@]*:([^\s/?#]+)@"
        ),
        Some(1),
        Some(not_already_redacted),
    ),
];

/// `sk-` keys are random: require a digit and a letter after the prefix, so
/// a long hyphenated phrase such as `sk-this-is-only-a-compound-word` is not flagged.
fn looks_random(m: &str) -> bool {
    let body = m.get(3..).unwrap_or("");
    body.bytes().any(|b| b.is_ascii_digit()) && body.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Keeps redaction idempotent: `user:[REDACTED:url_password]@host` is left alone.
fn not_already_redacted(m: &str) -> bool {
    !m.starts_with(REDACTED_PREFIX)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A candidate match before overlap resolution.
struct Candidate {
    start: usize,
    end: usize,
    priority: usize,
}

impl Redactor {
    /// Builds a redactor with the built-in detectors plus `extra` `(name, regex)` patterns.
    ///
    /// A configured regex with a capture group named `secret` redacts only
    /// that group (e.g. `token=(?P<secret>\w+)`); otherwise the whole match.
    /// Errors name the offending pattern: invalid regex, a regex matching the
    /// empty string, a bad or duplicate name.
    pub fn new(extra: &[(String, String)]) -> Result<Redactor, RedactError> {
        let mut patterns = Vec::with_capacity(BUILTINS.len() + extra.len());
        for &(kind, re, group, validator) in BUILTINS {
            let re = Regex::new(re).map_err(|e| RedactError::InvalidPattern {
                name: kind.to_owned(),
                message: e.to_string(),
            })?;
            patterns.push(Pattern {
                kind: Cow::Borrowed(kind),
                re,
                group,
                validator,
            });
        }
        let mut seen = BTreeSet::new();
        for (name, re) in extra {
            if !valid_name(name) {
                return Err(RedactError::InvalidName {
                    name: name.escape_debug().to_string(),
                });
            }
            if !seen.insert(name.as_str()) {
                return Err(RedactError::DuplicateName { name: name.clone() });
            }
            let re = RegexBuilder::new(re)
                .size_limit(4 << 20)
                .build()
                .map_err(|e| RedactError::InvalidPattern {
                    name: name.clone(),
                    message: e.to_string(),
                })?;
            if re.is_match("") {
                return Err(RedactError::MatchesEmpty { name: name.clone() });
            }
            let group = re
                .capture_names()
                .position(|n| n == Some("secret"))
                .filter(|&i| i > 0);
            patterns.push(Pattern {
                kind: Cow::Owned(name.clone()),
                re,
                group,
                validator: None,
            });
        }
        Ok(Redactor { patterns })
    }

    /// Finds the secrets in `text`: sorted, non-overlapping byte spans.
    ///
    /// Overlapping matches are merged into one span (nothing of either secret
    /// is left outside it) whose kind is that of the longest match; ties go to
    /// the earliest match, then to the more specific detector (built-ins in
    /// declaration order, then configured patterns in configuration order).
    pub fn scan(&self, text: &str) -> Vec<Finding> {
        let mut cands = Vec::new();
        for (priority, p) in self.patterns.iter().enumerate() {
            match p.group {
                None => {
                    for m in p.re.find_iter(text) {
                        if !m.is_empty() && p.validator.is_none_or(|v| v(m.as_str())) {
                            cands.push(Candidate {
                                start: m.start(),
                                end: m.end(),
                                priority,
                            });
                        }
                    }
                }
                Some(g) => {
                    for caps in p.re.captures_iter(text) {
                        if let Some(m) = caps.get(g)
                            && !m.is_empty()
                            && p.validator.is_none_or(|v| v(m.as_str()))
                        {
                            cands.push(Candidate {
                                start: m.start(),
                                end: m.end(),
                                priority,
                            });
                        }
                    }
                }
            }
        }
        if cands.is_empty() {
            return Vec::new();
        }
        cands.sort_unstable_by(|a, b| {
            a.start
                .cmp(&b.start)
                .then((b.end - b.start).cmp(&(a.end - a.start)))
                .then(a.priority.cmp(&b.priority))
        });

        let mut out: Vec<Finding> = Vec::new();
        // Current merged span, and the (length, priority) of its best member.
        let mut cur: Option<(usize, usize, usize, usize)> = None;
        for c in cands {
            let len = c.end - c.start;
            cur = match cur {
                Some((s, e, best_len, best_prio)) if c.start < e => {
                    if len > best_len {
                        Some((s, e.max(c.end), len, c.priority))
                    } else {
                        Some((s, e.max(c.end), best_len, best_prio))
                    }
                }
                other => {
                    if let Some((s, e, _, prio)) = other {
                        out.push(self.finding(s, e, prio));
                    }
                    Some((c.start, c.end, len, c.priority))
                }
            };
        }
        if let Some((s, e, _, prio)) = cur {
            out.push(self.finding(s, e, prio));
        }
        out
    }

    fn finding(&self, start: usize, end: usize, priority: usize) -> Finding {
        let kind = self
            .patterns
            .get(priority)
            .map_or(Cow::Borrowed("secret"), |p| p.kind.clone());
        Finding { kind, start, end }
    }

    /// Returns `text` with every finding replaced by `[REDACTED:<kind>]`, and the number replaced.
    pub fn redact_text(&self, text: &str) -> (String, usize) {
        let findings = self.scan(text);
        (splice(text, &findings), findings.len())
    }

    /// Applies `policy` to every string of a request body bound for an upstream.
    ///
    /// Every string value and every object key, at any depth, is scanned —
    /// except the values of the enum-like members in [`SAFE_WORDS`] that are one
    /// of their documented words, and keys that are schema member names
    /// ([`SAFE_KEYS`]). Numbers, booleans and `null` hold no text.
    ///
    /// Returns the number of secrets found (`Allow`: counted, body unchanged;
    /// `Redact`: each replaced; a key that is redacted is renamed, with `_`
    /// appended while it would collide with another key). Under `Block`, any
    /// finding returns [`Blocked`] listing the distinct kinds, and the body is
    /// left unchanged.
    pub fn apply_to_request(&self, body: &mut Value, policy: Policy) -> Result<usize, Blocked> {
        self.apply_to_upstream(body, &mut String::new(), policy)
    }

    /// [`apply_to_request`](Self::apply_to_request) for the body and the
    /// request id that goes with it (a header the upstream receives too).
    pub fn apply_to_upstream(
        &self,
        body: &mut Value,
        request_id: &mut String,
        policy: Policy,
    ) -> Result<usize, Blocked> {
        let mut walk = Walk {
            redactor: self,
            policy,
            count: 0,
            kinds: BTreeSet::new(),
        };
        walk.value(body, None);
        walk.text(request_id);
        if walk.kinds.is_empty() {
            Ok(walk.count)
        } else {
            Err(Blocked {
                kinds: walk.kinds.into_iter().collect(),
            })
        }
    }
}

/// Enum-like members whose documented values are structure, not text: such a
/// value is not scanned (any other value of the same member is).
pub const SAFE_WORDS: &[(&str, &[&str])] = &[
    (
        "role",
        &[
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
            "function",
        ],
    ),
    (
        "type",
        &[
            "text",
            "image_url",
            "input_audio",
            "file",
            "refusal",
            "function",
            "custom",
            "allowed_tools",
            "json_schema",
            "json_object",
            // JSON Schema types, in tool parameters and response formats.
            "string",
            "number",
            "integer",
            "boolean",
            "object",
            "array",
            "null",
        ],
    ),
    ("encoding_format", &["float", "base64"]),
    ("tool_choice", &["none", "auto", "required"]),
    ("function_call", &["none", "auto"]),
    ("detail", &["auto", "low", "high"]),
    ("format", &["wav", "mp3"]),
    ("modalities", &["text", "audio"]),
    (
        "reasoning_effort",
        &["none", "minimal", "low", "medium", "high"],
    ),
    ("service_tier", &["auto", "default", "flex", "priority"]),
    ("verbosity", &["low", "medium", "high"]),
];

/// Object keys that are member names of the OpenAI request schemas or JSON Schema keywords: such
/// a key is not scanned (any other key is: `metadata` keys, schema property names, ...).
#[rustfmt::skip]
pub const SAFE_KEYS: &[&str] = &[
    // Request members (chat, completions, embeddings).
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
    "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "n",
    "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key", "reasoning_effort",
    "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
    "verbosity", "web_search_options", "top_k", "min_p", "repeat_penalty", "prompt", "best_of",
    "echo", "suffix", "input", "dimensions", "encoding_format",
    // Members of messages, parts, tools and formats.
    "role", "content", "name", "refusal", "tool_calls", "tool_call_id", "id", "type", "function",
    "arguments", "text", "image_url", "url", "detail", "input_audio", "data", "format", "file",
    "file_id", "file_data", "filename", "custom", "description", "parameters", "strict",
    "include_usage", "include_obfuscation", "json_schema", "schema", "allowed_tools", "mode",
    "voice",
    // JSON Schema keywords.
    "properties", "required", "items", "enum", "additionalProperties", "anyOf", "allOf", "oneOf",
    "not", "const", "default", "$ref", "$defs", "definitions", "title", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern",
    "minItems", "maxItems", "uniqueItems", "examples", "nullable", "$schema",
];

fn is_safe_word(member: Option<&str>, value: &str) -> bool {
    member.is_some_and(|m| {
        SAFE_WORDS
            .iter()
            .any(|(k, words)| *k == m && words.contains(&value))
    })
}

/// One pass of a policy over a JSON document.
struct Walk<'a> {
    redactor: &'a Redactor,
    policy: Policy,
    count: usize,
    /// Kinds found (only filled under `Block`).
    kinds: BTreeSet<String>,
}

impl Walk<'_> {
    /// `member`: the name of the object member holding `v` (array items inherit it).
    fn value(&mut self, v: &mut Value, member: Option<&str>) {
        match v {
            Value::String(s) => {
                if !is_safe_word(member, s) {
                    self.text(s);
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.value(item, member);
                }
            }
            Value::Object(m) => {
                let mut renamed = Vec::new();
                for (k, child) in m.iter_mut() {
                    self.value(child, Some(k));
                    if SAFE_KEYS.contains(&k.as_str()) {
                        continue;
                    }
                    let mut key = k.clone();
                    if self.text(&mut key) > 0 && key != *k {
                        renamed.push((k.clone(), key));
                    }
                }
                for (old, mut new) in renamed {
                    if let Some(child) = m.remove(&old) {
                        while m.contains_key(&new) {
                            new.push('_');
                        }
                        m.insert(new, child);
                    }
                }
            }
            Value::Number(_) | Value::Bool(_) | Value::Null => {}
        }
    }

    /// Apply the policy to one string; returns the findings in it.
    fn text(&mut self, s: &mut String) -> usize {
        let findings = self.redactor.scan(s);
        let n = findings.len();
        self.count += n;
        match self.policy {
            Policy::Allow => {}
            Policy::Redact => {
                if n > 0 {
                    *s = splice(s, &findings);
                }
            }
            Policy::Block => {
                for f in findings {
                    self.kinds.insert(f.kind.into_owned());
                }
            }
        }
        n
    }
}

/// Rebuilds `text` with each (sorted, non-overlapping) finding replaced.
fn splice(text: &str, findings: &[Finding]) -> String {
    let mut out = String::with_capacity(text.len() + findings.len() * 16);
    let mut pos = 0;
    for f in findings {
        // Spans come from regex matches on `text`, so they are in bounds and
        // on char boundaries; `get` keeps this panic-free regardless.
        if f.start < pos {
            continue;
        }
        if let Some(before) = text.get(pos..f.start) {
            out.push_str(before);
        }
        out.push_str(REDACTED_PREFIX);
        out.push_str(&f.kind);
        out.push(']');
        pos = f.end;
    }
    if let Some(rest) = text.get(pos..) {
        out.push_str(rest);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Instant;

    fn r() -> Redactor {
        match Redactor::new(&[]) {
            Ok(r) => r,
            Err(e) => panic!("built-in patterns must compile: {e}"),
        }
    }

    /// Fake values, assembled at run time so no secret-shaped literal sits in the source.
    fn fake_pem(label: &str) -> String {
        let body = "A".repeat(64);
        format!(
            "-----BEGIN {label}PRIVATE KEY-----\n{body}\n{body}\n-----END {label}PRIVATE KEY-----"
        )
    }
    fn fake_akia() -> String {
        format!("AKIA{}", "A".repeat(16))
    }
    fn fake_asia() -> String {
        format!("ASIA{}", "B7".repeat(8))
    }
    fn fake_aws_secret() -> String {
        "abcdEFGH/+12".repeat(4)[..40].to_owned()
    }
    fn fake_ghp(prefix: &str) -> String {
        format!("{prefix}_{}", "x1".repeat(18))
    }
    fn fake_github_pat() -> String {
        format!("github_pat_{}_{}", "A1".repeat(11), "b2".repeat(29))
    }
    fn fake_openai() -> String {
        format!("sk-{}", "Ab3".repeat(16))
    }
    fn fake_openai_proj() -> String {
        format!("sk-proj-{}", "Zy9_-".repeat(20))
    }
    fn fake_anthropic() -> String {
        format!("sk-ant-api03-{}", "Qw7-".repeat(24))
    }
    fn fake_jwt() -> String {
        format!(
            "eyJ{}.eyJ{}.{}",
            "hbGciOiJIUzI1NiJ9",
            "zdWIiOiIxMjM0In0",
            "s1g".repeat(14)
        )
    }

    fn kinds(r: &Redactor, text: &str) -> Vec<String> {
        r.scan(text)
            .into_iter()
            .map(|f| f.kind.into_owned())
            .collect()
    }

    fn assert_detects(r: &Redactor, secret: &str, kind: &str) {
        let text = format!("here it is: {secret} -- keep it safe.");
        let found = r.scan(&text);
        assert_eq!(found.len(), 1, "one finding for {kind}: {found:?}");
        assert_eq!(found[0].kind, kind);
        assert_eq!(
            &text[found[0].start..found[0].end],
            secret,
            "span of {kind}"
        );
        let (out, n) = r.redact_text(&text);
        assert_eq!(n, 1);
        assert_eq!(
            out,
            format!("here it is: [REDACTED:{kind}] -- keep it safe.")
        );
        assert!(!out.contains(secret));
    }

    #[test]
    fn redact_detects_each_builtin_kind() {
        let r = r();
        for label in ["", "RSA ", "EC ", "OPENSSH ", "ENCRYPTED "] {
            assert_detects(&r, &fake_pem(label), KIND_PRIVATE_KEY);
        }
        assert_detects(&r, &fake_akia(), KIND_AWS_ACCESS_KEY_ID);
        assert_detects(&r, &fake_asia(), KIND_AWS_ACCESS_KEY_ID);
        for p in ["ghp", "gho", "ghu", "ghs", "ghr"] {
            assert_detects(&r, &fake_ghp(p), KIND_GITHUB_TOKEN);
        }
        assert_detects(&r, &fake_github_pat(), KIND_GITHUB_TOKEN);
        assert_detects(&r, &fake_openai(), KIND_OPENAI_API_KEY);
        assert_detects(&r, &fake_openai_proj(), KIND_OPENAI_API_KEY);
        assert_detects(&r, &fake_anthropic(), KIND_ANTHROPIC_API_KEY);
        assert_detects(&r, &fake_jwt(), KIND_JWT);
    }

    #[test]
    fn redact_truncated_pem_is_still_caught() {
        let r = r();
        let text = format!(
            "key:\n-----BEGIN RSA PRIVATE KEY-----\n{}\n{}",
            "M".repeat(64),
            "N".repeat(20)
        );
        let (out, n) = r.redact_text(&text);
        assert_eq!(n, 1);
        assert_eq!(out, "key:\n[REDACTED:private_key]");
    }

    #[test]
    fn redact_labelled_aws_secret_only_the_value() {
        let r = r();
        let secret = fake_aws_secret();
        for text in [
            format!("aws_secret_access_key = {secret}\n"),
            format!("AWS_SECRET_ACCESS_KEY={secret}"),
            format!("{{\"aws_secret_access_key\": \"{secret}\"}}"),
        ] {
            let (out, n) = r.redact_text(&text);
            assert_eq!(n, 1, "{text}");
            assert!(!out.contains(&secret));
            assert!(out.contains("[REDACTED:aws_secret_access_key]"), "{out}");
            assert!(out.to_lowercase().contains("aws_secret_access_key"));
        }
        // An unlabelled 40-character string is not an AWS secret.
        assert!(r.scan(&format!("value {secret} here")).is_empty());
    }

    #[test]
    fn redact_url_password_keeps_user_and_host() {
        let r = r();
        let pw = format!("pa{}ss", "w0rd".repeat(2));
        let text = format!("connect to postgres://alice:{pw}@db.internal:5432/app now");
        let (out, n) = r.redact_text(&text);
        assert_eq!(n, 1);
        assert_eq!(
            out,
            "connect to postgres://alice:[REDACTED:url_password]@db.internal:5432/app now"
        );
        // Password containing '@' and ':'; empty user.
        let (out, n) =
            r.redact_text("redis://:p@ss:w@cache:6379 and https://bob:x@h.example/a?b=c@d");
        assert_eq!(n, 2);
        assert_eq!(
            out,
            "redis://:[REDACTED:url_password]@cache:6379 and https://bob:[REDACTED:url_password]@h.example/a?b=c@d"
        );
        // Redacting twice finds nothing new.
        let (again, n) = r.redact_text(&out);
        assert_eq!((again.as_str(), n), (out.as_str(), 0));
        // No credentials, no finding.
        assert!(
            r.scan("see https://example.com:8443/path?q=a:b and mailto:x@y.z")
                .is_empty()
        );
    }

    #[test]
    fn redact_no_false_positives() {
        let r = r();
        let sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let texts = [
            "The quick brown fox jumps over the lazy dog. Ask about the sk team, or sk- prefixes.",
            "fn main() { let sk = key.split('-').collect::<Vec<_>>(); println!(\"{:?}\", sk); }",
            "request id 123e4567-e89b-12d3-a456-426614174000 finished",
            sha256,
            "the task-based-approach-for-distributed-systems paper; risk-assessment-framework",
            "sk-this-is-only-a-long-compound-word-without-digits",
            "AKIA is a prefix; AKIAshort is not a key; ghp_short neither.",
            "https://docs.example.com/guide#section and user@example.com",
            "Ünïcödé prose — naïve café, 日本語のテキスト, emoji 🎉",
            "eyJ alone is not a token; a.b.c is not either",
        ];
        for t in texts {
            assert!(
                r.scan(t).is_empty(),
                "false positive in {t:?}: {:?}",
                r.scan(t)
            );
        }
    }

    #[test]
    fn redact_multiple_and_overlapping() {
        let r = r();
        let text = format!("a {} b {} c {}", fake_akia(), fake_jwt(), fake_ghp("ghp"));
        assert_eq!(
            kinds(&r, &text),
            vec![KIND_AWS_ACCESS_KEY_ID, KIND_JWT, KIND_GITHUB_TOKEN]
        );
        // A JWT used as a URL password: one merged span, nothing leaks.
        let jwt = fake_jwt();
        let text = format!("https://u:{jwt}@host/");
        let (out, n) = r.redact_text(&text);
        assert_eq!(n, 1);
        assert!(!out.contains("eyJ"), "{out}");
        // The Anthropic key also fits the generic sk- shape: the specific kind wins.
        assert_eq!(kinds(&r, &fake_anthropic()), vec![KIND_ANTHROPIC_API_KEY]);
    }

    #[test]
    fn redact_extra_patterns_and_errors() {
        let extra = vec![
            ("acme_token".to_owned(), r"acme_[0-9a-f]{32}".to_owned()),
            ("db_pass".to_owned(), r"DB_PASS=(?P<secret>\S+)".to_owned()),
        ];
        let r = match Redactor::new(&extra) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let tok = format!("acme_{}", "0f".repeat(16));
        let (out, n) = r.redact_text(&format!("t={tok} DB_PASS=hunter2x end"));
        assert_eq!(n, 2);
        assert_eq!(
            out,
            "t=[REDACTED:acme_token] DB_PASS=[REDACTED:db_pass] end"
        );

        let bad = vec![("broken_one".to_owned(), "(unclosed".to_owned())];
        let err = Redactor::new(&bad).map(|_| ()).err();
        match err {
            Some(e @ RedactError::InvalidPattern { .. }) => {
                assert!(e.to_string().contains("broken_one"), "{e}")
            }
            other => panic!("expected InvalidPattern, got {other:?}"),
        }
        let empty = vec![("anything".to_owned(), "x*".to_owned())];
        assert!(matches!(
            Redactor::new(&empty),
            Err(RedactError::MatchesEmpty { .. })
        ));
        let badname = vec![("has space".to_owned(), "abc".to_owned())];
        assert!(matches!(
            Redactor::new(&badname),
            Err(RedactError::InvalidName { .. })
        ));
        let dup = vec![
            ("same".to_owned(), "abc".to_owned()),
            ("same".to_owned(), "def".to_owned()),
        ];
        assert!(matches!(
            Redactor::new(&dup),
            Err(RedactError::DuplicateName { .. })
        ));
    }

    #[test]
    fn redact_policy_block_lists_kinds_only() {
        let r = r();
        let akia = fake_akia();
        let jwt = fake_jwt();
        let mut body = json!({
            "model": "gpt-x",
            "messages": [
                {"role": "user", "content": format!("keys {akia} and {jwt} and {akia}")}
            ]
        });
        let before = body.clone();
        let err = match r.apply_to_request(&mut body, Policy::Block) {
            Err(e) => e,
            Ok(n) => panic!("expected Blocked, got Ok({n})"),
        };
        assert_eq!(err.kinds, vec![KIND_AWS_ACCESS_KEY_ID, KIND_JWT]);
        let msg = err.to_string();
        assert!(!msg.contains(&akia) && !msg.contains(&jwt), "{msg}");
        assert!(
            msg.contains("aws_access_key_id") && msg.contains("jwt"),
            "{msg}"
        );
        assert!(!format!("{err:?}").contains(&akia));
        assert_eq!(body, before, "block leaves the body unchanged");

        let mut clean = json!({"messages": [{"role": "user", "content": "hello"}]});
        assert_eq!(r.apply_to_request(&mut clean, Policy::Block), Ok(0));
    }

    #[test]
    fn redact_policy_allow_counts_only() {
        let r = r();
        let mut body = json!({"prompt": format!("{} {}", fake_akia(), fake_openai())});
        let before = body.clone();
        assert_eq!(r.apply_to_request(&mut body, Policy::Allow), Ok(2));
        assert_eq!(body, before);
    }

    #[test]
    fn redact_apply_to_chat_string_and_parts() {
        let r = r();
        let pem = fake_pem("RSA ");
        let gh = fake_ghp("ghp");
        let mut body = json!({
            "model": "gpt-x",
            "temperature": 0.2,
            "user": fake_akia(),
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": format!("my key:\n{pem}\nthanks")},
                {"role": "user", "content": [
                    {"type": "text", "text": format!("token {gh}")},
                    {"type": "image_url", "image_url": {"url": format!("https://x/{gh}")}}
                ]},
                {"role": "assistant", "content": null}
            ]
        });
        let n = r.apply_to_request(&mut body, Policy::Redact);
        assert_eq!(n, Ok(4));
        assert_eq!(
            body["messages"][1]["content"],
            "my key:\n[REDACTED:private_key]\nthanks"
        );
        assert_eq!(
            body["messages"][2]["content"][0]["text"],
            "token [REDACTED:github_token]"
        );
        // Every string leaving is covered: image URLs and `user` too.
        assert_eq!(
            body["messages"][2]["content"][1]["image_url"]["url"],
            "https://x/[REDACTED:github_token]"
        );
        assert_eq!(body["user"], "[REDACTED:aws_access_key_id]");
        // Clean strings, structure and numbers are untouched.
        assert_eq!(body["messages"][0]["content"], "You are helpful.");
        assert_eq!(body["messages"][2]["content"][1]["type"], "image_url");
        assert_eq!(body["temperature"], 0.2);
    }

    /// Regression (issue 11): secrets went to the cloud upstream unredacted from every one of
    /// these fields, since only `messages[].content` was inspected.
    #[test]
    fn redact_every_field_an_upstream_receives() {
        let r = r();
        let akia = fake_akia();
        let gh = fake_ghp("ghp");
        let fields: Vec<(&str, Value)> = vec![
            (
                "/messages/0/tool_calls/0/function/arguments",
                json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": format!("{{\"key\": \"{akia}\"}}")}}
                ]}]}),
            ),
            (
                "/tools/0/function/description",
                json!({"tools": [{"type": "function", "function": {"name": "f", "description": format!("uses {akia}")}}]}),
            ),
            (
                "/tools/0/function/parameters/properties/k/default",
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters":
                    {"type": "object", "properties": {"k": {"type": "string", "default": akia}}}}}]}),
            ),
            (
                "/messages/0/name",
                json!({"messages": [{"role": "user", "content": "hi", "name": akia}]}),
            ),
            (
                "/messages/0/content/0/text",
                json!({"messages": [{"role": "user", "content": [{"type": "input_text", "text": akia}]}]}),
            ),
            (
                "/messages/0/content/0/text",
                json!({"messages": [{"role": "user", "content": [{"type": "Text", "text": akia}]}]}),
            ),
            (
                "/messages/0/refusal",
                json!({"messages": [{"role": "assistant", "content": "no", "refusal": format!("not with {akia}")}]}),
            ),
            (
                "/messages/0/content/0/refusal",
                json!({"messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": akia}]}]}),
            ),
            ("/user", json!({"user": akia})),
            ("/metadata/note", json!({"metadata": {"note": akia}})),
            (
                "/response_format/json_schema/schema/description",
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                    "description": "d", "schema": {"type": "object", "description": akia}}}}),
            ),
            (
                "/response_format/json_schema/description",
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "description": akia}}}),
            ),
            ("/prompt/0/0", json!({"prompt": [[akia]]})),
            ("/prompt/1/0/0", json!({"prompt": ["ok", [[akia]]]})),
            ("/input/0", json!({"input": [akia]})),
            ("/stop/0", json!({"stop": [akia]})),
            (
                "/messages/0/content",
                json!({"messages": [{"role": "tool", "tool_call_id": akia, "content": akia}]}),
            ),
            (
                "/some_future_field/x",
                json!({"some_future_field": {"x": akia}}),
            ),
        ];
        for (pointer, body) in fields {
            let mut b = body.clone();
            b["model"] = json!("gpt-x");
            // Block refuses, naming the kind, and changes nothing.
            let before = b.clone();
            assert_eq!(
                r.apply_to_request(&mut b, Policy::Block),
                Err(Blocked {
                    kinds: vec![KIND_AWS_ACCESS_KEY_ID.to_string()]
                }),
                "{pointer}"
            );
            assert_eq!(b, before);
            // Redact leaves no trace of it anywhere in what is sent.
            let n = r.apply_to_request(&mut b, Policy::Redact).unwrap();
            assert!(n >= 1, "{pointer}");
            let sent = b.to_string();
            assert!(!sent.contains(&akia), "{pointer}: {sent}");
            assert!(
                b.pointer(pointer)
                    .and_then(Value::as_str)
                    .is_some_and(|s| s.contains("[REDACTED:aws_access_key_id]")),
                "{pointer}: {sent}"
            );
            assert_eq!(b["model"], "gpt-x");
        }
        // Secrets as object keys (metadata, schema property names) are renamed.
        let mut b = json!({"metadata": {akia.clone(): "v", "[REDACTED:aws_access_key_id]": "w"},
            "tools": [{"type": "function", "function": {"name": "f", "parameters":
                {"type": "object", "properties": {gh.clone(): {"type": "string"}}}}}]});
        assert_eq!(r.apply_to_request(&mut b, Policy::Redact), Ok(2));
        let sent = b.to_string();
        assert!(!sent.contains(&akia) && !sent.contains(&gh), "{sent}");
        assert_eq!(b["metadata"].as_object().unwrap().len(), 2, "no key lost");
        let mut b = json!({"metadata": {akia.clone(): "v"}});
        assert!(r.apply_to_request(&mut b, Policy::Block).is_err());
        // The request id sent along is covered too.
        let mut rid = format!("req-{gh}");
        let mut b = json!({"model": "m"});
        assert_eq!(r.apply_to_upstream(&mut b, &mut rid, Policy::Redact), Ok(1));
        assert_eq!(rid, "req-[REDACTED:github_token]");
        let mut rid = format!("req-{gh}");
        assert!(
            r.apply_to_upstream(&mut b, &mut rid, Policy::Block)
                .is_err()
        );
    }

    /// The allow-list: enum-like members keep their documented words even under a configured
    /// pattern broad enough to match them; any other value of those members is scanned.
    #[test]
    fn redact_skips_only_documented_words_of_enum_like_members() {
        let r =
            Redactor::new(&[("word".to_owned(), r"\b(?:user|text|object)\b".to_owned())]).unwrap();
        let mut b = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a user"}]}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}});
        assert_eq!(r.apply_to_request(&mut b, Policy::Redact), Ok(1));
        assert_eq!(b["messages"][0]["role"], "user");
        assert_eq!(b["messages"][0]["content"][0]["type"], "text");
        assert_eq!(b["messages"][0]["content"][0]["text"], "a [REDACTED:word]");
        assert_eq!(
            b["response_format"]["json_schema"]["schema"]["type"],
            "object"
        );
        // A role or type that is not a documented word is text like any other.
        let r = self::r();
        let akia = fake_akia();
        let mut b = json!({"messages": [{"role": akia.clone(), "content": [{"type": akia.clone()}]}], "model": akia.clone()});
        assert_eq!(r.apply_to_request(&mut b, Policy::Redact), Ok(3));
        assert!(!b.to_string().contains(&akia));
    }

    #[test]
    fn redact_apply_to_completions_and_embeddings() {
        let r = r();
        let key = fake_openai();
        let mut completions = json!({"model": "m", "prompt": format!("use {key}")});
        assert_eq!(r.apply_to_request(&mut completions, Policy::Redact), Ok(1));
        assert_eq!(completions["prompt"], "use [REDACTED:openai_api_key]");

        let mut batch =
            json!({"model": "m", "prompt": [format!("a {key}"), "b", format!("{key} c")]});
        assert_eq!(r.apply_to_request(&mut batch, Policy::Redact), Ok(2));
        assert_eq!(
            batch["prompt"],
            json!([
                "a [REDACTED:openai_api_key]",
                "b",
                "[REDACTED:openai_api_key] c"
            ])
        );

        let mut tokens = json!({"model": "m", "prompt": [1, 2, 3]});
        assert_eq!(r.apply_to_request(&mut tokens, Policy::Redact), Ok(0));
        assert_eq!(tokens["prompt"], json!([1, 2, 3]));

        let jwt = fake_jwt();
        let mut emb = json!({"model": "e", "input": format!("Bearer {jwt}")});
        assert_eq!(r.apply_to_request(&mut emb, Policy::Redact), Ok(1));
        assert_eq!(emb["input"], "Bearer [REDACTED:jwt]");

        let mut emb_batch =
            json!({"model": "e", "input": ["fine", jwt.clone()], "encoding_format": "float"});
        assert_eq!(r.apply_to_request(&mut emb_batch, Policy::Redact), Ok(1));
        assert_eq!(emb_batch["input"], json!(["fine", "[REDACTED:jwt]"]));
        assert_eq!(emb_batch["encoding_format"], "float");

        // Whatever its shape, every string of what is sent is covered.
        let mut not_object = json!(["prompt", key]);
        assert_eq!(r.apply_to_request(&mut not_object, Policy::Redact), Ok(1));
        assert_eq!(not_object, json!(["prompt", "[REDACTED:openai_api_key]"]));
    }

    #[test]
    fn redact_adversarial_inputs_stay_linear() {
        let r = r();
        let header = format!("-----BEGIN RSA {}-----\n", "PRIVATE KEY");
        let cases: Vec<(&str, String)> = vec![
            (
                "pem headers without END",
                format!("{header}AAAA\n").repeat(30_000),
            ),
            ("urls without @", "x://a:b".repeat(150_000)),
            ("urls with many @", "x://a:b@".repeat(130_000)),
            ("jwt-ish", "eyJabcd.".repeat(130_000)),
            ("sk- runs", "sk-".repeat(350_000)),
            ("aws labels", "aws_secret_access_key=".repeat(48_000)),
        ];
        for (name, text) in cases {
            let t0 = Instant::now();
            let n = r.scan(&text).len();
            let took = t0.elapsed();
            println!(
                "redact: adversarial {name}: {} bytes, {n} findings, {took:?}",
                text.len()
            );
            assert!(took.as_secs() < 20, "{name} took {took:?}");
        }
    }

    #[test]
    fn redact_one_mib_prompt_is_fast() {
        let r = r();
        let para = "The gateway forwards prompts to upstream models; logs are audited and \
                    nothing secret should leave. fn handle(req: Request) -> Response { ok } \
                    id 123e4567-e89b-12d3-a456-426614174000, see https://example.com/x. ";
        let mut text = String::with_capacity(1 << 20);
        while text.len() < (1 << 20) {
            text.push_str(para);
        }
        text.push_str(&fake_akia());
        text.push(' ');
        text.insert_str(1000, &format!(" {} ", fake_openai()));
        let t0 = Instant::now();
        let found = r.scan(&text);
        let scan = t0.elapsed();
        let t1 = Instant::now();
        let (out, n) = r.redact_text(&text);
        let redact = t1.elapsed();
        println!(
            "redact: scanned {} bytes in {scan:?}, scan+redact in {redact:?}, {} findings",
            text.len(),
            found.len()
        );
        assert_eq!(found.len(), 2);
        assert_eq!(n, 2);
        assert!(out.contains("[REDACTED:aws_access_key_id]"));
        // Generous bound: debug builds of `regex` are far slower than release.
        assert!(scan.as_secs() < 20, "scan took {scan:?}");
    }
}

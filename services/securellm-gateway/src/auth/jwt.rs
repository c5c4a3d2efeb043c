//! JWT bearer tokens (`jsonwebtoken`), beside API keys.
//!
//! The algorithm is pinned by configuration: HS256 with a shared secret, or RS256 / EdDSA with a
//! PEM public key. A token whose header names another algorithm — `none`, or HS256 signed with the
//! RSA public key as the secret (algorithm confusion) — is rejected before its signature is
//! looked at. `exp` and `sub` are always required; `iss` and `aud` are *required* (a token
//! without them is refused) when `issuer` / `audience` are configured, and must then match; `nbf`
//! is checked when present. Claims carry the subject (`sub`), the model patterns the caller may use
//! (`models`, default from config) and optional limits (`rpm`, `tpm`, `concurrent`,
//! `max_tokens`).
//!
//! A token's caller id (its key id in the audit log and the key its rate limits follow) is
//! `jwt:<iss>:<sub>` (`iss` empty when absent; `%` and `:` in it written `%25` and `%3A`), which
//! can never equal an API key's id (`key_<hex>`).

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::auth::keys::KeyRecord;

/// `[gateway.jwt]` in the config file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `HS256`, `RS256` or `EdDSA`.
    pub algorithm: String,
    /// HS256: file holding the shared secret (else `$SECURELLM_JWT_SECRET`).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// RS256 / EdDSA: PEM public key.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    /// Model patterns for tokens without a `models` claim.
    #[serde(default)]
    pub default_models: Vec<String>,
    /// Clock skew tolerated, seconds.
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
}

fn default_leeway() -> u64 {
    30
}

/// Why the JWT configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error("invalid `gateway.jwt.{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> JwtConfigError {
    JwtConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// A configured verifier.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    default_models: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scopes {
    Words(String),
    List(Vec<String>),
}

impl Scopes {
    fn has(&self, want: &str) -> bool {
        match self {
            Scopes::Words(s) => s.split_whitespace().any(|x| x == want),
            Scopes::List(l) => l.iter().any(|x| x == want),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    rpm: Option<u32>,
    #[serde(default)]
    tpm: Option<u32>,
    #[serde(default)]
    concurrent: Option<u32>,
    /// The priority of the loads this caller triggers (see `KeyRecord::priority`).
    #[serde(default)]
    priority: Option<i32>,
    /// Largest `max_tokens` this caller may ask for (below the gateway's `max_tokens_cap`).
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    iss: Option<String>,
    /// Scopes: an OAuth-style space-separated string or a list; `admin` grants the GatewayAdmin
    /// service.
    #[serde(default)]
    scope: Option<Scopes>,
    exp: u64,
}

impl JwtConfig {
    /// What can be checked without reading the key files: a known algorithm, and the public key
    /// file named where the algorithm needs one (HS256 may take its secret from the environment).
    pub fn check(&self) -> Result<(), JwtConfigError> {
        match self.algorithm.as_str() {
            "HS256" => Ok(()),
            "RS256" | "EdDSA" if self.public_key_file.is_none() => Err(invalid(
                "public_key_file",
                format!("{} needs a PEM public key", self.algorithm),
            )),
            "RS256" | "EdDSA" => Ok(()),
            other => Err(invalid(
                "algorithm",
                format!("{other:?} is not one of HS256, RS256, EdDSA"),
            )),
        }
    }
}

impl JwtVerifier {
    pub fn new(c: &JwtConfig) -> Result<Self, JwtConfigError> {
        c.check()?;
        let read = |field: &'static str, p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| invalid(field, format!("cannot read {}: {e}", p.display())))
        };
        let (alg, key) = match c.algorithm.as_str() {
            "HS256" => {
                let secret = match &c.secret_file {
                    Some(p) => read("secret_file", p)?,
                    None => std::env::var("SECURELLM_JWT_SECRET")
                        .map(String::into_bytes)
                        .map_err(|_| {
                            invalid(
                                "secret_file",
                                "HS256 needs secret_file or $SECURELLM_JWT_SECRET",
                            )
                        })?,
                };
                let secret: Vec<u8> = secret.trim_ascii().to_vec();
                if secret.len() < 32 {
                    return Err(invalid(
                        "secret_file",
                        "an HS256 secret must be at least 32 bytes",
                    ));
                }
                (Algorithm::HS256, DecodingKey::from_secret(&secret))
            }
            "RS256" | "EdDSA" => {
                let p = c.public_key_file.as_ref().ok_or_else(|| {
                    invalid(
                        "public_key_file",
                        format!("{} needs a PEM public key", c.algorithm),
                    )
                })?;
                let pem = read("public_key_file", p)?;
                if c.algorithm == "RS256" {
                    let k = DecodingKey::from_rsa_pem(&pem)
                        .map_err(|e| invalid("public_key_file", e.to_string()))?;
                    (Algorithm::RS256, k)
                } else {
                    let k = DecodingKey::from_ed_pem(&pem)
                        .map_err(|e| invalid("public_key_file", e.to_string()))?;
                    (Algorithm::EdDSA, k)
                }
            }
            other => {
                return Err(invalid(
                    "algorithm",
                    format!("{other:?} is not one of HS256, RS256, EdDSA"),
                ));
            }
        };
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.validate_nbf = true;
        v.leeway = c.leeway_s;
        // Every claim the configuration names is required, not merely checked when present: a
        // token minted for another service by the same identity provider (no `aud`, or no
        // `iss`) must not pass.
        let mut required = vec!["exp", "sub"];
        if let Some(i) = &c.issuer {
            v.set_issuer(&[i]);
            required.push("iss");
        }
        match &c.audience {
            Some(a) => {
                v.set_audience(&[a]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        Ok(Self {
            key,
            validation: v,
            default_models: c.default_models.clone(),
        })
    }

    /// Looks like a JWT (three dot-separated parts)?
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3 && token.starts_with("eyJ")
    }

    /// Verify and turn the claims into a caller record. The error says why (never echoing the
    /// token).
    pub fn verify(&self, token: &str) -> Result<KeyRecord, String> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::ExpiredSignature => "the token has expired".to_string(),
                    K::ImmatureSignature => "the token is not valid yet (nbf)".to_string(),
                    K::InvalidIssuer => "wrong issuer".to_string(),
                    K::InvalidAudience => "wrong audience".to_string(),
                    K::InvalidAlgorithm => {
                        "the token's algorithm is not the one configured".to_string()
                    }
                    K::InvalidSignature => "bad signature".to_string(),
                    K::MissingRequiredClaim(c) => format!("the token lacks the `{c}` claim"),
                    _ => "malformed token".to_string(),
                }
            })?;
        let c = data.claims;
        if c.sub.trim().is_empty() {
            return Err("empty `sub` claim".into());
        }
        Ok(KeyRecord {
            id: caller_id(c.iss.as_deref().unwrap_or(""), &c.sub),
            name: "jwt".into(),
            prefix: String::new(),
            subject: c.sub,
            models: c.models.unwrap_or_else(|| self.default_models.clone()),
            rpm: c.rpm,
            tpm: c.tpm,
            concurrent: c.concurrent,
            max_tokens: c.max_tokens,
            priority: c.priority.map(|p| {
                p.clamp(
                    *crate::grpc::admin::PRIORITY_RANGE.start(),
                    *crate::grpc::admin::PRIORITY_RANGE.end(),
                )
            }),
            created_ms: 0,
            expires_ms: Some(c.exp.saturating_mul(1000)),
            revoked_ms: None,
            admin: c.scope.as_ref().is_some_and(|s| s.has("admin")),
        })
    }
}

/// `jwt:<iss>:<sub>`, with `%` and `:` escaped in `iss` so that distinct (issuer, subject) pairs
/// never share an id.
pub fn caller_id(iss: &str, sub: &str) -> String {
    format!("jwt:{}:{sub}", iss.replace('%', "%25").replace(':', "%3A"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

    fn now() -> u64 {
        securellm_common::time::now_ms() / 1000
    }

    fn hs_verifier(dir: &std::path::Path) -> JwtVerifier {
        let p = dir.join("secret");
        std::fs::write(&p, SECRET).unwrap();
        JwtVerifier::new(&JwtConfig {
            algorithm: "HS256".into(),
            secret_file: Some(p),
            public_key_file: None,
            issuer: Some("https://issuer.example".into()),
            audience: Some("securellm".into()),
            default_models: vec!["tiny".into()],
            leeway_s: 0,
        })
        .unwrap()
    }

    fn hs(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn good() -> serde_json::Value {
        json!({"sub": "alice", "iss": "https://issuer.example", "aud": "securellm", "exp": now() + 300, "models": ["*"], "rpm": 5})
    }

    #[test]
    fn a_valid_token_gives_the_subject_scopes_and_limits() {
        let d = tempfile::tempdir().unwrap();
        let v = hs_verifier(d.path());
        let k = v.verify(&hs(good())).unwrap();
        assert_eq!((k.subject.as_str(), k.rpm), ("alice", Some(5)));
        assert!(k.allows("anything"));
        let mut no_models = good();
        no_models.as_object_mut().unwrap().remove("models");
        assert_eq!(
            v.verify(&hs(no_models)).unwrap().models,
            vec!["tiny".to_string()]
        );
    }

    #[test]
    fn expired_immature_wrong_issuer_audience_and_bad_signatures_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let v = hs_verifier(d.path());
        let with = |k: &str, val: serde_json::Value| {
            let mut c = good();
            c[k] = val;
            hs(c)
        };
        assert!(
            v.verify(&with("exp", json!(now() - 60)))
                .unwrap_err()
                .contains("expired")
        );
        assert!(
            v.verify(&with("nbf", json!(now() + 600)))
                .unwrap_err()
                .contains("not valid yet")
        );
        assert!(
            v.verify(&with("iss", json!("https://evil.example")))
                .unwrap_err()
                .contains("issuer")
        );
        assert!(
            v.verify(&with("aud", json!("someone-else")))
                .unwrap_err()
                .contains("audience")
        );
        let mut no_exp = good();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(v.verify(&hs(no_exp)).is_err());
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &good(),
            &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!"),
        )
        .unwrap();
        assert!(v.verify(&forged).unwrap_err().contains("signature"));
        assert!(v.verify("not.a.token").is_err());
    }

    /// Regression (issue 11): with an issuer and an audience configured, a token lacking `iss` or
    /// `aud` was accepted — and one with `scope: admin` was granted GatewayAdmin.
    #[test]
    fn configured_issuer_and_audience_are_required_claims() {
        let d = tempfile::tempdir().unwrap();
        let v = hs_verifier(d.path());
        for missing in [&["iss"][..], &["aud"], &["iss", "aud"]] {
            let mut c = good();
            c["scope"] = json!("openid admin");
            for k in missing {
                c.as_object_mut().unwrap().remove(*k);
            }
            let e = v.verify(&hs(c)).unwrap_err();
            assert!(e.contains("lacks"), "{missing:?}: {e}");
        }
        let mut admin = good();
        admin["scope"] = json!("admin");
        assert!(v.verify(&hs(admin)).unwrap().admin);
        // Without an issuer / audience configured, tokens need neither.
        let p = d.path().join("secret2");
        std::fs::write(&p, SECRET).unwrap();
        let open = JwtVerifier::new(&JwtConfig {
            algorithm: "HS256".into(),
            secret_file: Some(p),
            public_key_file: None,
            issuer: None,
            audience: None,
            default_models: vec![],
            leeway_s: 0,
        })
        .unwrap();
        let k = open
            .verify(&hs(json!({"sub": "alice", "exp": now() + 300})))
            .unwrap();
        assert_eq!(k.id, "jwt::alice");
    }

    /// The caller id (rate limits and audit) names issuer and subject, and distinct pairs never
    /// share one, nor with an API key id.
    #[test]
    fn caller_ids_are_per_issuer_and_subject() {
        let d = tempfile::tempdir().unwrap();
        let v = hs_verifier(d.path());
        let k = v.verify(&hs(good())).unwrap();
        assert_eq!(k.id, "jwt:https%3A//issuer.example:alice");
        assert_ne!(caller_id("a:b", "c"), caller_id("a", "b:c"));
        assert_ne!(caller_id("a%3Ab", "c"), caller_id("a:b", "c"));
        assert!(caller_id("", "key_0123").starts_with("jwt:"));
        let mut limited = good();
        limited["max_tokens"] = json!(64);
        assert_eq!(v.verify(&hs(limited)).unwrap().max_tokens, Some(64));
    }

    #[test]
    fn alg_none_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let v = hs_verifier(d.path());
        use base64_like::b64;
        let token = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(good().to_string().as_bytes())
        );
        assert!(v.verify(&token).is_err());
    }

    /// HS256 signed with the RSA public key as the HMAC secret must not pass an RS256 verifier.
    #[test]
    fn algorithm_confusion_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("k.pem");
        let pubkey = d.path().join("pub.pem");
        let ok = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key)
            .status()
            .is_ok_and(|s| s.success())
            && std::process::Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&key)
                .arg("-out")
                .arg(&pubkey)
                .status()
                .is_ok_and(|s| s.success());
        assert!(ok, "openssl is needed for this test");
        let v = JwtVerifier::new(&JwtConfig {
            algorithm: "RS256".into(),
            secret_file: None,
            public_key_file: Some(pubkey.clone()),
            issuer: None,
            audience: None,
            default_models: vec![],
            leeway_s: 0,
        })
        .unwrap();
        let pem = std::fs::read(&pubkey).unwrap();
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &good(),
            &EncodingKey::from_secret(&pem),
        )
        .unwrap();
        assert!(v.verify(&confused).unwrap_err().contains("algorithm"));
        // The genuine RS256 token passes.
        let real = encode(
            &Header::new(Algorithm::RS256),
            &good(),
            &EncodingKey::from_rsa_pem(&std::fs::read(&key).unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&real).unwrap().subject, "alice");
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = JwtVerifier::new(&JwtConfig {
            algorithm: "none".into(),
            secret_file: None,
            public_key_file: None,
            issuer: None,
            audience: None,
            default_models: vec![],
            leeway_s: 0,
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("algorithm"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("short");
        std::fs::write(&p, "short").unwrap();
        let e = JwtVerifier::new(&JwtConfig {
            algorithm: "HS256".into(),
            secret_file: Some(p),
            public_key_file: None,
            issuer: None,
            audience: None,
            default_models: vec![],
            leeway_s: 0,
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("secret_file"), "{e}");
    }

    /// URL-safe base64 without padding, enough to forge an unsigned token.
    mod base64_like {
        pub fn b64(data: &[u8]) -> String {
            const T: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut out = String::new();
            for chunk in data.chunks(3) {
                let b = [
                    chunk[0],
                    *chunk.get(1).unwrap_or(&0),
                    *chunk.get(2).unwrap_or(&0),
                ];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                for i in 0..=chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            out
        }
    }
}

//! Token verification keys, read from a file: an HS256 secret, an RSA or EC public key in PEM, or
//! a JWKS. A file that changes is read again (see `net::watch`); a file that does not parse keeps
//! the keys in use and says why in the log.

use std::sync::{Arc, RwLock};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::claims::{Denied, Grant};
use crate::config::security::{JwtConfig, KeySource};

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// One usable key and the algorithms it verifies.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// The keys loaded from the file.
pub struct KeySet {
    keys: Vec<Key>,
    /// A JWKS: a token must name its key (`kid`) unless there is only one.
    by_kid: bool,
}

fn family_algorithms(key: &DecodingKey) -> Vec<Algorithm> {
    use jsonwebtoken::AlgorithmFamily as F;
    match key.family() {
        F::Hmac => vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
        F::Rsa => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        F::Ec => vec![Algorithm::ES256, Algorithm::ES384],
        F::Ed => vec![Algorithm::EdDSA],
    }
}

impl KeySet {
    /// Parses the bytes of the key file.
    pub fn parse(source: &KeySource, bytes: &[u8]) -> Result<KeySet, KeyError> {
        let path = source.path().display().to_string();
        let invalid = |reason: String| KeyError::Invalid {
            path: path.clone(),
            reason,
        };
        match source {
            KeySource::Secret(_) => {
                let mut secret = bytes;
                while let Some((b'\n' | b'\r', rest)) = secret.split_last() {
                    secret = rest;
                }
                if secret.len() < 32 {
                    return Err(invalid(format!(
                        "an HS256 secret must have at least 32 bytes (this one has {})",
                        secret.len()
                    )));
                }
                let key = DecodingKey::from_secret(secret);
                Ok(KeySet {
                    keys: vec![Key {
                        kid: None,
                        key,
                        algorithms: vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
                    }],
                    by_kid: false,
                })
            }
            KeySource::PublicKey(_) => {
                let key = DecodingKey::from_rsa_pem(bytes)
                    .or_else(|_| DecodingKey::from_ec_pem(bytes))
                    .map_err(|e| invalid(format!("not an RSA or EC public key in PEM: {e}")))?;
                let algorithms = family_algorithms(&key);
                Ok(KeySet {
                    keys: vec![Key {
                        kid: None,
                        key,
                        algorithms,
                    }],
                    by_kid: false,
                })
            }
            KeySource::Jwks(_) => {
                let set: JwkSet = serde_json::from_slice(bytes)
                    .map_err(|e| invalid(format!("not a JWKS: {e}")))?;
                let mut keys = Vec::new();
                for jwk in &set.keys {
                    if matches!(jwk.algorithm, AlgorithmParameters::OctetKeyPair(_)) {
                        continue;
                    }
                    let key = match DecodingKey::from_jwk(jwk) {
                        Ok(k) => k,
                        Err(e) => {
                            tracing::warn!(kid = ?jwk.common.key_id, error = %e, "jwks key ignored");
                            continue;
                        }
                    };
                    let algorithms = match jwk
                        .common
                        .key_algorithm
                        .and_then(|a| serde_json::to_value(a).ok())
                        .and_then(|v| v.as_str().and_then(|s| s.parse::<Algorithm>().ok()))
                    {
                        Some(a) if family_algorithms(&key).contains(&a) => vec![a],
                        Some(_) => continue,
                        None => family_algorithms(&key),
                    };
                    keys.push(Key {
                        kid: jwk.common.key_id.clone(),
                        key,
                        algorithms,
                    });
                }
                if keys.is_empty() {
                    return Err(invalid("the JWKS holds no usable key".into()));
                }
                Ok(KeySet { keys, by_kid: true })
            }
        }
    }

    fn key_for(&self, kid: Option<&str>) -> Option<&Key> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .or_else(|| (!self.by_kid && self.keys.len() == 1).then(|| &self.keys[0])),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
    }
}

/// Verifies tokens against the current keys.
pub struct Verifier {
    config: JwtConfig,
    keys: RwLock<Arc<KeySet>>,
}

impl Verifier {
    pub fn new(config: JwtConfig, keys: KeySet) -> Self {
        Verifier {
            config,
            keys: RwLock::new(Arc::new(keys)),
        }
    }

    pub fn config(&self) -> &JwtConfig {
        &self.config
    }

    /// Installs keys read again from the file.
    pub fn replace(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }

    /// Verifies the signature and the standard claims, then reads the grants.
    pub fn verify(&self, token: &str) -> Result<Grant, Denied> {
        use jsonwebtoken::errors::ErrorKind as K;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Denied::unauthorized(format!("not a JWT: {e}")))?;
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let key = keys.key_for(header.kid.as_deref()).ok_or_else(|| {
            Denied::unauthorized(match &header.kid {
                Some(kid) => format!("no verification key has the token's kid `{kid}`"),
                None => "the token has no kid and the JWKS holds several keys".into(),
            })
        })?;
        if !key.algorithms.contains(&header.alg) {
            return Err(Denied::unauthorized(format!(
                "algorithm {:?} is not accepted with this key (accepted: {:?})",
                header.alg, key.algorithms
            )));
        }
        let mut v = Validation::new(header.alg);
        v.algorithms = key.algorithms.clone();
        v.leeway = self.config.leeway.as_secs();
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(iss) = &self.config.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        // without --jwt-audience the audience is not checked (jsonwebtoken's default refuses
        // every token that carries `aud`, as most identity providers' tokens do)
        v.validate_aud = self.config.audience.is_some();
        if let Some(aud) = &self.config.audience {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v).map_err(|e| match e
                .kind()
            {
                K::ExpiredSignature => Denied::expired("the token expired"),
                K::InvalidSignature => {
                    Denied::unauthorized("the token's signature does not verify")
                }
                K::ImmatureSignature => Denied::unauthorized("the token is not valid yet (nbf)"),
                K::InvalidAudience => Denied::unauthorized(
                    "the token's audience (aud) is not the one configured (--jwt-audience)",
                ),
                K::InvalidIssuer => Denied::unauthorized(
                    "the token's issuer (iss) is not the one configured (--jwt-issuer)",
                ),
                K::MissingRequiredClaim(c) => {
                    Denied::unauthorized(format!("the token has no `{c}` claim"))
                }
                _ => Denied::unauthorized(format!("invalid token: {e}")),
            })?;
        Grant::from_claims(&data.claims, &self.config.claim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn verifier(audience: Option<&str>) -> Verifier {
        let config = JwtConfig {
            keys: KeySource::Secret("unused".into()),
            issuer: None,
            audience: audience.map(str::to_string),
            claim: "livetable".into(),
            leeway: std::time::Duration::from_secs(5),
        };
        let keys =
            KeySet::parse(&config.keys, b"a-secret-of-the-test-of-32-bytes-at-least").unwrap();
        Verifier::new(config, keys)
    }

    fn token(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"a-secret-of-the-test-of-32-bytes-at-least"),
        )
        .unwrap()
    }

    #[test]
    fn the_audience_is_checked_only_when_configured() {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let grants = json!({"tables": ["odds"]});
        let with_aud = token(json!({"exp": exp, "aud": "my-api", "livetable": grants}));
        let without = token(json!({"exp": exp, "livetable": grants}));
        // not configured: a token from an identity provider (with `aud`) is accepted, as one
        // without
        verifier(None).verify(&with_aud).unwrap();
        verifier(None).verify(&without).unwrap();
        // configured: it must be there and match
        verifier(Some("my-api")).verify(&with_aud).unwrap();
        let e = verifier(Some("other")).verify(&with_aud).unwrap_err();
        assert!(e.reason.contains("audience"), "{}", e.reason);
        let e = verifier(Some("my-api")).verify(&without).unwrap_err();
        assert!(e.reason.contains("`aud`"), "{}", e.reason);
    }
}

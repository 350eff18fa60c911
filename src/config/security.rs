//! Validation of the settings that expose livetable: authentication, allowed origins, TLS, the
//! admin listener and the limits on connections and messages (documented in the README, "Deploying on the internet").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{invalid, Args, ConfigError};

/// How clients authenticate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AuthConfig {
    /// Anyone who reaches the port reads every table.
    #[default]
    None,
    Jwt(JwtConfig),
}

/// Where the token verification keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// HS256: the file's bytes (a trailing newline removed).
    Secret(PathBuf),
    /// RS256 or ES256: a PEM public key.
    PublicKey(PathBuf),
    /// RS256/ES256 keys by `kid`.
    Jwks(PathBuf),
}

impl KeySource {
    pub fn path(&self) -> &std::path::Path {
        match self {
            KeySource::Secret(p) | KeySource::PublicKey(p) | KeySource::Jwks(p) => p,
        }
    }
}

/// `--auth jwt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    pub keys: KeySource,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim with livetable's grants.
    pub claim: String,
    pub leeway: Duration,
}

/// Which browser origins may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins {
    /// `*`: any origin.
    pub any: bool,
    /// Exact origins (`scheme://host[:port]`, lowercase), besides the same origin.
    pub list: Vec<String>,
}

/// A certificate chain and its key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Limits that bound what clients can take (connections, time, messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// 0: no limit.
    pub max_connections_per_ip: usize,
    pub max_subscriptions: usize,
    pub max_messages_per_sec: u32,
    pub max_frame_bytes: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// Copies of tables for one client at once (0: no limit).
    pub max_table_copies: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections_per_ip: 1000,
            max_subscriptions: 64,
            max_messages_per_sec: 50,
            max_frame_bytes: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 512,
            max_table_copies: 8,
        }
    }
}

/// The validated exposure settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SecurityConfig {
    pub auth: AuthConfig,
    pub origins: Origins,
    pub tls: Option<TlsFiles>,
    pub admin_listen: Option<SocketAddr>,
    pub limits: Limits,
}

impl SecurityConfig {
    pub(super) fn from_args(a: &Args) -> Result<Self, ConfigError> {
        let auth = match a.auth.as_deref() {
            None | Some("none") => {
                for (set, name) in [
                    (a.jwt_secret_file.is_some(), "jwt-secret-file"),
                    (a.jwt_public_key_file.is_some(), "jwt-public-key-file"),
                    (a.jwt_jwks_file.is_some(), "jwt-jwks-file"),
                ] {
                    if set {
                        return Err(invalid(name, "is only used with --auth jwt"));
                    }
                }
                AuthConfig::None
            }
            Some("jwt") => {
                let mut sources = Vec::new();
                if let Some(p) = &a.jwt_secret_file {
                    sources.push(KeySource::Secret(p.clone()));
                }
                if let Some(p) = &a.jwt_public_key_file {
                    sources.push(KeySource::PublicKey(p.clone()));
                }
                if let Some(p) = &a.jwt_jwks_file {
                    sources.push(KeySource::Jwks(p.clone()));
                }
                if sources.len() != 1 {
                    return Err(invalid(
                        "auth",
                        "`jwt` needs exactly one of --jwt-secret-file, --jwt-public-key-file, --jwt-jwks-file",
                    ));
                }
                let claim = a.jwt_claim.clone().unwrap_or_else(|| "livetable".into());
                if claim.trim().is_empty() {
                    return Err(invalid("jwt-claim", "must not be empty"));
                }
                let leeway = a.jwt_leeway_secs.unwrap_or(5);
                if leeway > 300 {
                    return Err(invalid("jwt-leeway-secs", "must be at most 300"));
                }
                AuthConfig::Jwt(JwtConfig {
                    keys: sources.remove(0),
                    issuer: a.jwt_issuer.clone().filter(|s| !s.is_empty()),
                    audience: a.jwt_audience.clone().filter(|s| !s.is_empty()),
                    claim,
                    leeway: Duration::from_secs(leeway),
                })
            }
            Some(other) => {
                return Err(invalid("auth", format!("`{other}` is not `none` or `jwt`")))
            }
        };
        let origins = parse_origins(a.allowed_origins.as_deref().unwrap_or_default())?;
        let tls = match (&a.tls_cert, &a.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (Some(_), None) => return Err(invalid("tls-key", "--tls-cert needs --tls-key")),
            (None, Some(_)) => return Err(invalid("tls-cert", "--tls-key needs --tls-cert")),
        };
        let admin_listen = match a.admin_listen.as_deref() {
            None | Some("") => None,
            Some(text) => Some(text.parse().map_err(|e| {
                invalid(
                    "admin-listen",
                    format!("`{text}` is not an address like 127.0.0.1:9090: {e}"),
                )
            })?),
        };
        let d = Limits::default();
        let secs = |v: Option<u64>, default: Duration, name: &'static str| {
            let s = v.unwrap_or(default.as_secs());
            if !(1..=86_400).contains(&s) {
                return Err(invalid(name, "must be between 1 and 86400"));
            }
            Ok(Duration::from_secs(s))
        };
        let limits = Limits {
            max_connections_per_ip: a.max_connections_per_ip.unwrap_or(d.max_connections_per_ip),
            max_subscriptions: a.max_subscriptions.unwrap_or(d.max_subscriptions),
            max_messages_per_sec: a.max_messages_per_sec.unwrap_or(d.max_messages_per_sec),
            max_frame_bytes: a.max_frame_bytes.unwrap_or(d.max_frame_bytes),
            handshake_timeout: secs(
                a.handshake_timeout_secs,
                d.handshake_timeout,
                "handshake-timeout-secs",
            )?,
            idle_timeout: secs(a.idle_timeout_secs, d.idle_timeout, "idle-timeout-secs")?,
            request_timeout: secs(
                a.request_timeout_secs,
                d.request_timeout,
                "request-timeout-secs",
            )?,
            max_concurrent_requests: a
                .max_concurrent_requests
                .unwrap_or(d.max_concurrent_requests),
            max_table_copies: a.max_table_copies.unwrap_or(d.max_table_copies),
        };
        if limits.max_subscriptions == 0 {
            return Err(invalid("max-subscriptions", "must be at least 1"));
        }
        if !(1..=100_000).contains(&limits.max_messages_per_sec) {
            return Err(invalid(
                "max-messages-per-sec",
                "must be between 1 and 100000",
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&limits.max_frame_bytes) {
            return Err(invalid(
                "max-frame-bytes",
                "must be between 1024 and 67108864",
            ));
        }
        if limits.max_concurrent_requests == 0 {
            return Err(invalid("max-concurrent-requests", "must be at least 1"));
        }
        Ok(SecurityConfig {
            auth,
            origins,
            tls,
            admin_listen,
            limits,
        })
    }
}

/// `--allowed-origins`: `*`, or comma-separated `scheme://host[:port]`.
pub fn parse_origins(text: &str) -> Result<Origins, ConfigError> {
    let mut o = Origins::default();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if entry == "*" {
            o.any = true;
            continue;
        }
        let lower = entry.trim_end_matches('/').to_ascii_lowercase();
        let valid = lower == "null"
            || lower.split_once("://").is_some_and(|(scheme, host)| {
                !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                    && !host.is_empty()
                    && !host.contains('/')
            });
        if !valid {
            return Err(invalid(
                "allowed-origins",
                format!("`{entry}` is not `*` or an origin like https://app.example.com"),
            ));
        }
        o.list.push(lower);
    }
    Ok(o)
}

/// Whether the address is only reachable from this machine.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

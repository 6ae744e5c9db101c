//! Bearer tokens and roles, as a tower layer in front of every gRPC service.
//!
//! The token file (`--auth-tokens`) has one `ROLE NAME SECRET` per line, `#` comments; SECRET
//! is the token itself or `sha256:HEX` of it, so the file need not hold secrets. A presented
//! token is hashed and compared with every entry in constant time. Health stays open (load
//! balancers, probes); every other call needs a valid token, and the role decides the rest:
//!
//! | role | may |
//! |---|---|
//! | `admin` | everything (also cancel anyone's job, start a job that downloads its dataset) |
//! | `train` | StartTraining, CancelJob of its own jobs, and all that `infer` may |
//! | `infer` | InferenceService (not ImportModel, ExportModel), GetJob, ListJobs, WatchJob, ListCheckpoints, ListEpochs, reflection |
//!
//! The layer puts the [`Caller`] into the request's extensions for the handlers (who started
//! a job; whether it may cancel one). Tokens are never logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use crate::names::Named;
use anyhow::{anyhow, bail, Context as _, Result};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::codegen::http;
use tonic::Status;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    strum::Display,
    strum::EnumIter,
)]
#[strum(serialize_all = "lowercase", parse_err_ty = String, parse_err_fn = unknown_role)]
pub enum Role {
    Admin,
    Train,
    Infer,
}

fn unknown_role(name: &str) -> String {
    crate::names::unknown::<Role>("role", name)
}

/// Who made a request. Without `--auth-tokens` there is no caller (everything is allowed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The caller a request carries, if the server checks tokens.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Caller> {
        request.extensions().get::<Caller>()
    }
}

/// May `caller` do what needs `role` (admin may do anything)? Without auth, yes.
pub fn require(caller: Option<&Caller>, role: Role, what: &str) -> Result<(), Status> {
    match caller {
        Some(c) if c.role != Role::Admin && c.role != role => {
            Err(Status::permission_denied(format!(
                "{what} needs role {} or admin; the token '{}' has role {}",
                role.name(),
                c.name,
                c.role.name()
            )))
        }
        _ => Ok(()),
    }
}

struct Entry {
    caller: Caller,
    digest: [u8; 32],
}

/// The parsed token file.
pub struct TokenTable {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names and roles only: never the secrets or their digests.
        f.debug_list()
            .entries(self.entries.iter().map(|e| (&e.caller.name, e.caller.role)))
            .finish()
    }
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl TokenTable {
    /// Parses a token file; errors name the line (never its secret).
    pub fn parse(text: &str) -> Result<Self> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [role, name, secret] = fields[..] else {
                bail!(
                    "line {n}: expected `ROLE NAME SECRET`, found {} fields",
                    fields.len()
                );
            };
            let role: Role = role.parse().map_err(|e| anyhow!("line {n}: {e}"))?;
            let digest = match secret.strip_prefix("sha256:") {
                Some(hex) => parse_hex32(hex)
                    .with_context(|| format!("line {n}: sha256: needs 64 hex digits"))?,
                None if secret.len() < 16 => {
                    bail!("line {n}: the token of '{name}' is shorter than 16 characters")
                }
                None => Sha256::digest(secret.as_bytes()).into(),
            };
            if entries.iter().any(|e| e.caller.name == name) {
                bail!("line {n}: the name '{name}' is used twice");
            }
            if entries.iter().any(|e| e.digest == digest) {
                bail!("line {n}: '{name}' has the same token as another entry");
            }
            entries.push(Entry {
                caller: Caller {
                    name: name.to_string(),
                    role,
                },
                digest,
            });
        }
        if entries.is_empty() {
            bail!("no tokens in the file");
        }
        Ok(Self { entries })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller a token belongs to. Every entry is compared, in constant time.
    pub fn lookup(&self, token: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for e in &self.entries {
            if bool::from(e.digest.ct_eq(&digest)) {
                found = Some(e.caller.clone());
            }
        }
        found
    }
}

/// The token table in force, reloadable.
#[derive(Clone)]
pub struct Tokens {
    path: PathBuf,
    table: Arc<RwLock<Arc<TokenTable>>>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            table: Arc::new(RwLock::new(Arc::new(TokenTable::load(path)?))),
        })
    }

    /// Reads the file again; a bad file keeps the tokens in force (and says why).
    pub fn reload(&self) -> Result<usize> {
        let table = TokenTable::load(&self.path)?;
        let n = table.len();
        *self.table.write().expect("token table") = Arc::new(table);
        Ok(n)
    }

    fn current(&self) -> Arc<TokenTable> {
        self.table.read().expect("token table").clone()
    }
}

/// What a gRPC method needs from its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Nothing: health checks (load balancers, probes).
    Open,
    /// A valid token of any role.
    AnyToken,
    /// A token of this role or a higher one, for the named call.
    Role(Role, &'static str),
}

fn needs(path: &str) -> Need {
    if path.starts_with("/grpc.health.v1.Health/") {
        return Need::Open;
    }
    match path {
        "/tlb.v1.TrainingService/StartTraining" => Need::Role(Role::Train, "StartTraining"),
        "/tlb.v1.TrainingService/CancelJob" => Need::Role(Role::Train, "CancelJob"),
        "/tlb.v1.SearchService/StartSearch" => Need::Role(Role::Train, "StartSearch"),
        "/tlb.v1.SearchService/CancelSearch" => Need::Role(Role::Train, "CancelSearch"),
        "/tlb.v1.InferenceService/ImportModel" => Need::Role(Role::Train, "ImportModel"),
        "/tlb.v1.InferenceService/ExportModel" => Need::Role(Role::Admin, "ExportModel"),
        "/tlb.v1.DatasetService/UploadDataset" => Need::Role(Role::Train, "UploadDataset"),
        "/tlb.v1.DatasetService/DeleteDataset" => Need::Role(Role::Train, "DeleteDataset"),
        _ => Need::AnyToken,
    }
}

/// Checks a request's bearer token against `tokens`.
fn authorize<B>(tokens: &Tokens, req: &http::Request<B>) -> Result<Option<Caller>, Status> {
    let need = needs(req.uri().path());
    if need == Need::Open {
        return Ok(None);
    }
    let caller = identify(tokens, req.headers())?;
    if let Need::Role(role, what) = need {
        require(Some(&caller), role, what)?;
    }
    Ok(Some(caller))
}

/// The caller whose bearer token the headers carry (the HTTP face's `whoami` asks too).
pub fn identify(tokens: &Tokens, headers: &http::HeaderMap) -> Result<Caller, Status> {
    let header = headers.get(http::header::AUTHORIZATION).ok_or_else(|| {
        Status::unauthenticated(
            "no token: send the header `authorization: Bearer TOKEN` (tlb --token, grpcurl \
                 -H 'authorization: Bearer TOKEN')",
        )
    })?;
    let token = header
        .to_str()
        .ok()
        // The scheme is case-insensitive (RFC 7235): `bearer x` is `Bearer x`.
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer TOKEN`"))?;
    tokens
        .current()
        .lookup(token)
        .ok_or_else(|| Status::unauthenticated("unknown token"))
}

/// The tower layer: `None` tokens lets everything through.
#[derive(Clone)]
pub struct AuthLayer {
    pub tokens: Option<Tokens>,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Tokens>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Auth<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        if let Some(tokens) = &self.tokens {
            match authorize(tokens, &req) {
                Ok(Some(caller)) => {
                    tracing::debug!(caller = %caller.name, "authenticated");
                    req.extensions_mut().insert(caller);
                }
                Ok(None) => {}
                Err(status) => {
                    let response = status.into_http::<ResBody>();
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# ops\nadmin root  0123456789abcdef-root\n\
        train alice sha256:d7f8cbd0b4b2b2f5b1c48b1e0b4c6bd5a3bb7ba6e5d8c1dd8c83bdbb57fc0bd5\n\
        infer viewer viewer-token-0123456789 # dashboards\n";

    #[test]
    fn tokens_and_hashes_resolve_to_their_callers() {
        let hashed = format!(
            "train alice sha256:{}",
            Sha256::digest(b"alice-secret-token-42")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let text = FILE.replace(FILE.lines().nth(2).unwrap(), &hashed);
        let t = TokenTable::parse(&text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup("0123456789abcdef-root").unwrap().role, Role::Admin);
        let alice = t.lookup("alice-secret-token-42").unwrap();
        assert_eq!((alice.name.as_str(), alice.role), ("alice", Role::Train));
        assert_eq!(
            t.lookup("viewer-token-0123456789").unwrap().role,
            Role::Infer
        );
        assert!(t.lookup("0123456789abcdef-roo").is_none());
        assert!(!format!("{t:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, FILE).unwrap();
        let tokens = Tokens::load(&path).unwrap();
        let call = |header: &str| {
            let req = http::Request::builder()
                .uri("/tlb.v1.InferenceService/Classify")
                .header(http::header::AUTHORIZATION, header)
                .body(())
                .unwrap();
            authorize(&tokens, &req).map(|c| c.map(|c| c.name))
        };
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let who = call(&format!("{scheme} viewer-token-0123456789"));
            assert_eq!(who.unwrap().as_deref(), Some("viewer"), "{scheme}");
        }
        for bad in [
            "Basic viewer-token-0123456789",
            "Bearerviewer-token-0123456789",
            "viewer",
        ] {
            let status = call(bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad}");
        }
    }

    #[test]
    fn bad_files_name_the_line_and_not_the_secret() {
        for (text, needle) in [
            ("admin root\n", "line 1: expected"),
            ("boss root 0123456789abcdef-root\n", "unknown role 'boss'"),
            ("admin root short\n", "shorter than 16"),
            ("admin root sha256:abc\n", "64 hex digits"),
            ("# nothing\n", "no tokens"),
            (
                "admin a 0123456789abcdef-root\nadmin a 0123456789abcdef-two\n",
                "used twice",
            ),
        ] {
            let err = format!("{:#}", TokenTable::parse(text).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains("0123456789abcdef"), "{err}");
        }
    }

    #[test]
    fn roles_grant_what_the_table_says() {
        let caller = |role| Caller {
            name: "x".into(),
            role,
        };
        assert!(require(Some(&caller(Role::Admin)), Role::Train, "StartTraining").is_ok());
        assert!(require(Some(&caller(Role::Train)), Role::Train, "StartTraining").is_ok());
        let denied = require(Some(&caller(Role::Infer)), Role::Train, "StartTraining");
        let status = denied.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("needs role train or admin"));
        assert!(require(None, Role::Admin, "anything").is_ok());
        assert_eq!(needs("/grpc.health.v1.Health/Check"), Need::Open);
        assert_eq!(needs("/tlb.v1.InferenceService/Classify"), Need::AnyToken);
        assert_eq!(needs("/tlb.v1.SearchService/GetSearch"), Need::AnyToken);
        assert_eq!(
            needs("/tlb.v1.SearchService/StartSearch"),
            Need::Role(Role::Train, "StartSearch")
        );
        assert_eq!(
            needs("/tlb.v1.TrainingService/CancelJob"),
            Need::Role(Role::Train, "CancelJob")
        );
        assert_eq!(
            needs("/tlb.v1.InferenceService/ImportModel"),
            Need::Role(Role::Train, "ImportModel")
        );
        assert_eq!(
            needs("/tlb.v1.InferenceService/ExportModel"),
            Need::Role(Role::Admin, "ExportModel")
        );
    }
}

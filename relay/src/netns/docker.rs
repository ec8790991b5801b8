//! Just enough of the Docker Engine API to find a container's process.
//!
//! One request, `GET /containers/<name|id>/json`, over the daemon's unix
//! socket with hyper's HTTP/1 client. The path is unversioned so the daemon
//! answers in its own API version: the four fields read here (`Id`, `Name`,
//! `State.Pid`, `State.Running`) have not changed since API 1.12, while a
//! pinned version can fall below a newer daemon's minimum.
//!
//! Why not the `bollard` crate: it would bring a second HTTP stack
//! configuration, serde derive models of the whole API, and a much larger
//! dependency tree for one GET; hyper is already here for `/metrics`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use super::NetnsError;

/// Where dockerd listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// A whole request (connect, send, read) must finish within this; a daemon
/// that accepts but never answers is as unreachable as one that is down.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// An inspect response is a few KiB; anything past this is not one.
const MAX_BODY: usize = 4 << 20;

/// A client for one Docker daemon, by its socket path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerClient {
    socket: PathBuf,
}

impl Default for DockerClient {
    fn default() -> Self {
        Self::new(DEFAULT_SOCKET)
    }
}

/// What `docker inspect` says about a container, as far as relay cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerState {
    /// The full 64-hex-digit id.
    pub id: String,
    /// The name without Docker's leading `/`.
    pub name: String,
    /// The container's init process on the host (0 when not running).
    pub pid: u32,
    pub running: bool,
    /// `created`, `running`, `paused`, `restarting`, `exited`, `dead`.
    pub status: String,
}

impl DockerClient {
    /// A client for the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Inspect container `name` (a name or an id, as `docker inspect` takes).
    ///
    /// `name` must already be checked against Docker's name grammar (as
    /// [`super::Target`] parsing does): it goes into the URL path verbatim.
    pub async fn inspect(&self, name: &str) -> Result<ContainerState, NetnsError> {
        let unreachable = |detail: String| NetnsError::DockerUnreachable {
            container: name.to_string(),
            socket: self.socket.clone(),
            detail,
        };
        let (status, body) = tokio::time::timeout(API_TIMEOUT, self.get(name))
            .await
            .map_err(|_| unreachable(format!("no answer within {API_TIMEOUT:?}")))?
            .map_err(unreachable)?;
        match status {
            StatusCode::OK => parse_inspect(name, &body),
            StatusCode::NOT_FOUND => Err(NetnsError::UnknownContainer {
                container: name.to_string(),
            }),
            other => Err(NetnsError::DockerApi {
                container: name.to_string(),
                status: other.as_u16(),
                message: api_message(&body),
            }),
        }
    }

    /// One GET; errors are the transport's, described for a person.
    async fn get(&self, name: &str) -> Result<(StatusCode, Bytes), String> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    format!("{e} (run as root or as a member of the docker group)")
                }
                _ => e.to_string(),
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        // `docker inspect` prints names as `/web`; the URL wants `web`.
        let name = name.trim_start_matches('/');
        let request = Request::get(format!("/containers/{name}/json"))
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("building the request: {e}"))?;
        let exchange = async move {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("sending GET /containers/{name}/json: {e}"))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            // `sender` drops here, which lets `conn` finish.
            Ok::<_, String>((status, body))
        };
        let (answer, _closed) = tokio::join!(exchange, conn);
        answer
    }
}

/// Read the fields relay needs from an inspect body.
pub(crate) fn parse_inspect(name: &str, body: &[u8]) -> Result<ContainerState, NetnsError> {
    let bad = |what: &str| NetnsError::DockerApi {
        container: name.to_string(),
        status: 200,
        message: format!("unexpected inspect answer: {what}"),
    };
    let json: Value = serde_json::from_slice(body).map_err(|e| bad(&e.to_string()))?;
    let text = |field: &Value, what: &str| {
        field
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| bad(&format!("no {what}")))
    };
    let state = &json["State"];
    let pid = state["Pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| bad("no State.Pid"))?;
    Ok(ContainerState {
        id: text(&json["Id"], "Id")?,
        name: text(&json["Name"], "Name")?
            .trim_start_matches('/')
            .to_string(),
        pid,
        running: state["Running"]
            .as_bool()
            .ok_or_else(|| bad("no State.Running"))?,
        status: state["Status"].as_str().unwrap_or("unknown").to_string(),
    })
}

/// The daemon's `{"message": "..."}`, or the body itself when it is not one.
fn api_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNNING: &str =
        r#"{"Id":"4f1c2a9e","Name":"/web","State":{"Status":"running","Running":true,"Pid":4242}}"#;
    const EXITED: &str =
        r#"{"Id":"4f1c2a9e","Name":"/web","State":{"Status":"exited","Running":false,"Pid":0}}"#;

    #[test]
    fn inspect_fields_are_read_and_the_slash_dropped() {
        let state = parse_inspect("web", RUNNING.as_bytes()).expect("a valid inspect body");
        assert_eq!(
            state,
            ContainerState {
                id: "4f1c2a9e".into(),
                name: "web".into(),
                pid: 4242,
                running: true,
                status: "running".into(),
            }
        );
        let stopped = parse_inspect("web", EXITED.as_bytes()).expect("a valid inspect body");
        assert!(!stopped.running);
        assert_eq!(stopped.status, "exited");
    }

    #[test]
    fn malformed_inspect_answers_name_the_container() {
        for body in ["", "[]", r#"{"Id":"x","Name":"/web","State":{}}"#] {
            let err = parse_inspect("web", body.as_bytes()).expect_err("a malformed body");
            let msg = err.to_string();
            assert!(
                msg.starts_with("container:web: "),
                "should name the container: {msg}"
            );
            assert!(msg.contains("unexpected inspect answer"), "{msg}");
        }
    }

    #[test]
    fn api_messages_come_from_the_json_or_the_raw_body() {
        assert_eq!(api_message(br#"{"message":"boom"}"#), "boom");
        assert_eq!(api_message(b"plain text\n"), "plain text");
    }
}

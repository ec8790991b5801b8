//! Docker discovery: the Engine API's container listing and events stream,
//! through `bollard`, turned into [`Update`]s.
//!
//! A connection is: negotiate the API version (dockerd refuses a client
//! newer than itself), list the running containers and inspect each (the
//! listing lacks the pid), then follow `GET /events` (container start, die,
//! destroy, rename; network connect, disconnect) from a second before the
//! listing, so nothing that happens in between is missed (a replayed event
//! is harmless: every start is checked against a fresh inspect). When the
//! socket is missing, the daemon refuses, or the stream ends (dockerd
//! restarting), [`Update::Down`] is sent once and the connection is tried
//! again with back-off; the next success sends [`Update::Up`] and a new
//! full listing, from which the fleet reconciles. Nothing here is fatal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures_util::StreamExt;
use tokio::sync::watch;

use super::{Container, Failure, Network, Source, Update, Updates};

/// Where dockerd listens unless told otherwise.
pub use crate::netns::DEFAULT_SOCKET;

/// Each API request (not the events stream) must be answered within this.
const REQUEST_TIMEOUT_SECS: u64 = 10;

/// Container events that change what is observed.
const CONTAINER_EVENTS: [&str; 4] = ["start", "die", "destroy", "rename"];
/// Network events that change a container's interfaces.
const NETWORK_EVENTS: [&str; 2] = ["connect", "disconnect"];

/// Follows the daemon on `socket` until `stop` turns true or the fleet is gone.
pub async fn watch(socket: PathBuf, updates: Updates, stop: watch::Receiver<bool>) {
    let (at, to) = (&socket, &updates);
    super::keep_following("Docker", at, to, stop, || session(at, to)).await
}

/// One connection: list, then follow the events stream until it breaks.
async fn session(socket: &Path, updates: &Updates) -> Result<(), Failure> {
    let docker = connect(socket).await.map_err(Failure::before)?;
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(1);
    let listed = list(&docker).await.map_err(Failure::before)?;
    tracing::info!(socket = %socket.display(), containers = listed.len(), "Docker discovery up: listed the running containers");
    if updates.listed(listed).await.is_err() {
        return Ok(());
    }
    follow(&docker, since, updates)
        .await
        .map_err(Failure::after)
}

/// A client on `socket`, at the API version the daemon speaks.
async fn connect(socket: &Path) -> Result<Docker, String> {
    let path = socket
        .to_str()
        .ok_or_else(|| format!("socket path {} is not UTF-8", socket.display()))?;
    if !socket.exists() {
        return Err(format!("{path} does not exist (is dockerd running?)"));
    }
    let docker =
        Docker::connect_with_socket(path, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
            .map_err(|e| format!("{path}: {e}"))?;
    docker
        .negotiate_version()
        .await
        .map_err(|e| format!("{path}: asking the API version: {}", describe(&e)))
}

/// Every running container, inspected.
async fn list(docker: &Docker) -> Result<Vec<Container>, String> {
    let summaries = docker
        .list_containers(Some(ListContainersOptions {
            all: false,
            ..Default::default()
        }))
        .await
        .map_err(|e| format!("listing containers: {}", describe(&e)))?;
    let mut containers = Vec::with_capacity(summaries.len());
    for id in summaries.into_iter().filter_map(|s| s.id) {
        // None: it stopped between the listing and the inspect.
        if let Some(container) = inspect(docker, &id).await? {
            containers.push(container);
        }
    }
    Ok(containers)
}

/// The container `id` if it runs; `Ok(None)` when it does not (or no
/// longer exists); `Err` when the daemon could not be asked.
async fn inspect(docker: &Docker, id: &str) -> Result<Option<Container>, String> {
    match docker.inspect_container(id, None).await {
        Ok(response) => Ok(container_of(response).map(|mut c| {
            c.netns = super::netns_inode(c.pid);
            c
        })),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(format!("inspecting container {id}: {}", describe(&e))),
    }
}

/// What the events stream says, as updates, until it breaks.
async fn follow(docker: &Docker, since: u64, updates: &Updates) -> Result<(), String> {
    let mut filters = HashMap::new();
    filters.insert(
        "type".to_string(),
        vec!["container".to_string(), "network".to_string()],
    );
    filters.insert(
        "event".to_string(),
        CONTAINER_EVENTS
            .iter()
            .chain(&NETWORK_EVENTS)
            .map(|e| e.to_string())
            .collect(),
    );
    let mut events = docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        until: None,
        filters: Some(filters),
    }));
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| format!("the events stream broke: {}", describe(&e)))?;
        let Some(update) = update_of(docker, &event).await? else {
            continue;
        };
        if updates.send(update).await.is_err() {
            return Ok(());
        }
    }
    Err("the events stream ended (dockerd stopped or restarted)".to_string())
}

/// What one event means for the fleet, if anything.
async fn update_of(docker: &Docker, event: &EventMessage) -> Result<Option<Update>, String> {
    let action = event.action.as_deref().unwrap_or("");
    let actor = event.actor.as_ref();
    let since = event
        .time_nano
        .and_then(|n| u64::try_from(n).ok())
        .map(|n| UNIX_EPOCH + Duration::from_nanos(n));
    let (id, network) = match event.typ {
        Some(EventMessageTypeEnum::CONTAINER) => (actor.and_then(|a| a.id.clone()), false),
        // A network event's actor is the network; the container is an attribute.
        Some(EventMessageTypeEnum::NETWORK) => (
            actor
                .and_then(|a| a.attributes.as_ref())
                .and_then(|attrs| attrs.get("container").cloned()),
            true,
        ),
        _ => (None, false),
    };
    let Some(id) = id else {
        return Ok(None);
    };
    if !network && (action == "die" || action == "destroy") {
        return Ok(Some(Update::Stopped(id)));
    }
    Ok(Some(match inspect(docker, &id).await? {
        Some(container) if network => Update::Rewired(container),
        Some(container) => Update::Running { container, since },
        None => Update::Stopped(id),
    }))
}

/// A running container from an inspect answer; `None` when it does not run.
pub(crate) fn container_of(response: ContainerInspectResponse) -> Option<Container> {
    let state = response.state?;
    let pid = state
        .pid
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)?;
    if state.running != Some(true) {
        return None;
    }
    let config = response.config.unwrap_or_default();
    let mode = response
        .host_config
        .and_then(|h| h.network_mode)
        .unwrap_or_default();
    let id = response.id?;
    Some(Container {
        key: id.clone(),
        source: Source::Docker,
        id,
        name: response.name?.trim_start_matches('/').to_string(),
        image: config.image.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        pid,
        netns: 0,
        ns_path: None,
        network: Network::from_mode(&mode),
    })
}

/// bollard's error with its causes (a refused connection names the socket's problem).
fn describe(err: &bollard::errors::Error) -> String {
    crate::observe::Chain(err).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspect_json(json: &str) -> ContainerInspectResponse {
        serde_json::from_str(json).expect("a valid inspect answer")
    }

    #[test]
    fn a_running_container_is_read_from_its_inspect_answer() {
        let web = container_of(inspect_json(
            r#"{"Id":"4f1c","Name":"/web","State":{"Status":"running","Running":true,"Pid":4242},
                "Config":{"Image":"nginx:1.25","Labels":{"com.docker.compose.project":"shop"}},
                "HostConfig":{"NetworkMode":"bridge"}}"#,
        ))
        .expect("running");
        assert_eq!(web.name, "web");
        assert_eq!(web.id, "4f1c");
        assert_eq!(web.pid, 4242);
        assert_eq!(web.image, "nginx:1.25");
        assert_eq!(web.label("com.docker.compose.project"), "shop");
        assert_eq!(web.label("io.kubernetes.pod.name"), "");
        assert_eq!(web.network, Network::Own);
    }

    #[test]
    fn stopped_containers_and_network_modes() {
        let exited =
            r#"{"Id":"4f1c","Name":"/web","State":{"Status":"exited","Running":false,"Pid":0}}"#;
        assert_eq!(container_of(inspect_json(exited)), None);
        for (mode, network) in [
            ("host", Network::Host),
            ("none", Network::None),
            ("container:4f1c", Network::Shared),
            ("default", Network::Own),
            ("shop_default", Network::Own),
        ] {
            let json = format!(
                r#"{{"Id":"a","Name":"/a","State":{{"Status":"running","Running":true,"Pid":7}},"HostConfig":{{"NetworkMode":"{mode}"}}}}"#
            );
            assert_eq!(
                container_of(inspect_json(&json)).map(|c| c.network),
                Some(network),
                "{mode}"
            );
        }
    }
}

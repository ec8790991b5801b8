//! containerd discovery (Kubernetes nodes, `ctr`, nerdctl): containerd's
//! gRPC API on its unix socket, through tonic, turned into [`Update`]s.
//!
//! A connection is: subscribe to the events (task start and exit, task and
//! container delete, container update) first, so nothing that happens
//! during the listing is missed; then, in every configured containerd
//! namespace (`k8s.io`, where the CRI puts pods, and `default`, where `ctr`
//! and nerdctl do), list the containers and the tasks (pids) and send the
//! running ones as one listing; then follow the events. A start is checked
//! against a fresh `Tasks.Get` (a replayed event is harmless), an exit
//! counts only for the init process (an exec ending is not the container's
//! end). When the socket is missing, containerd refuses, or the stream
//! ends (containerd restarting), the common back-off loop
//! ([`super::keep_following`]) reports it and tries again; nothing here is
//! fatal.
//!
//! Names: a pod's sandbox is `<namespace>/<pod>` and its other containers
//! `<namespace>/<pod>/<container>` (from the labels the CRI sets), so the
//! pod, whose containers share one network namespace, is observed once
//! under its own name; any other container is its containerd id (`ctr run
//! ... web` names it `web`).

mod api;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_prost::ProstCodec;

use super::{Container, Failure, Network, Source, Update, Updates};

/// Where containerd listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
/// The namespaces listed unless told otherwise: the CRI's and `ctr`'s.
pub const DEFAULT_NAMESPACES: [&str; 2] = ["k8s.io", "default"];

/// Each request (not the events stream) must be answered within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Events read ahead of the fleet (a burst of starts).
const EVENTS_QUEUED: usize = 256;
/// The gRPC metadata key containerd reads the namespace from.
const NAMESPACE_HEADER: &str = "containerd-namespace";

/// The labels the CRI sets on a pod's containers.
const KIND: &str = "io.cri-containerd.kind";
const POD_NAME: &str = "io.kubernetes.pod.name";
const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// The event topics that change what runs.
const TOPICS: [&str; 5] = [
    "/tasks/start",
    "/tasks/exit",
    "/tasks/delete",
    "/containers/delete",
    "/containers/update",
];

/// Follows containerd on `socket` in `namespaces` until `stop` turns true
/// or the fleet is gone.
pub async fn watch(
    socket: PathBuf,
    namespaces: Vec<String>,
    updates: Updates,
    stop: watch::Receiver<bool>,
) {
    let (at, to, ns) = (&socket, &updates, &namespaces);
    super::keep_following("containerd", at, to, stop, || session(at, ns, to)).await
}

/// One connection: subscribe, list, then follow the events until they break.
async fn session(socket: &Path, namespaces: &[String], updates: &Updates) -> Result<(), Failure> {
    let mut client = Client::connect(socket).await.map_err(Failure::before)?;
    // containerd answers a subscription only with its first event, so the
    // stream is read on a task of its own (dropping the set ends it) while
    // the listing runs.
    let (events_tx, mut events) = mpsc::channel(EVENTS_QUEUED);
    let mut subscription = JoinSet::new();
    subscription.spawn(client.clone().subscribe(events_tx));
    tokio::task::yield_now().await;
    let mut listed = Vec::new();
    for namespace in namespaces {
        listed.extend(client.list(namespace).await.map_err(Failure::before)?);
    }
    tracing::info!(socket = %socket.display(), containers = listed.len(), namespaces = %namespaces.join(","), "containerd discovery up: listed the running containers");
    if updates.listed(listed).await.is_err() {
        return Ok(());
    }
    loop {
        let envelope = match events.recv().await {
            Some(Ok(envelope)) => envelope,
            Some(Err(reason)) => return Err(Failure::after(reason)),
            None => {
                return Err(Failure::after(
                    "the events stream ended (containerd stopped or restarted)".to_string(),
                ));
            }
        };
        if !namespaces.contains(&envelope.namespace) {
            continue;
        }
        let update = client.update_of(&envelope).await.map_err(Failure::after)?;
        if let Some(update) = update
            && updates.send(update).await.is_err()
        {
            return Ok(());
        }
    }
}

/// A gRPC client on containerd's socket (clones share the connection).
#[derive(Clone)]
struct Client {
    grpc: Grpc<Channel>,
}

impl Client {
    async fn connect(socket: &Path) -> Result<Self, String> {
        if !socket.exists() {
            return Err(format!(
                "{} does not exist (is containerd running? --containerd-socket names another)",
                socket.display()
            ));
        }
        let path = socket.to_path_buf();
        // The URI is a placeholder: every connection is to the socket.
        let channel = Endpoint::from_static("http://containerd")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .map_err(|e| format!("{}: {}", socket.display(), super::super::Chain(&e)))?;
        Ok(Client {
            grpc: Grpc::new(channel),
        })
    }

    /// One unary call in `namespace`.
    async fn call<Req, Resp>(
        &mut self,
        namespace: &str,
        path: &'static str,
        message: Req,
    ) -> Result<Resp, tonic::Status>
    where
        Req: Message + Send + Sync + 'static,
        Resp: Message + Default + Send + Sync + 'static,
    {
        let mut request = tonic::Request::new(message);
        let value = namespace
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("namespace is not valid ASCII"))?;
        request.metadata_mut().insert(NAMESPACE_HEADER, value);
        let call = async {
            self.grpc
                .ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            self.grpc
                .unary(
                    request,
                    PathAndQuery::from_static(path),
                    ProstCodec::default(),
                )
                .await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(response) => response.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "{path}: no answer within {}s",
                REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Every namespace's events on the topics that matter (no namespace
    /// header: all of them; each envelope says which), into `events` until
    /// the stream breaks (its last item says why) or the receiver is gone.
    async fn subscribe(mut self, events: mpsc::Sender<Result<api::Envelope, String>>) {
        let filters = TOPICS.iter().map(|t| format!("topic=={t:?}")).collect();
        let request = tonic::Request::new(api::SubscribeRequest { filters });
        let stream = async {
            self.grpc
                .ready()
                .await
                .map_err(|e| format!("subscribing to events: {e}"))?;
            self.grpc
                .server_streaming(
                    request,
                    PathAndQuery::from_static(api::EVENTS_SUBSCRIBE),
                    ProstCodec::default(),
                )
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| format!("subscribing to events: {}", describe(&s)))
        };
        let mut stream = match stream.await {
            Ok(stream) => stream,
            Err(reason) => {
                let _ = events.send(Err(reason)).await;
                return;
            }
        };
        loop {
            let item = match stream.message().await {
                Ok(Some(envelope)) => Ok(envelope),
                Ok(None) => return,
                Err(status) => Err(format!("the events stream broke: {}", describe(&status))),
            };
            let last = item.is_err();
            if events.send(item).await.is_err() || last {
                return;
            }
        }
    }

    /// The running containers of `namespace`.
    async fn list(&mut self, namespace: &str) -> Result<Vec<Container>, String> {
        let listed: api::ListContainersResponse = self
            .call(
                namespace,
                api::CONTAINERS_LIST,
                api::ListContainersRequest::default(),
            )
            .await
            .map_err(|s| {
                format!(
                    "listing containers in namespace {namespace}: {}",
                    describe(&s)
                )
            })?;
        let tasks: api::ListTasksResponse = self
            .call(namespace, api::TASKS_LIST, api::ListTasksRequest::default())
            .await
            .map_err(|s| format!("listing tasks in namespace {namespace}: {}", describe(&s)))?;
        Ok(running(namespace, listed.containers, &tasks.tasks))
    }

    /// The container `id` of `namespace` if its task runs.
    async fn running_one(
        &mut self,
        namespace: &str,
        id: &str,
    ) -> Result<Option<Container>, String> {
        let task: Result<api::GetTaskResponse, _> = self
            .call(
                namespace,
                api::TASKS_GET,
                api::GetTaskRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                },
            )
            .await;
        let process = match task {
            Ok(task) => task.process,
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => return Err(format!("asking for task {id}: {}", describe(&s))),
        };
        let Some(process) = process.filter(|p| p.status == api::STATUS_RUNNING && p.pid > 0) else {
            return Ok(None);
        };
        let got: Result<api::GetContainerResponse, _> = self
            .call(
                namespace,
                api::CONTAINERS_GET,
                api::GetContainerRequest { id: id.to_string() },
            )
            .await;
        match got {
            Ok(got) => Ok(got
                .container
                .map(|c| container_of(namespace, c, process.pid))),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(format!("asking for container {id}: {}", describe(&s))),
        }
    }

    /// What one event means for the fleet, if anything.
    async fn update_of(&mut self, envelope: &api::Envelope) -> Result<Option<Update>, String> {
        let Some(event) = &envelope.event else {
            return Ok(None);
        };
        let namespace = envelope.namespace.as_str();
        let bytes = event.value.as_slice();
        let gone = |id: &str| Ok(Some(Update::Stopped(key(namespace, id))));
        match envelope.topic.as_str() {
            "/tasks/start" => {
                let Ok(start) = api::TaskStart::decode(bytes) else {
                    return Ok(None);
                };
                let since = envelope.timestamp.as_ref().and_then(|t| {
                    let secs = u64::try_from(t.seconds).ok()?;
                    Some(UNIX_EPOCH + Duration::new(secs, u32::try_from(t.nanos).ok()?))
                });
                Ok(self
                    .running_one(namespace, &start.container_id)
                    .await?
                    .map(|container| Update::Running { container, since }))
            }
            "/tasks/exit" => match api::TaskExit::decode(bytes) {
                // An exec'd process ending is not the container's end.
                Ok(exit) if exit.id.is_empty() || exit.id == exit.container_id => {
                    gone(&exit.container_id)
                }
                _ => Ok(None),
            },
            "/tasks/delete" => match api::TaskDelete::decode(bytes) {
                Ok(delete) if delete.id.is_empty() || delete.id == delete.container_id => {
                    gone(&delete.container_id)
                }
                _ => Ok(None),
            },
            "/containers/delete" => match api::ContainerDelete::decode(bytes) {
                Ok(delete) => gone(&delete.id),
                Err(_) => Ok(None),
            },
            "/containers/update" => {
                let Ok(update) = api::ContainerUpdate::decode(bytes) else {
                    return Ok(None);
                };
                Ok(self
                    .running_one(namespace, &update.id)
                    .await?
                    .map(|container| Update::Running {
                        container,
                        since: None,
                    }))
            }
            _ => Ok(None),
        }
    }
}

/// The fleet's key of container `id` in `namespace`.
fn key(namespace: &str, id: &str) -> String {
    format!("containerd:{namespace}/{id}")
}

/// The containers whose init task runs, with its pid.
fn running(
    namespace: &str,
    containers: Vec<api::Container>,
    tasks: &[api::Process],
) -> Vec<Container> {
    let pids: HashMap<&str, u32> = tasks
        .iter()
        .filter(|t| t.status == api::STATUS_RUNNING && t.pid > 0)
        .map(|t| (t.container(), t.pid))
        .collect();
    containers
        .into_iter()
        .filter_map(|c| {
            let pid = *pids.get(c.id.as_str())?;
            Some(container_of(namespace, c, pid))
        })
        .collect()
}

/// A running container of `namespace` whose init process is `pid`.
fn container_of(namespace: &str, container: api::Container, pid: u32) -> Container {
    let labels: BTreeMap<String, String> = container.labels.into_iter().collect();
    let name = name_of(&container.id, &labels);
    Container {
        key: key(namespace, &container.id),
        source: Source::Containerd,
        id: container.id,
        name,
        image: container.image,
        labels,
        pid,
        netns: super::netns_inode(pid),
        ns_path: None,
        // Whose namespace it is, the fleet tells by the inode.
        network: Network::Own,
    }
}

/// `<namespace>/<pod>` for a pod's sandbox, `<namespace>/<pod>/<container>`
/// for its other containers, the id for anything else.
fn name_of(id: &str, labels: &BTreeMap<String, String>) -> String {
    let get = |k: &str| labels.get(k).map(String::as_str).unwrap_or("");
    let (pod, namespace) = (get(POD_NAME), get(POD_NAMESPACE));
    if pod.is_empty() {
        return id.to_string();
    }
    let pod = if namespace.is_empty() {
        pod.to_string()
    } else {
        format!("{namespace}/{pod}")
    };
    match (get(KIND), get(CONTAINER_NAME)) {
        ("sandbox", _) | (_, "") => pod,
        (_, container) => format!("{pod}/{container}"),
    }
}

/// Is this a pod's sandbox (the container whose namespace the pod's others join)?
pub fn is_sandbox(container: &Container) -> bool {
    container.label(KIND) == "sandbox"
}

/// tonic's status: its code and message.
fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn pods_are_named_by_namespace_and_pod_their_containers_below() {
        let sandbox = labels(&[
            (KIND, "sandbox"),
            (POD_NAME, "web-7d9f"),
            (POD_NAMESPACE, "shop"),
        ]);
        assert_eq!(name_of("a1b2", &sandbox), "shop/web-7d9f");
        let app = labels(&[
            (KIND, "container"),
            (POD_NAME, "web-7d9f"),
            (POD_NAMESPACE, "shop"),
            (CONTAINER_NAME, "nginx"),
        ]);
        assert_eq!(name_of("c3d4", &app), "shop/web-7d9f/nginx");
        assert_eq!(name_of("web", &labels(&[("app", "x")])), "web");
    }

    #[test]
    fn only_containers_with_a_running_init_task_are_listed() {
        let container = |id: &str| api::Container {
            id: id.to_string(),
            labels: HashMap::from([("app".to_string(), id.to_string())]),
            image: "docker.io/library/busybox:latest".to_string(),
        };
        let task = |container_id: &str, id: &str, pid: u32, status: i32| api::Process {
            container_id: container_id.to_string(),
            id: id.to_string(),
            pid,
            status,
        };
        let tasks = [
            // containerd 1.6 leaves container_id empty; 2.x fills it.
            task("", "web", 41, api::STATUS_RUNNING),
            task("db", "db", 42, api::STATUS_RUNNING),
            task("", "done", 43, 3),
        ];
        let listed = running(
            "default",
            vec![
                container("web"),
                container("db"),
                container("done"),
                container("new"),
            ],
            &tasks,
        );
        let got: Vec<(&str, &str, u32)> = listed
            .iter()
            .map(|c| (c.key.as_str(), c.name.as_str(), c.pid))
            .collect();
        assert_eq!(
            got,
            vec![
                ("containerd:default/web", "web", 41),
                ("containerd:default/db", "db", 42)
            ]
        );
        assert_eq!(listed[0].label("app"), "web");
        assert_eq!(listed[0].source, Source::Containerd);
    }

    #[test]
    fn events_decode_from_the_wire_as_containerd_encodes_them() {
        // TaskExit{container_id: "web", id: "web", pid: 41}, field by field.
        let mut wire = Vec::new();
        api::TaskExit {
            container_id: "web".into(),
            id: "web".into(),
            pid: 41,
        }
        .encode(&mut wire)
        .expect("encodes");
        assert_eq!(wire, b"\x0a\x03web\x12\x03web\x18\x29");
        // An unknown field (exit_status = 4) is skipped.
        wire.extend_from_slice(b"\x20\x01");
        let exit = api::TaskExit::decode(wire.as_slice()).expect("decodes");
        assert_eq!((exit.container_id.as_str(), exit.pid), ("web", 41));
    }
}

//! The part of containerd's gRPC API that discovery reads, declared with
//! prost's derive: the messages and fields of containerd's `api/` protos
//! (`services/containers/v1`, `services/tasks/v1`, `services/events/v1`,
//! `types/task`, `events`) that relay uses, with their field numbers, which
//! containerd 1.6 to 2.x keep. Fields not declared here are skipped when
//! decoding, as protobuf requires.
//!
//! Why not `containerd-client`: its build script compiles containerd's
//! whole API with `protoc` on every build of relay, which would make a C++
//! protobuf compiler a build dependency of a binary that reads eleven
//! messages.

use std::collections::HashMap;

/// `containerd.services.containers.v1.Containers`.
pub const CONTAINERS_LIST: &str = "/containerd.services.containers.v1.Containers/List";
pub const CONTAINERS_GET: &str = "/containerd.services.containers.v1.Containers/Get";
/// `containerd.services.tasks.v1.Tasks`.
pub const TASKS_LIST: &str = "/containerd.services.tasks.v1.Tasks/List";
pub const TASKS_GET: &str = "/containerd.services.tasks.v1.Tasks/Get";
/// `containerd.services.events.v1.Events` (a server stream of envelopes).
pub const EVENTS_SUBSCRIBE: &str = "/containerd.services.events.v1.Events/Subscribe";

/// `containerd.v1.types.Status.RUNNING`.
pub const STATUS_RUNNING: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListContainersRequest {
    #[prost(string, repeated, tag = "1")]
    pub filters: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListContainersResponse {
    #[prost(message, repeated, tag = "1")]
    pub containers: Vec<Container>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetContainerRequest {
    #[prost(string, tag = "1")]
    pub id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetContainerResponse {
    #[prost(message, optional, tag = "1")]
    pub container: Option<Container>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Container {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(map = "string, string", tag = "2")]
    pub labels: HashMap<String, String>,
    #[prost(string, tag = "3")]
    pub image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListTasksRequest {
    #[prost(string, tag = "1")]
    pub filter: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListTasksResponse {
    #[prost(message, repeated, tag = "1")]
    pub tasks: Vec<Process>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetTaskRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, tag = "2")]
    pub exec_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetTaskResponse {
    #[prost(message, optional, tag = "1")]
    pub process: Option<Process>,
}

/// `containerd.v1.types.Process`: a task's process.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Process {
    /// Empty in containerd 1.6's task listings, where `id` is the container's.
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, tag = "2")]
    pub id: String,
    #[prost(uint32, tag = "3")]
    pub pid: u32,
    /// `containerd.v1.types.Status`.
    #[prost(int32, tag = "4")]
    pub status: i32,
}

impl Process {
    /// The container the process belongs to.
    pub fn container(&self) -> &str {
        if self.container_id.is_empty() {
            &self.id
        } else {
            &self.container_id
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SubscribeRequest {
    /// containerd's filter syntax; alternatives, any of which selects.
    #[prost(string, repeated, tag = "1")]
    pub filters: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    #[prost(message, optional, tag = "1")]
    pub timestamp: Option<prost_types::Timestamp>,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub topic: String,
    #[prost(message, optional, tag = "4")]
    pub event: Option<prost_types::Any>,
}

/// `containerd.events.TaskStart` (`/tasks/start`: a container's init process).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskStart {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(uint32, tag = "2")]
    pub pid: u32,
}

/// `containerd.events.TaskExit` (`/tasks/exit`: init or an exec'd process).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskExit {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, tag = "2")]
    pub id: String,
    #[prost(uint32, tag = "3")]
    pub pid: u32,
}

/// `containerd.events.TaskDelete` (`/tasks/delete`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskDelete {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(uint32, tag = "2")]
    pub pid: u32,
    #[prost(string, tag = "5")]
    pub id: String,
}

/// `containerd.events.ContainerDelete` (`/containers/delete`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerDelete {
    #[prost(string, tag = "1")]
    pub id: String,
}

/// `containerd.events.ContainerUpdate` (`/containers/update`: labels changed).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerUpdate {
    #[prost(string, tag = "1")]
    pub id: String,
}

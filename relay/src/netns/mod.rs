//! Network namespaces: resolve a target to an open namespace, and run code
//! inside it.
//!
//! A [`Target`] (`container:web`, `pid:1234`, `netns:blue`, `netns:/path`,
//! `host`) is resolved by [`resolve`] to a [`Netns`]: an open fd on the
//! namespace, verified to be a *network* namespace, with a label for metrics
//! and file names. Containers are looked up through the Docker Engine API
//! ([`DockerClient`]); the other kinds need no daemon.
//!
//! [`Netns::run`] runs a closure on a dedicated OS thread that has entered
//! the namespace, never on the caller's thread (a tokio worker that called
//! `setns` would carry every later task into the wrong namespace). A socket
//! keeps the namespace it was created in, so the usual pattern is to create
//! the socket (or attach the program) inside and hand the fd back.
//!
//! Not here: what runs inside (listeners, connects, eBPF attach) belongs to
//! the callers.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use relay::netns::{Target, resolve};
//!
//! let target: Target = "container:web".parse()?;
//! let ns = resolve(&target).await?;
//! // Connect to the container's own localhost; the socket stays in there.
//! let stream = ns.run(|| std::net::TcpStream::connect("127.0.0.1:8080"))??;
//! # drop(stream);
//! # Ok(()) }
//! ```

mod docker;
mod target;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::stat::{SFlag, fstat};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};

pub use docker::{ContainerState, DEFAULT_SOCKET, DockerClient};
pub use target::{IP_NETNS_DIR, ParseTargetError, Target};

use target::pid_ns_path;

/// Why a target could not be resolved or entered. Every message names the
/// target as the user wrote it.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("container:{container}: no such container (`docker ps -a` lists the names)")]
    UnknownContainer { container: String },

    #[error("container:{container}: container is not running (status {status}); start it first")]
    ContainerNotRunning { container: String, status: String },

    #[error(
        "container:{container}: Docker daemon not reachable at {}: {detail}; \
         is dockerd running? /var/run/docker.sock",
        socket.display()
    )]
    DockerUnreachable {
        container: String,
        socket: PathBuf,
        detail: String,
    },

    #[error("container:{container}: the Docker API answered {status}: {message}")]
    DockerApi {
        container: String,
        status: u16,
        message: String,
    },

    #[error("pid:{pid}: no such process")]
    NoSuchPid { pid: u32 },

    #[error("{target}: {} does not exist{hint}", path.display())]
    NoSuchPath {
        target: String,
        path: PathBuf,
        /// Where to look instead, when there is a better place.
        hint: &'static str,
    },

    #[error("{target}: {} is not a network namespace ({found})", path.display())]
    NotNetns {
        target: String,
        path: PathBuf,
        /// What it is instead: "a regular file", "a mnt namespace", ...
        found: String,
    },

    #[error(
        "{target}: permission denied {action} {}; needs root or CAP_SYS_ADMIN",
        path.display()
    )]
    PermissionDenied {
        target: String,
        path: PathBuf,
        action: &'static str,
    },

    #[error("{target}: {action} {}: {source}", path.display())]
    Io {
        target: String,
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },

    #[error("{target}: could not start a thread to enter the namespace: {source}")]
    Thread { target: String, source: io::Error },
}

impl NetnsError {
    /// A target that does not exist or is not a namespace (the user's
    /// mistake, exit 2), as opposed to a daemon or permission problem.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            NetnsError::UnknownContainer { .. }
                | NetnsError::ContainerNotRunning { .. }
                | NetnsError::NoSuchPid { .. }
                | NetnsError::NoSuchPath { .. }
                | NetnsError::NotNetns { .. }
        )
    }
}

/// A namespace's identity: the nsfs device and inode, as `ip netns identify`
/// and `/proc/<pid>/ns/net` (`net:[<ino>]`) show it. Two fds are the same
/// namespace exactly when their ids are equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl NsId {
    /// The id of the namespace `fd` refers to.
    pub fn of(fd: impl AsFd) -> io::Result<Self> {
        let st = fstat(fd).map_err(io::Error::from)?;
        Ok(Self {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
}

impl fmt::Display for NsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

/// An open network namespace and what it was resolved from.
///
/// The fd keeps the namespace alive (and its inode unique) as long as this
/// value lives, even after the container or process is gone.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    target: Target,
    label: String,
    id: NsId,
    pid: Option<u32>,
    container_id: Option<String>,
    docker: Option<DockerClient>,
}

/// Resolve `target` to its network namespace, asking the daemon at
/// [`DEFAULT_SOCKET`] for containers.
pub async fn resolve(target: &Target) -> Result<Netns, NetnsError> {
    resolve_with(target, &DockerClient::default()).await
}

/// Resolve `target`, asking `docker` for containers.
///
/// A container is looked up, then its init process's `/proc/<pid>/ns/net`
/// opened. If the container restarts between the two, the open fails (the
/// pid is gone: reported as not running) or, should the pid have been
/// reused at once, opens another process's namespace; [`Netns::still_current`]
/// catches that on the next check.
pub async fn resolve_with(target: &Target, docker: &DockerClient) -> Result<Netns, NetnsError> {
    let spec = target.spec();
    match target {
        Target::Container(name) => {
            let state = docker.inspect(name).await?;
            if !state.running || state.pid == 0 {
                return Err(NetnsError::ContainerNotRunning {
                    container: name.clone(),
                    status: state.status,
                });
            }
            open_container(name, &state.name, &state.id, state.pid).map(|mut ns| {
                // Asked again by `still_current`: as the user named it.
                ns.target = target.clone();
                ns.docker = Some(docker.clone());
                ns
            })
        }
        Target::Pid(pid) => {
            let path = pid_ns_path(*pid);
            let fd = open_netns(&spec, &path).map_err(|e| match e {
                NetnsError::NoSuchPath { .. } => NetnsError::NoSuchPid { pid: *pid },
                other => other,
            })?;
            Netns::new(fd, target, target.label(), &path, Some(*pid))
        }
        Target::Host | Target::NetnsName(_) | Target::NetnsPath(_) => {
            let path = target
                .ns_path()
                .expect("invariant: every target but a container has a namespace path");
            let fd = open_netns(&spec, &path)?;
            Netns::new(fd, target, target.label(), &path, None)
        }
    }
}

/// The namespace of a running container whose process is known (from an
/// inspect, or discovery's): `/proc/<pid>/ns/net`, labelled with the
/// container's `name`. `asked` is how the user named it, for messages.
pub fn open_container(asked: &str, name: &str, id: &str, pid: u32) -> Result<Netns, NetnsError> {
    let target = Target::Container(name.to_string());
    let path = pid_ns_path(pid);
    let fd = open_netns(&target.spec(), &path).map_err(|e| match e {
        NetnsError::NoSuchPath { .. } => NetnsError::ContainerNotRunning {
            container: asked.to_string(),
            status: format!("its process {pid} has exited"),
        },
        other => other,
    })?;
    Netns::new(fd, &target, name.to_string(), &path, Some(pid)).map(|mut ns| {
        ns.container_id = Some(id.to_string());
        ns
    })
}

/// The namespace bind-mounted at `path` (an `ip netns` file found by
/// discovery), labelled `label`.
pub fn open_path(label: &str, path: &Path) -> Result<Netns, NetnsError> {
    let target = Target::NetnsPath(path.to_path_buf());
    let fd = open_netns(&target.spec(), path)?;
    Netns::new(fd, &target, label.to_string(), path, None)
}

impl Netns {
    fn new(
        fd: OwnedFd,
        target: &Target,
        label: String,
        path: &Path,
        pid: Option<u32>,
    ) -> Result<Self, NetnsError> {
        let id = NsId::of(&fd).map_err(|source| NetnsError::Io {
            target: target.spec(),
            path: path.to_path_buf(),
            action: "reading the inode of",
            source,
        })?;
        Ok(Self {
            fd,
            target: target.clone(),
            label,
            id,
            pid,
            container_id: None,
            docker: None,
        })
    }

    /// What this namespace was resolved from.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A label for metrics and file names: the container's name (also when
    /// it was given by id), `pid:<pid>`, the `ip netns` name, the path, or
    /// `host`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The namespace's identity (nsfs inode), fixed when it was opened.
    pub fn id(&self) -> NsId {
        self.id
    }

    /// The process whose namespace this is, for containers and pids.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The container's full id, for containers.
    pub fn container_id(&self) -> Option<&str> {
        self.container_id.as_deref()
    }

    /// Does the target still name this namespace?
    ///
    /// Resolves the target again and compares namespace ids: `Ok(false)`
    /// when the container was restarted or recreated (a new namespace),
    /// stopped or removed, when the process is gone, or when the path now
    /// names another namespace or nothing. `Err` only when that cannot be
    /// told (the Docker daemon is unreachable, permission is denied).
    pub async fn still_current(&self) -> Result<bool, NetnsError> {
        let docker = self.docker.clone().unwrap_or_default();
        match resolve_with(&self.target, &docker).await {
            Ok(now) => Ok(now.id == self.id),
            Err(
                NetnsError::UnknownContainer { .. }
                | NetnsError::ContainerNotRunning { .. }
                | NetnsError::NoSuchPid { .. }
                | NetnsError::NoSuchPath { .. }
                | NetnsError::NotNetns { .. },
            ) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Run `f` on a new OS thread that has entered this namespace, wait for
    /// it, and return what `f` returned.
    ///
    /// Only that thread ever switches namespace, and it ends when `f`
    /// returns, so nothing is restored and no other thread (in particular no
    /// tokio worker) runs in the wrong namespace. Sockets `f` creates stay in
    /// this namespace wherever they are used later. The thread shares the
    /// process's mount namespace: `/proc/self/net` and `/sys/class/net`
    /// still show the host's view; `/proc/thread-self/net` shows this one's.
    ///
    /// This blocks the calling thread for as long as `f` runs (plus a thread
    /// start); from async code, use [`Self::run_async`] for anything longer
    /// than creating a socket. A panic in `f` is resumed on the caller.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let fd = self.fd.as_fd();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(self.thread_name())
                .spawn_scoped(scope, move || enter(fd).map(|()| f()))
                .map_err(|source| self.thread_error(source))?;
            match handle.join() {
                Ok(entered) => entered.map_err(|errno| self.setns_error(errno)),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// [`Self::run`] without blocking the caller: the thread's result comes
    /// back through a channel, so a tokio worker can await it.
    ///
    /// Dropping the future does not stop the thread: `f` runs to the end and
    /// what it returns (a socket, say) is dropped there.
    pub async fn run_async<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let fd = self.fd.try_clone().map_err(|source| NetnsError::Io {
            target: self.target.spec(),
            path: PathBuf::from(format!("fd {}", self.fd.as_raw_fd())),
            action: "duplicating",
            source,
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(self.thread_name())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    enter(fd.as_fd()).map(|()| f())
                }));
                // The receiver only goes away when the caller stopped waiting.
                let _ = tx.send(outcome);
            })
            .map_err(|source| self.thread_error(source))?;
        match rx
            .await
            .expect("invariant: the namespace thread always sends before it ends")
        {
            Ok(entered) => entered.map_err(|errno| self.setns_error(errno)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Linux keeps 15 bytes of a thread name; the label's start is enough.
    fn thread_name(&self) -> String {
        let mut name = format!("ns-{}", self.label);
        if name.len() > 15 {
            let mut end = 15;
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            name.truncate(end);
        }
        name
    }

    fn thread_error(&self, source: io::Error) -> NetnsError {
        NetnsError::Thread {
            target: self.target.spec(),
            source,
        }
    }

    fn setns_error(&self, errno: Errno) -> NetnsError {
        let path = self
            .target
            .ns_path()
            .or_else(|| self.pid.map(pid_ns_path))
            .unwrap_or_default();
        match errno {
            Errno::EPERM | Errno::EACCES => NetnsError::PermissionDenied {
                target: self.target.spec(),
                path,
                action: "entering",
            },
            other => NetnsError::Io {
                target: self.target.spec(),
                path,
                action: "entering (setns)",
                source: other.into(),
            },
        }
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Move the calling thread into the network namespace `fd`.
fn enter(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    setns(fd, CloneFlags::CLONE_NEWNET)
}

// NS_GET_NSTYPE (linux/nsfs.h): _IO(0xb7, 0x3); returns the CLONE_NEW* type.
nix::ioctl_none!(ns_get_nstype, 0xb7, 0x3);

/// Open `path` and check that it is a network namespace.
fn open_netns(spec: &str, path: &Path) -> Result<OwnedFd, NetnsError> {
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => NetnsError::NoSuchPath {
            target: spec.to_string(),
            path: path.to_path_buf(),
            hint: if path.starts_with(IP_NETNS_DIR) {
                " (`ip netns list` shows the names)"
            } else {
                ""
            },
        },
        io::ErrorKind::PermissionDenied => NetnsError::PermissionDenied {
            target: spec.to_string(),
            path: path.to_path_buf(),
            action: "opening",
        },
        _ => NetnsError::Io {
            target: spec.to_string(),
            path: path.to_path_buf(),
            action: "opening",
            source,
        },
    })?;
    let not_netns = |found: String| NetnsError::NotNetns {
        target: spec.to_string(),
        path: path.to_path_buf(),
        found,
    };
    let io_error = |errno: Errno| NetnsError::Io {
        target: spec.to_string(),
        path: path.to_path_buf(),
        action: "inspecting",
        source: errno.into(),
    };
    let fs = fstatfs(&file).map_err(io_error)?;
    if fs.filesystem_type() != NSFS_MAGIC {
        let st = fstat(&file).map_err(io_error)?;
        return Err(not_netns(file_kind(st.st_mode).to_string()));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the namespace
    // behind the fd, which `file` keeps open for the duration of the call.
    let nstype = unsafe { ns_get_nstype(file.as_raw_fd()) }.map_err(io_error)?;
    if nstype != CloneFlags::CLONE_NEWNET.bits() {
        return Err(not_netns(format!("a {} namespace", ns_kind(nstype))));
    }
    Ok(file.into())
}

/// What kind of file a non-namespace is, for the error message.
fn file_kind(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFCHR | SFlag::S_IFBLK => "a device",
        SFlag::S_IFIFO => "a pipe",
        SFlag::S_IFSOCK => "a socket",
        _ => "not a namespace file",
    }
}

/// The `/proc/<pid>/ns/<kind>` name of a CLONE_NEW* namespace type.
fn ns_kind(nstype: i32) -> &'static str {
    let flags = CloneFlags::from_bits_truncate(nstype);
    [
        (CloneFlags::CLONE_NEWNS, "mnt"),
        (CloneFlags::CLONE_NEWUTS, "uts"),
        (CloneFlags::CLONE_NEWIPC, "ipc"),
        (CloneFlags::CLONE_NEWUSER, "user"),
        (CloneFlags::CLONE_NEWPID, "pid"),
        (CloneFlags::CLONE_NEWCGROUP, "cgroup"),
    ]
    .into_iter()
    .find(|(flag, _)| flags == *flag)
    .map_or("non-network", |(_, kind)| kind)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;

    fn resolve_now(target: &str) -> Result<Netns, NetnsError> {
        resolve_with_now(target, &DockerClient::default())
    }

    fn resolve_with_now(target: &str, docker: &DockerClient) -> Result<Netns, NetnsError> {
        let target: Target = target
            .parse()
            .unwrap_or_else(|e| panic!("test target should parse: {e}"));
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("invariant: a current-thread runtime builds")
            .block_on(resolve_with(&target, docker))
    }

    fn inode(path: &str) -> u64 {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("stat {path}: {e}"))
            .ino()
    }

    fn expect_err(target: &str) -> NetnsError {
        match resolve_now(target) {
            Ok(ns) => panic!("expected {target} to fail, it resolved to {}", ns.id()),
            Err(e) => e,
        }
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn host_is_the_processs_own_namespace() {
        let ns = resolve_now("host").expect("host always resolves");
        assert_eq!(ns.id().ino, inode("/proc/self/ns/net"));
        assert_eq!(ns.label(), "host");
        assert_eq!(ns.pid(), None);
    }

    #[test]
    fn a_pid_resolves_to_that_processs_namespace() {
        let ns = resolve_now(&format!("pid:{}", std::process::id())).expect("own pid resolves");
        assert_eq!(ns.id().ino, inode("/proc/self/ns/net"));
        assert_eq!(ns.label(), format!("pid:{}", std::process::id()));
        assert_eq!(ns.pid(), Some(std::process::id()));
    }

    #[test]
    fn a_missing_pid_is_named() {
        let pid = u32::MAX - 1;
        let err = expect_err(&format!("pid:{pid}"));
        assert!(
            matches!(err, NetnsError::NoSuchPid { pid: p } if p == pid),
            "{err:?}"
        );
        assert_eq!(err.to_string(), format!("pid:{pid}: no such process"));
    }

    #[test]
    fn a_regular_file_is_not_a_namespace() {
        let path = std::env::temp_dir().join(format!("relay-netns-unit-{}", std::process::id()));
        std::fs::write(&path, b"not a namespace").expect("writing a temp file");
        let err = expect_err(&format!("netns:{}", path.display()));
        let _ = std::fs::remove_file(&path);
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("netns:{}", path.display())), "{msg}");
        assert!(
            msg.contains("is not a network namespace (a regular file)"),
            "{msg}"
        );
    }

    #[test]
    fn another_kind_of_namespace_is_named_as_such() {
        let err = expect_err("netns:/proc/self/ns/uts");
        assert!(
            err.to_string()
                .ends_with("/proc/self/ns/uts is not a network namespace (a uts namespace)"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_ip_netns_name_points_at_ip_netns_list() {
        let err = expect_err("netns:relay-unit-no-such-ns");
        assert!(matches!(err, NetnsError::NoSuchPath { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "netns:relay-unit-no-such-ns: /var/run/netns/relay-unit-no-such-ns does not \
             exist (`ip netns list` shows the names)"
        );
    }

    #[test]
    fn run_enters_the_namespace_on_another_thread() {
        let ns = resolve_now("host").expect("host always resolves");
        let caller = std::thread::current().id();
        let result = ns.run(|| {
            let ino = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
            (std::thread::current().id(), ino.ok())
        });
        match result {
            Ok((thread, ino)) => {
                assert_ne!(thread, caller, "run must not use the caller's thread");
                assert_eq!(ino, Some(ns.id().ino));
            }
            // setns needs CAP_SYS_ADMIN even to re-enter one's own namespace.
            Err(e) => {
                assert!(!is_root(), "root could not enter its own namespace: {e}");
                assert!(matches!(e, NetnsError::PermissionDenied { .. }), "{e:?}");
                assert!(e.to_string().contains("needs root or CAP_SYS_ADMIN"), "{e}");
            }
        }
    }

    #[test]
    fn run_async_returns_the_closures_value() {
        let ns = resolve_now("host").expect("host always resolves");
        let got = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("invariant: a current-thread runtime builds")
            .block_on(ns.run_async(|| 6 * 7));
        match got {
            Ok(v) => assert_eq!(v, 42),
            Err(e) => assert!(!is_root(), "root could not enter its own namespace: {e}"),
        }
    }

    #[test]
    fn thread_names_fit_linux_limit() {
        let mut ns = resolve_now("host").expect("host always resolves");
        ns.label = "a-very-long-container-name-é".into();
        assert_eq!(ns.thread_name(), "ns-a-very-long-");
    }

    #[test]
    fn an_absent_docker_socket_asks_whether_dockerd_runs() {
        let docker = DockerClient::new("/nonexistent/relay-unit/docker.sock");
        let err = match resolve_with_now("container:web", &docker) {
            Ok(_) => panic!("no daemon there"),
            Err(e) => e,
        };
        assert!(
            matches!(err, NetnsError::DockerUnreachable { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.starts_with("container:web: "), "{msg}");
        assert!(
            msg.contains("is dockerd running? /var/run/docker.sock"),
            "{msg}"
        );
    }

    /// A one-shot fake daemon that answers the first request with `status`
    /// and `body`.
    fn fake_docker(status: &str, body: &'static str) -> FakeDaemon {
        let dir = std::env::temp_dir().join(format!(
            "relay-netns-unit-docker-{}-{}",
            std::process::id(),
            FAKE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        FakeDaemon {
            socket: dir.join("docker.sock"),
            dir,
            status: status.to_string(),
            body,
        }
    }

    static FAKE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    struct FakeDaemon {
        dir: PathBuf,
        socket: PathBuf,
        status: String,
        body: &'static str,
    }

    impl FakeDaemon {
        /// Resolve `target` against this daemon; the error and request line.
        fn resolve(self, target: &str) -> (NetnsError, String) {
            let target: Target = target.parse().expect("test target should parse");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("invariant: a current-thread runtime builds");
            let (result, request) = rt.block_on(async {
                let listener = UnixListener::bind(&self.socket).expect("binding the fake socket");
                let docker = DockerClient::new(&self.socket);
                let serve = async {
                    let (mut conn, _) = listener.accept().await.expect("accepting");
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = conn.read(&mut buf).await.expect("reading the request");
                        assert!(n > 0, "client closed before the request ended");
                        seen.extend_from_slice(&buf[..n]);
                    }
                    let answer = format!(
                        "HTTP/1.1 {}\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\n\r\n{}",
                        self.status,
                        self.body.len(),
                        self.body
                    );
                    conn.write_all(answer.as_bytes()).await.expect("answering");
                    String::from_utf8_lossy(&seen)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string()
                };
                tokio::join!(resolve_with(&target, &docker), serve)
            });
            let _ = std::fs::remove_dir_all(&self.dir);
            match result {
                Ok(ns) => panic!("expected an error, resolved to {}", ns.id()),
                Err(e) => (e, request),
            }
        }
    }

    #[test]
    fn docker_is_asked_for_the_container_by_name() {
        let daemon = fake_docker("404 Not Found", r#"{"message":"No such container: web"}"#);
        let (err, request) = daemon.resolve("container:web");
        assert_eq!(request, "GET /containers/web/json HTTP/1.1");
        assert!(
            matches!(err, NetnsError::UnknownContainer { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "container:web: no such container (`docker ps -a` lists the names)"
        );
    }

    #[test]
    fn a_name_as_docker_inspect_prints_it_is_asked_for_without_the_slash() {
        let daemon = fake_docker("404 Not Found", r#"{"message":"No such container: web"}"#);
        let (err, request) = daemon.resolve("container:/web");
        assert_eq!(request, "GET /containers/web/json HTTP/1.1");
        assert!(err.to_string().starts_with("container:/web: "), "{err}");
    }

    #[test]
    fn a_stopped_container_says_so_with_its_status() {
        let daemon = fake_docker(
            "200 OK",
            r#"{"Id":"abc","Name":"/web","State":{"Status":"exited","Running":false,"Pid":0}}"#,
        );
        let (err, _) = daemon.resolve("container:web");
        assert!(
            matches!(err, NetnsError::ContainerNotRunning { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "container:web: container is not running (status exited); start it first"
        );
    }

    #[test]
    fn other_daemon_answers_carry_its_message() {
        let daemon = fake_docker("500 Internal Server Error", r#"{"message":"disk full"}"#);
        let (err, _) = daemon.resolve("container:web");
        assert_eq!(
            err.to_string(),
            "container:web: the Docker API answered 500: disk full"
        );
    }

    #[test]
    fn a_dead_pid_reported_running_is_a_container_not_running() {
        let daemon = fake_docker(
            "200 OK",
            r#"{"Id":"abc","Name":"/web","State":{"Status":"running","Running":true,"Pid":4294967294}}"#,
        );
        let (err, _) = daemon.resolve("container:web");
        assert!(
            matches!(err, NetnsError::ContainerNotRunning { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("has exited"), "{err}");
    }

    #[test]
    fn namespace_kinds_are_named_like_proc() {
        assert_eq!(ns_kind(CloneFlags::CLONE_NEWNS.bits()), "mnt");
        assert_eq!(ns_kind(CloneFlags::CLONE_NEWPID.bits()), "pid");
        assert_eq!(ns_kind(0x80), "non-network"); // CLONE_NEWTIME
    }
}

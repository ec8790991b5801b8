//! `relay observe containers` beyond Docker: containerd driven directly
//! with `ctr` (as on a Kubernetes node), the kernel's network namespaces
//! where no daemon answers, and `--source auto` handing a namespace from
//! the one to the other. Each namespace is attached once however many
//! containers or processes share it, and counted exactly as its
//! interface's kernel counters say.
//!
//! Containers go where CNI would put them: into a namespace the harness
//! made with a veth to the host (`ctr run --with-ns network:<path>`), so
//! the host reaches the httpd running there and the counts can be checked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use relay_tests::child::{ChildProc, output_of};
use relay_tests::containerd::Containerd;
use relay_tests::fleet::{
    FOLLOW_TIMEOUT, REQUESTS, counts_match, fetch, info, is_attached, observe_containers,
    wait_attached, wait_detached, wait_discovery, wait_tcx_links,
};
use relay_tests::namespaced::{Bind, Kind, Subject};
use relay_tests::relay_proc::Relay;
use relay_tests::tempdir::TempDir;
use relay_tests::wait::poll_until;
use relay_tests::{require_containerd, require_root, require_tool};

type Labels = BTreeMap<String, String>;

/// The functional deadline: attached within this of the start.
const ATTACH_DEADLINE: Duration = Duration::from_secs(1);
/// The Kubernetes namespace of the test's pod.
const POD_NAMESPACE: &str = "tests";

/// A namespace with a veth to the host and httpd in it, as CNI leaves one.
fn namespace() -> Result<Subject> {
    Subject::httpd(Kind::Netns, Bind::Any)
}

/// Poll until `name`'s info series satisfies `check`; returns its labels.
fn wait_info(
    relay: &Relay,
    name: &str,
    what: &str,
    check: impl Fn(&Labels) -> bool,
) -> Result<Labels> {
    let mut last = None;
    poll_until(
        &format!("{name}'s info series: {what}"),
        FOLLOW_TIMEOUT,
        || {
            last = info(&relay.scrape()?, name);
            Ok(last.clone().filter(|labels| check(labels)))
        },
    )
    .with_context(|| format!("last info series of {name}: {last:?}"))
}

fn label_is(labels: &Labels, key: &str, value: &str) -> bool {
    labels.get(key).map(String::as_str) == Some(value)
}

#[test]
fn containerd_containers_and_pods_are_attached_once_and_followed_through_a_restart() -> Result<()> {
    require_containerd!();
    relay_tests::docker::ensure_daemon()?;
    let mut containerd = Containerd::start()?;
    for namespace in ["default", "k8s.io"] {
        containerd.import_image(namespace)?;
    }
    let tag = format!("cd-{}", std::process::id());
    let selected = ("relay.test", tag.as_str());
    let socket = containerd.socket().display().to_string();
    let relay = observe_containers(&[
        "--source",
        "containerd",
        "--containerd-socket",
        &socket,
        "--select",
        &format!("label=relay.test={tag}"),
    ])?;
    wait_discovery(&relay, "containerd", true)?;

    // A plain container (namespace `default`): named by its id.
    let plain = namespace()?;
    let name = plain.label()?;
    containerd.run(
        "default",
        &name,
        &[selected],
        Some(&plain.ns_path()?),
        &["sleep", "600"],
    )?;
    let took = wait_attached(&relay, &name, ATTACH_DEADLINE)
        .with_context(|| format!("within {ATTACH_DEADLINE:?} of `ctr run -d` returning"))?;
    eprintln!("containerd container attached {took:?} after `ctr run -d` returned");
    let labels = info(&relay.scrape()?, &name).context("no info series")?;
    ensure!(
        label_is(&labels, "source", "containerd")
            && label_is(&labels, "id", &name)
            && labels.get("image").is_some_and(|i| i.contains("busybox")),
        "the info series should say containerd found {name} running busybox: {labels:?}"
    );
    counts_match(&relay, &plain, || fetch(&plain, REQUESTS))?;
    wait_tcx_links(&relay, 2)?;

    // A pod (namespace `k8s.io`): its sandbox and an app container in one
    // network namespace, labelled as the CRI labels them.
    let pod_net = namespace()?;
    let pod = format!("pod-{tag}");
    let pod_labels = |kind: &'static str| {
        vec![
            selected,
            ("io.cri-containerd.kind", kind),
            ("io.kubernetes.pod.name", pod.as_str()),
            ("io.kubernetes.pod.namespace", POD_NAMESPACE),
        ]
    };
    let sandbox_id = format!("{}-sandbox", pod_net.label()?);
    let app_id = format!("{}-app", pod_net.label()?);
    let mut app_labels = pod_labels("container");
    app_labels.push(("io.kubernetes.container.name", "app"));
    containerd.run(
        "k8s.io",
        &sandbox_id,
        &pod_labels("sandbox"),
        Some(&pod_net.ns_path()?),
        &["sleep", "600"],
    )?;
    containerd.run(
        "k8s.io",
        &app_id,
        &app_labels,
        Some(&pod_net.ns_path()?),
        &["sleep", "600"],
    )?;
    let sandbox = format!("{POD_NAMESPACE}/{pod}");
    let app = format!("{sandbox}/app");
    wait_attached(&relay, &sandbox, FOLLOW_TIMEOUT)?;
    let app_info = wait_info(&relay, &app, "network=container", |l| {
        label_is(l, "network", "container")
    })?;
    ensure!(
        label_is(&app_info, "pod", &pod) && label_is(&app_info, "namespace", POD_NAMESPACE),
        "the app container's info series should carry its pod and namespace: {app_info:?}"
    );
    // Two namespaces, two links each: the pod is attached once.
    wait_tcx_links(&relay, 4)?;
    ensure!(
        relay
            .scrape()?
            .value("relay_observe_attached", &[("container", &app)])
            .is_none(),
        "the app container shares its sandbox's namespace and must not be attached again"
    );

    // The app container goes, then the sandbox: the pod is detached.
    containerd.remove("k8s.io", &app_id)?;
    wait_detached(&relay, &app)?;
    ensure!(
        is_attached(&relay.scrape()?, &sandbox),
        "the sandbox stays attached"
    );
    containerd.remove("k8s.io", &sandbox_id)?;
    wait_detached(&relay, &sandbox)?;
    wait_tcx_links(&relay, 2)?;

    // A containerd restart: reported, survived; what runs stays observed.
    containerd.stop_daemon()?;
    wait_discovery(&relay, "containerd", false)?;
    containerd.start_daemon()?;
    wait_discovery(&relay, "containerd", true)?;
    let later = namespace()?;
    let later_name = later.label()?;
    containerd.run(
        "default",
        &later_name,
        &[selected],
        Some(&later.ns_path()?),
        &["sleep", "600"],
    )?;
    wait_attached(&relay, &later_name, FOLLOW_TIMEOUT)?;
    ensure!(
        is_attached(&relay.scrape()?, &name),
        "{name} kept running across the restart and stays attached"
    );
    wait_tcx_links(&relay, 4)?;
    counts_match(&relay, &later, || fetch(&later, REQUESTS))?;
    let log = relay.stderr();
    ensure!(
        log.contains("containerd discovery down") && log.contains("containerd discovery up"),
        "the log should say discovery went down and came back:\n{log}"
    );

    containerd.remove("default", &name)?;
    wait_detached(&relay, &name)?;
    wait_tcx_links(&relay, 2)?;
    Ok(())
}

/// A process in a network namespace of its own (`unshare -n`), running a
/// copy of `sleep` under a name of the test's, with one end of a veth
/// pair moved in; killed (and the pair with its namespace gone) on drop.
struct Unshared {
    process: ChildProc,
    _dir: TempDir,
    binary: PathBuf,
}

impl Unshared {
    fn start(comm: &str, host_if: &str) -> Result<Self> {
        let dir = TempDir::new("unshared")?;
        let binary = dir.join(comm);
        std::fs::copy("/bin/sleep", &binary).context("copying /bin/sleep")?;
        let mut cmd = Command::new("unshare");
        cmd.arg("-n").arg(&binary).arg("600");
        let process = ChildProc::spawn(comm, cmd)?;
        let pid = process.pid().to_string();
        let peer = format!("{host_if}p");
        let ip = |args: &[&str]| {
            let mut cmd = Command::new("ip");
            cmd.args(args);
            output_of(cmd).map(drop)
        };
        // unshare has made the namespace once the process runs the copy.
        poll_until("unshare to exec the copied sleep", FOLLOW_TIMEOUT, || {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            Ok((exe.as_deref() == Some(binary.as_path())).then_some(()))
        })?;
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &pid])?;
        ip(&["link", "set", host_if, "up"])?;
        let mut up = Command::new("nsenter");
        up.args(["-t", &pid, "-n", "ip", "link", "set", &peer, "up"]);
        output_of(up)?;
        Ok(Unshared {
            process,
            _dir: dir,
            binary,
        })
    }

    /// The namespace's inode, as `/proc/<pid>/ns/net` names it (`net:[N]`).
    fn inode(&self) -> Result<u64> {
        let link = std::fs::read_link(format!("/proc/{}/ns/net", self.process.pid()))?;
        let text = link.display().to_string();
        text.trim_start_matches("net:[")
            .trim_end_matches(']')
            .parse()
            .with_context(|| format!("not a namespace link: {text}"))
    }

    /// A second process in the same namespace, running the same copy.
    fn join(&self, label: &str) -> Result<ChildProc> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{}/ns/net", self.process.pid()))
            .arg(&self.binary)
            .arg("600");
        ChildProc::spawn(label, cmd)
    }
}

#[test]
fn network_namespaces_are_found_by_name_and_by_process_once_each() -> Result<()> {
    require_root!("creates network namespaces");
    require_tool!("unshare");
    require_tool!("nsenter");
    let me = std::process::id();
    // Both the harness's namespaces (relay-t-<pid>-N) and the process's
    // (<comm>-<inode>, comm rt-<pid>-s) match.
    let relay = observe_containers(&["--source", "netns", "--select", &format!("name=*-{me}-*")])?;
    wait_discovery(&relay, "netns", true)?;

    // Named under /var/run/netns (and entered by its httpd): one entry.
    let subject = namespace()?;
    let name = subject.label()?;
    let took = wait_attached(&relay, &name, ATTACH_DEADLINE).with_context(|| {
        format!("within {ATTACH_DEADLINE:?} of the namespace's httpd listening")
    })?;
    eprintln!("named namespace attached {took:?} after its httpd listened");
    let labels = info(&relay.scrape()?, &name).context("no info series")?;
    ensure!(
        label_is(&labels, "source", "netns")
            && labels.get("id").is_some_and(|i| i.starts_with("net:[")),
        "a named namespace is shown as found by netns, with its inode as id: {labels:?}"
    );
    counts_match(&relay, &subject, || fetch(&subject, REQUESTS))?;

    // Only a process's: named by its command and the inode, once however
    // many processes are in it.
    let comm = format!("rt-{me}-s");
    let unshared = Unshared::start(&comm, &format!("rtu{me}"))?;
    let process_name = format!("{comm}-{}", unshared.inode()?);
    let _second = unshared.join("second-in-unshared")?;
    wait_attached(&relay, &process_name, FOLLOW_TIMEOUT)?;
    let id = format!("net:[{}]", unshared.inode()?);
    let scrape = relay.scrape()?;
    let same_namespace = scrape
        .matching("relay_observe_container_info", &[("id", id.as_str())])
        .count();
    ensure!(
        same_namespace == 1,
        "one info series per namespace inode, got {same_namespace} for {id}:\n{}",
        scrape.text
    );
    wait_tcx_links(&relay, 4)?;

    // Gone with its last process.
    drop(_second);
    drop(unshared);
    wait_detached(&relay, &process_name)?;
    drop(subject);
    wait_detached(&relay, &name)?;
    wait_tcx_links(&relay, 0)?;
    Ok(())
}

#[test]
fn auto_observes_namespaces_until_a_daemon_answers_then_the_daemons_containers() -> Result<()> {
    require_containerd!();
    relay_tests::docker::ensure_daemon()?;
    let mut containerd = Containerd::prepare()?;
    let subject = namespace()?;
    let name = subject.label()?;
    let socket = containerd.socket().display().to_string();
    let relay = observe_containers(&[
        "--docker-socket",
        "/nonexistent/relay-tests/docker.sock",
        "--containerd-socket",
        &socket,
        "--select",
        &format!("name={name}"),
    ])?;
    // Neither daemon answers: the namespace is observed as the kernel shows it.
    let labels = wait_info(&relay, &name, "found by netns", |l| {
        label_is(l, "source", "netns")
    })?;
    wait_attached(&relay, &name, FOLLOW_TIMEOUT)?;
    ensure!(
        relay
            .scrape()?
            .value("relay_ready", &[("part", "discovery"), ("name", "auto")])
            == Some(1.0),
        "auto is ready with the namespaces alone: {labels:?}"
    );

    // containerd comes up with a container in that namespace: it takes over.
    containerd.start_daemon()?;
    containerd.import_image("default")?;
    containerd.run(
        "default",
        &name,
        &[],
        Some(&subject.ns_path()?),
        &["sleep", "600"],
    )?;
    wait_info(&relay, &name, "found by containerd", |l| {
        label_is(l, "source", "containerd")
    })?;
    wait_attached(&relay, &name, FOLLOW_TIMEOUT)?;
    wait_tcx_links(&relay, 2)?;
    let scrape = relay.scrape()?;
    ensure!(
        scrape
            .matching("relay_observe_container_info", &[("source", "netns")])
            .next()
            .is_none(),
        "with a daemon up the namespaces are no longer listed on their own:\n{}",
        scrape.text
    );
    counts_match(&relay, &subject, || fetch(&subject, REQUESTS))?;
    Ok(())
}

#[test]
fn watch_draws_a_block_per_container_the_busiest_first_idle_interfaces_too() -> Result<()> {
    require_root!("creates network namespaces");
    let me = std::process::id();
    let relay = observe_containers(&[
        "--source",
        "netns",
        "--select",
        &format!("name=relay-t-{me}-*"),
        "--watch",
    ])?;
    // The quiet one is made first: its name sorts first, so only the
    // traffic can put the busy one above it.
    let quiet = namespace()?;
    let busy = namespace()?;
    let (busy_name, quiet_name) = (busy.label()?, quiet.label()?);
    wait_attached(&relay, &busy_name, FOLLOW_TIMEOUT)?;
    wait_attached(&relay, &quiet_name, FOLLOW_TIMEOUT)?;
    let (busy_block, quiet_block) = (format!("== {busy_name} "), format!("== {quiet_name} "));
    let quiet_if = quiet.iface()?;
    // A frame (one redraw) with both blocks, the busy one first, and the
    // quiet namespace's interface listed in both directions though idle.
    let good_frame = |frame: &str| {
        let (Some(b), Some(q)) = (frame.find(&busy_block), frame.find(&quiet_block)) else {
            return false;
        };
        b < q
            && frame[q..]
                .lines()
                .filter(|l| l.starts_with(&quiet_if))
                .count()
                == 2
    };
    let mut last = String::new();
    poll_until(
        "a --watch frame with the busy container first",
        FOLLOW_TIMEOUT,
        || {
            fetch(&busy, 5)?;
            let log = relay.stderr();
            let frames: Vec<&str> = log.split("relay observe containers: 2 attached").collect();
            last = frames.last().copied().unwrap_or_default().to_string();
            Ok(frames.iter().skip(1).any(|f| good_frame(f)).then_some(()))
        },
    )
    .with_context(|| format!("the last frame:\n{last}"))?;
    Ok(())
}

//! `relay observe containers`: every selected container of a real dockerd
//! is attached within a second of its start, counted exactly as its
//! interface's kernel counters say, followed through restart, rename and
//! stop with its series keyed by name; host-network containers are not
//! attached separately; a missing daemon or a dockerd restart is reported
//! and survived.
//!
//! Every test selects only its own containers (a label or a name glob with
//! this process's id): the daemon is shared with other tests.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use relay_tests::docker::{self, Container};
use relay_tests::fleet::{
    FOLLOW_TIMEOUT, REQUESTS, counts_match, fetch, info, is_attached, observe_containers,
    tcx_links, wait_attached, wait_detached, wait_discovery,
};
use relay_tests::namespaced::Subject;
use relay_tests::require_docker;
use relay_tests::wait::poll_until;

/// The functional deadline: attached within this of the start.
const ATTACH_DEADLINE: Duration = Duration::from_secs(1);
/// Containers started in the attach test.
const CONTAINERS: usize = 20;
/// Of those, how many serve HTTP and carry traffic.
const WITH_TRAFFIC: usize = 3;

#[test]
fn twenty_containers_are_attached_within_a_second_and_counted_exactly() -> Result<()> {
    require_docker!();
    docker::ensure_daemon()?;
    docker::image()?;
    let tag = format!("relay.test=fleet-{}", std::process::id());
    let label = ["--label", tag.as_str()];
    let relay = observe_containers(&["--select", &format!("label={tag}")])?;
    wait_discovery(&relay, "docker", true)?;

    let mut took = Vec::new();
    let mut subjects = Vec::new();
    for _ in 0..WITH_TRAFFIC {
        // httpd_with returns once httpd listens: the start was earlier still.
        let subject = Subject::container_with(&label)?;
        let name = subject.label()?;
        took.push((name.clone(), wait_attached(&relay, &name, ATTACH_DEADLINE)?));
        subjects.push(subject);
    }
    let mut plain = Vec::new();
    for _ in WITH_TRAFFIC..CONTAINERS {
        let container = Container::run_with(&label, &["sleep", "600"])?;
        let waited = wait_attached(&relay, container.name(), ATTACH_DEADLINE)
            .with_context(|| format!("within {ATTACH_DEADLINE:?} of `docker run` returning"))?;
        took.push((container.name().to_string(), waited));
        plain.push(container);
    }
    let scrape = relay.scrape()?;
    let starts = scrape.counter("relay_observe_container_attach_seconds_count", &[]);
    let sum = scrape.counter("relay_observe_container_attach_seconds_sum", &[]);
    let slowest = took.iter().map(|(_, d)| *d).max().unwrap_or_default();
    eprintln!(
        "attach, from `docker run` returning to the info series in a scrape: slowest {slowest:?}, each {:?}; \
         relay's own measure from the start event: {starts} attaches, mean {:.1} ms",
        took.iter().map(|(_, d)| d.as_millis()).collect::<Vec<_>>(),
        if starts > 0.0 {
            sum / starts * 1e3
        } else {
            0.0
        }
    );
    ensure!(
        starts >= (CONTAINERS - WITH_TRAFFIC) as f64,
        "relay_observe_container_attach_seconds should count every attach after a start event, got {starts}"
    );
    // The others wait in the daemon; relay attached each once, two links per interface.
    ensure!(
        tcx_links(&relay)? == 2 * CONTAINERS,
        "expected {} TCX links (eth0 ingress and egress of each container), relay holds {}",
        2 * CONTAINERS,
        tcx_links(&relay)?
    );

    // Not selected: no label. On the host's network: shown, not attached.
    let outsider = Container::run(&["sleep", "600"])?;
    let host = Container::run_with(&["--label", &tag, "--network", "host"], &["sleep", "600"])?;
    let host_info = poll_until(
        "the host-network container's info series",
        FOLLOW_TIMEOUT,
        || Ok(info(&relay.scrape()?, host.name())),
    )?;
    let scrape = relay.scrape()?;
    ensure!(
        host_info.get("network").map(String::as_str) == Some("host")
            && scrape
                .value("relay_observe_attached", &[("container", host.name())])
                .is_none(),
        "a host-network container is counted as the host, not attached: info {host_info:?}\n{}",
        scrape.text
    );
    ensure!(
        info(&scrape, outsider.name()).is_none(),
        "a container without the selected label must not be observed:\n{}",
        scrape.text
    );
    ensure!(
        tcx_links(&relay)? == 2 * CONTAINERS,
        "the host-network and unselected containers added TCX links"
    );

    // Traffic from the host, and between two containers (busybox wget).
    let peer = subjects[1].http_addr()?;
    for (i, subject) in subjects.iter().enumerate() {
        counts_match(&relay, subject, || {
            fetch(subject, REQUESTS)?;
            if i == 0 {
                let name = subject.label()?;
                let url = format!("http://{peer}/index.html");
                let got = docker::docker(&["exec", &name, "wget", "-q", "-O", "-", &url])?;
                ensure!(
                    got == subjects[1].body().trim(),
                    "wget {url} from {name}: got {got:?}"
                );
            }
            Ok(())
        })
        .with_context(|| format!("counting {}", subject.label().unwrap_or_default()))?;
    }
    Ok(())
}

#[test]
fn a_container_is_followed_through_restart_rename_and_stop() -> Result<()> {
    require_docker!();
    docker::ensure_daemon()?;
    docker::image()?;
    let relay = observe_containers(&[
        "--select",
        &format!("name=relay-t-{}-*-web*", std::process::id()),
    ])?;
    let mut subject = Subject::container_with(&[])?;
    let unselected = subject.label()?;
    // Not selected by its name yet; a rename into the selection attaches it.
    wait_discovery(&relay, "docker", true)?;
    ensure!(
        info(&relay.scrape()?, &unselected).is_none(),
        "{unselected} does not match the name glob"
    );
    subject.container_mut()?.rename("-web")?;
    let name = subject.label()?;
    wait_attached(&relay, &name, FOLLOW_TIMEOUT)?;
    counts_match(&relay, &subject, || fetch(&subject, REQUESTS))?;
    let id = info(&relay.scrape()?, &name).and_then(|l| l.get("id").cloned());

    // Restart: a new namespace, the same name and the same series.
    let before = subject.pid()?;
    subject.restart()?;
    poll_until(
        "relay to attach in the restarted container's namespace",
        FOLLOW_TIMEOUT,
        || {
            Ok((subject
                .tc_attachments()?
                .iter()
                .any(|l| l.contains("observe"))
                && is_attached(&relay.scrape()?, &name))
            .then_some(()))
        },
    )?;
    ensure!(
        subject.pid()? != before,
        "docker restart should start a new process"
    );
    ensure!(
        info(&relay.scrape()?, &name).and_then(|l| l.get("id").cloned()) == id,
        "the info series keeps the container's id across a restart"
    );
    counts_match(&relay, &subject, || fetch(&subject, REQUESTS))?;
    ensure!(
        tcx_links(&relay)? == 2,
        "after a restart relay holds the new namespace's two links only, got {}",
        tcx_links(&relay)?
    );

    // Rename within the selection: the series carry the new name.
    subject.container_mut()?.rename("-2")?;
    let renamed = subject.label()?;
    wait_attached(&relay, &renamed, FOLLOW_TIMEOUT)?;
    wait_detached(&relay, &name)?;
    counts_match(&relay, &subject, || fetch(&subject, REQUESTS))?;

    // Stop: detached, nothing of relay's held.
    subject.stop()?;
    wait_detached(&relay, &renamed)?;
    poll_until("relay to close its TCX links", FOLLOW_TIMEOUT, || {
        Ok((tcx_links(&relay)? == 0).then_some(()))
    })?;
    Ok(())
}

#[test]
fn a_missing_docker_socket_is_reported_not_fatal() -> Result<()> {
    let socket = "/nonexistent/relay-tests/docker.sock";
    let relay = observe_containers(&["--source", "docker", "--docker-socket", socket])?;
    let scrape = wait_discovery(&relay, "docker", false)?;
    ensure!(
        scrape.value("relay_ready", &[("part", "discovery"), ("name", "docker")]) == Some(0.0),
        "relay_ready should hold /healthz back while discovery is down:\n{}",
        scrape.text
    );
    // Still serving after its retries, and it said why.
    poll_until(
        "relay to log that discovery is down",
        FOLLOW_TIMEOUT,
        || {
            let log = relay.stderr();
            Ok((log.contains("Docker discovery down") && log.contains(socket)).then_some(()))
        },
    )?;
    relay.scrape()?;
    Ok(())
}

/// Restarting the shared dockerd stops every container of the host,
/// other tests' too: only when asked (`RELAY_TESTS_RESTART_DOCKERD=1`).
#[test]
fn a_dockerd_restart_is_survived_and_containers_started_meanwhile_attached() -> Result<()> {
    require_docker!();
    if std::env::var_os("RELAY_TESTS_RESTART_DOCKERD").is_none() {
        relay_tests::gate::report_skip(
            "restarts the host's dockerd, which stops every container (other tests' too); set RELAY_TESTS_RESTART_DOCKERD=1 to run it",
        );
        return Ok(());
    }
    docker::ensure_daemon()?;
    docker::image()?;
    let tag = format!("relay.test=restart-{}", std::process::id());
    let relay = observe_containers(&["--select", &format!("label={tag}")])?;
    let first = Container::run_with(&["--label", &tag], &["sleep", "600"])?;
    wait_attached(&relay, first.name(), FOLLOW_TIMEOUT)?;

    docker::stop_daemon()?;
    wait_discovery(&relay, "docker", false)?;
    docker::start_daemon()?;
    let meanwhile = Container::run_with(&["--label", &tag], &["sleep", "600"])?;
    wait_discovery(&relay, "docker", true)?;
    wait_attached(&relay, meanwhile.name(), FOLLOW_TIMEOUT)?;
    // The first one died with the daemon (no live-restore): the listing detached it.
    wait_detached(&relay, first.name())?;
    ensure!(
        relay.stderr().contains("Docker discovery down")
            && relay.stderr().contains("Docker discovery up"),
        "the log should say discovery went down and came back:\n{}",
        relay.stderr()
    );
    Ok(())
}

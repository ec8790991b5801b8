//! relay as a host daemon started from a config file: `relay run -c`
//! serves many routes from one process, `relay check -c` reports every
//! problem with file, line, column and key, and `relay run` with no file
//! observes the host (issue 13).

use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use relay_tests::peers::{self, EchoServer};
use relay_tests::tempdir::TempDir;
use relay_tests::{Payload, RelayCmd, require_root};

const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Routes in the many-routes test: the issue's figure.
const ROUTES: usize = 200;

/// 200 routes in one process all serve: a SHA-256-checked payload echoes
/// through each, and each route counts exactly its own connection.
#[test]
fn two_hundred_routes_in_one_process_all_serve() -> Result<()> {
    let echo = EchoServer::start()?;
    let dir = TempDir::new("relay-config")?;
    // Port 0: the kernel picks each route's port, so no other test can
    // take one between choosing and binding; relay logs where it listens.
    let mut file = String::new();
    for i in 0..ROUTES {
        // Both address forms, as a hand-written file would mix them.
        let listen = if i % 2 == 0 {
            "127.0.0.1:0".to_string()
        } else {
            "TCP-LISTEN:0,fork,reuseaddr,bind=127.0.0.1".to_string()
        };
        file.push_str(&format!(
            "[[route]]\nname = \"r{i}\"\nlisten = \"{listen}\"\ntarget = \"{}\"\n\n",
            echo.addr()
        ));
    }
    let path = dir.join("relay.toml");
    std::fs::write(&path, file).with_context(|| format!("writing {}", path.display()))?;
    let relay = RelayCmd::raw(&["run", "-c", &path.to_string_lossy()])
        .with_metrics()?
        .spawn()?;
    let log = relay.stderr();
    let mut ports = vec![0u16; ROUTES];
    for line in log
        .lines()
        .filter(|l| l.contains("listening on 127.0.0.1:"))
    {
        let port = line
            .split("listening on 127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse::<u16>().ok());
        let route = line
            .split(" route=r")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|r| r.parse::<usize>().ok());
        if let (Some(port), Some(route)) = (port, route)
            && route < ROUTES
        {
            ports[route] = port;
        }
    }
    ensure!(
        ports.iter().all(|p| *p != 0),
        "expected a \"listening on\" line for each of {ROUTES} routes in:\n{log}"
    );
    for (i, port) in ports.iter().enumerate() {
        let payload = Payload::new(13_000 + i as u64, 64 * 1024);
        let stream = peers::connect(([127, 0, 0, 1], *port).into())
            .with_context(|| format!("route r{i} on port {port}"))?;
        let heard = peers::echo_payload(stream, payload)
            .with_context(|| format!("echo through route r{i}"))?;
        ensure!(
            heard == payload.fingerprint(),
            "route r{i}: expected the echo {} back, got {heard}",
            payload.fingerprint()
        );
    }
    relay_tests::wait::poll_until(
        "every route to count its one closed connection",
        Duration::from_secs(10),
        || {
            let scrape = relay.scrape()?;
            let counted = (0..ROUTES)
                .filter(|i| {
                    scrape.value(
                        "relay_connections_total",
                        &[("route", &format!("r{i}")), ("outcome", "closed")],
                    ) == Some(1.0)
                })
                .count();
            Ok((counted == ROUTES).then_some(()))
        },
    )?;
    Ok(())
}

/// `relay check` finds every problem of a file, each with its place.
#[test]
fn check_reports_every_problem_with_file_line_column_and_key() -> Result<()> {
    let dir = TempDir::new("relay-config")?;
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        r#"[metrics]
listen = "nonsense"

[[route]]
name = "web"
listen = "127.0.0.1:8080"
target = "127.0.0.1:80"
drain-timeout = "soon"

[[route]]
name = "web"
listen = "127.0.0.1:8080"
target = "127.0.0.1:80"
idle-timeout = "0"
"#,
    )?;
    let exited =
        RelayCmd::raw(&["check", "-c", &bad.to_string_lossy()]).run_to_exit(EXIT_TIMEOUT)?;
    let file = bad.display().to_string();
    let expected = [
        format!("{file}:2:10: metrics.listen: `nonsense` is not a metrics address"),
        format!("{file}:8:17: route[0].drain-timeout: `soon`"),
        format!("{file}:14:16: route[1].idle-timeout:"),
        format!("{file}:11:8: route[1].name: route name `web` is already used by route[0]"),
        format!(
            "{file}:12:10: route[1].listen: `127.0.0.1:8080` listens where route[0] already does"
        ),
        "5 problems".to_string(),
    ];
    let missing: Vec<&String> = expected
        .iter()
        .filter(|e| !exited.stderr.contains(e.as_str()))
        .collect();
    ensure!(
        exited.status.code() == Some(2) && missing.is_empty(),
        "relay check on a file with 5 problems: expected exit 2 naming each; got {} and missing {missing:?} in:\n{}",
        exited.status,
        exited.stderr
    );

    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[route]]\nlisten = \"127.0.0.1:8080\"\ntarget = \"127.0.0.1:80\"\n\n[[observe]]\ntarget = \"host\"\n",
    )?;
    let exited =
        RelayCmd::raw(&["check", "-c", &good.to_string_lossy()]).run_to_exit(EXIT_TIMEOUT)?;
    ensure!(
        exited.status.code() == Some(0) && exited.stderr.contains("ok (1 routes, 1 observers"),
        "relay check on a valid file: expected exit 0 and a summary, got {}:\n{}",
        exited.status,
        exited.stderr
    );
    Ok(())
}

/// The annotated example the docs point to is a valid file.
#[test]
fn the_example_config_file_checks_clean() -> Result<()> {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/relay.toml");
    let exited =
        RelayCmd::raw(&["check", "-c", &example.to_string_lossy()]).run_to_exit(EXIT_TIMEOUT)?;
    ensure!(
        exited.status.code() == Some(0),
        "relay check -c deploy/relay.toml: expected exit 0, got {}:\n{}",
        exited.status,
        exited.stderr
    );
    Ok(())
}

/// A file that cannot be read, a file with unknown keys, and route flags
/// beside `-c` are usage errors, each naming what is wrong.
#[test]
fn run_refuses_bad_files_and_route_flags_with_exit_2() -> Result<()> {
    let dir = TempDir::new("relay-config")?;
    let unknown = dir.join("unknown.toml");
    std::fs::write(
        &unknown,
        "[[route]]\nlisten = \"127.0.0.1:8080\"\ntarget = \"127.0.0.1:80\"\nconect-timeout = \"1s\"\n",
    )?;
    let missing = dir.join("missing.toml");
    let cases: [(Vec<String>, String); 3] = [
        (
            vec!["run".into(), "-c".into(), unknown.display().to_string()],
            format!(
                "{}:4:1: route[0].conect-timeout: unknown field",
                unknown.display()
            ),
        ),
        (
            vec!["run".into(), "-c".into(), missing.display().to_string()],
            format!("{}: cannot read the config file", missing.display()),
        ),
        (
            vec![
                "run".into(),
                "-c".into(),
                unknown.display().to_string(),
                "--connect-timeout".into(),
                "3s".into(),
            ],
            // `run` has no route options at all: its --help lists none.
            "unexpected argument '--connect-timeout'".to_string(),
        ),
    ];
    for (args, names) in cases {
        let exited = RelayCmd::raw(&args).run_to_exit(EXIT_TIMEOUT)?;
        ensure!(
            exited.status.code() == Some(2) && exited.stderr.contains(&names),
            "relay {}: expected exit 2 naming {names:?}, got {}:\n{}",
            args.join(" "),
            exited.status,
            exited.stderr
        );
    }
    Ok(())
}

/// `relay run` with no file runs the embedded default: the host's
/// interfaces observed, served for Prometheus (here on a free port, since
/// the default's 127.0.0.1:9100 may be taken on a test machine).
#[test]
fn run_without_a_file_observes_the_host() -> Result<()> {
    require_root!("attaches eBPF programs to the host's interfaces");
    let relay = RelayCmd::raw(&["run"]).with_metrics()?.spawn()?;
    let scrape = relay.scrape()?;
    let attached = scrape
        .matching("relay_observe_attached", &[("target", "host")])
        .count();
    ensure!(
        attached > 0,
        "relay run without a file: expected relay_observe_attached{{target=\"host\"}} series, got none in:\n{}",
        relay.stderr()
    );
    relay
        .signal(nix::sys::signal::Signal::SIGTERM)
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

//! The `relay` command line: parse, build the route, run it, and turn the
//! result into an exit code (2 for usage errors, 1 for runtime failures).
//! Everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use relay::addr::{self, ListenAddr, TargetAddr};
use relay::forward::metrics::ForwardMetrics;
use relay::forward::{DataPath, ForwardError, Forwarder, RouteConfig, data_path};
use relay::logging::{self, LogFormat};
use relay::metrics::{self, Metrics};
use relay::netns::Target;
use relay::observe::{self, ObserveError, ObserveOptions};
use relay::{duration, limits, tls};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "relay",
    version,
    about = "A TCP relay for container hosts: a drop-in for `socat TCP-LISTEN:..,fork TCP:..`, with metrics.",
    override_usage = "relay forward <LISTEN> <TARGET> [OPTIONS]\n       relay [OPTIONS] <ADDR1> <ADDR2>    (socat form, e.g. TCP-LISTEN:8080,fork TCP:127.0.0.1:80)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// socat form: the listening address, e.g. `TCP-LISTEN:8080,fork,reuseaddr`.
    #[arg(value_name = "ADDR1", value_parser = addr::parse_listen, requires = "socat_target")]
    socat_listen: Option<ListenAddr>,
    /// socat form: the address to connect to, e.g. `TCP:127.0.0.1:80`.
    #[arg(value_name = "ADDR2", value_parser = addr::parse_target)]
    socat_target: Option<TargetAddr>,
    #[command(flatten)]
    route: RouteArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Relay connections from a listen address to a target.
    Forward(Box<ForwardArgs>),
    /// Count the traffic of a container or network namespace with eBPF (needs root).
    Observe(ObserveArgs),
    /// Publish a running container's port on the host, even one bound to the container's localhost.
    Publish(PublishArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout (`relay man | man -l -`), or write every page to --dir.
    Man {
        /// Write relay.1 and relay-<subcommand>.1 into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ObserveArgs {
    /// What to observe: container:<name|id>, pid:<pid>, netns:<path|name>, or host.
    #[arg(value_parser = parse_observe_target)]
    target: Target,
    /// Interface to attach to (repeatable) [default: every one but lo].
    #[arg(long = "iface", value_name = "NAME")]
    interfaces: Vec<String>,
    /// Flows exported by name in relay_observe_top_flow_bytes; the rest are summed as rank="other".
    #[arg(long, default_value_t = 10)]
    top_flows: usize,
    /// Turn on the kernel's BPF run-time statistics while attached (program cost metrics).
    #[arg(long)]
    bpf_stats: bool,
    /// Show rates per interface and the top flows on the terminal, refreshed every second.
    #[arg(long)]
    watch: bool,
    /// When the target stops, wait for it to run again and re-attach.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    capture: observe::capture::CaptureArgs,
}

fn parse_observe_target(text: &str) -> Result<Target, String> {
    text.parse::<Target>().map_err(|e| e.to_string())
}

#[derive(Args)]
struct ForwardArgs {
    /// Where to listen: `host:port`, `[v6]:port`, `tcp://host:port` or `TCP-LISTEN:<port>[,opts]`.
    #[arg(value_parser = addr::parse_listen)]
    listen: ListenAddr,
    /// Where to connect: `host:port`, `[v6]:port`, `tcp://host:port` or `TCP:<host>:<port>[,opts]`.
    #[arg(value_parser = addr::parse_target)]
    target: TargetAddr,
    /// Also count the traffic of this target with eBPF (container:<name>, pid:<pid>, netns:<name|path>, host).
    #[arg(long, value_name = "TARGET", value_parser = parse_observe_target)]
    observe: Option<Target>,
    /// With --observe: sampled packets to pcapng.
    #[command(flatten)]
    capture: observe::capture::CaptureArgs,
}

#[derive(Args)]
struct PublishArgs {
    /// The container (name or id; or pid:<pid>, netns:<name|path>).
    container: String,
    /// The container's port, optionally with the host port: <port>[:<host-port>].
    #[arg(value_name = "PORT[:HOST-PORT]", value_parser = parse_port_pair)]
    ports: (u16, u16),
    /// Host address to listen on; publishing beyond this host is an explicit choice.
    #[arg(long, default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
    /// Also count the container's traffic with eBPF on the same /metrics.
    #[arg(long)]
    observe: bool,
}

fn parse_port_pair(text: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{p}` is not a port (1-65535)"))
    };
    match text.split_once(':') {
        Some((inner, outer)) => Ok((port(inner)?, port(outer)?)),
        None => port(text).map(|p| (p, p)),
    }
}

/// Options of a route; global, so they go before or after `forward`.
#[derive(Args)]
struct RouteArgs {
    /// Route name for metrics and logs [default: the listen address].
    #[arg(global = true, long)]
    name: Option<String>,
    /// Give up connecting to the target after this long.
    #[arg(global = true, long, value_parser = duration::parse, default_value = "10s")]
    connect_timeout: Duration,
    /// Close a connection with no bytes either way for this long (socat's -T); `none` never does.
    #[arg(global = true, long, short = 'T', value_name = "DURATION|none",
          default_value_t = duration::Timeout(Some(relay::forward::DEFAULT_IDLE_TIMEOUT)))]
    idle_timeout: duration::Timeout,
    /// Open connections at most; beyond it accepting pauses until one closes
    /// [default: 10000, or what the open-file limit holds if less].
    #[arg(global = true, long, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
    /// After SIGTERM/SIGINT, how long open connections may take to finish.
    #[arg(global = true, long, value_parser = duration::parse, default_value = "30s")]
    drain_timeout: Duration,
    /// How plain TCP bytes move: auto (the benchmark's winner, with fallback), copy, splice, or sockmap (eBPF, in the kernel; experimental, needs --experimental-sockmap). TLS legs always copy.
    #[arg(global = true, long, value_enum, default_value_t = DataPath::Auto)]
    data_path: DataPath,
    /// Allow --data-path sockmap, which has known defects (duplicated bytes over veth/TUN links, resets after a large write and half-close, no backpressure; README, Data paths).
    #[arg(global = true, long)]
    experimental_sockmap: bool,
    /// Serve Prometheus metrics at http://<addr>/metrics and readiness at /healthz; a bare port binds 127.0.0.1.
    #[arg(global = true, long, value_name = "ADDR|PORT", value_parser = metrics::parse_endpoint)]
    metrics: Option<SocketAddr>,
}

/// TLS options; global like the route options. Options written into a
/// socat address (`cafile=`, `cert=` ...) win over these.
#[derive(Args)]
#[command(next_help_heading = "TLS")]
struct TlsArgs {
    /// Trust roots for a TLS target: a PEM file, or a directory of *.crt/*.pem [default: system store].
    #[arg(global = true, long, value_name = "FILE|DIR")]
    tls_ca: Option<PathBuf>,
    /// SNI name sent to a TLS target [default: the target host].
    #[arg(global = true, long, value_name = "NAME")]
    tls_sni: Option<String>,
    /// Send no SNI to the TLS target.
    #[arg(global = true, long, conflicts_with = "tls_sni")]
    tls_no_sni: bool,
    /// Name the target's certificate must carry [default: the SNI name].
    #[arg(global = true, long, value_name = "NAME")]
    tls_name: Option<String>,
    /// Certificate (PEM): the listener's when it is TLS, else the client certificate for the target.
    #[arg(global = true, long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(global = true, long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Client certificate for a TLS target when the listener is TLS too.
    #[arg(global = true, long, value_name = "FILE")]
    tls_upstream_cert: Option<PathBuf>,
    /// Private key for --tls-upstream-cert.
    #[arg(global = true, long, value_name = "FILE")]
    tls_upstream_key: Option<PathBuf>,
    /// TLS listener: require client certificates signed by these roots.
    #[arg(global = true, long, value_name = "FILE|DIR")]
    tls_client_ca: Option<PathBuf>,
    /// TLS listener: accept only client certificates with this CN or DNS name (repeatable).
    #[arg(global = true, long, value_name = "NAME")]
    tls_allow_name: Vec<String>,
    /// ALPN protocols to offer (target) or accept (listener), comma-separated.
    #[arg(global = true, long, value_name = "PROTO,...", value_delimiter = ',')]
    tls_alpn: Vec<String>,
    /// Lowest TLS version accepted.
    #[arg(global = true, long, value_name = "1.2|1.3", default_value = "1.2", value_parser = ["1.2", "1.3"])]
    tls_min_version: String,
    /// Do not verify the TLS target's certificate (logged as a warning). socat: verify=0.
    #[arg(global = true, long)]
    tls_insecure: bool,
    /// Append NSS key log lines for both legs to this file [default: $SSLKEYLOGFILE].
    #[arg(global = true, long, value_name = "FILE")]
    tls_keylog: Option<PathBuf>,
    /// Give up a TLS handshake after this long.
    #[arg(global = true, long, value_parser = duration::parse, default_value = "10s")]
    tls_handshake_timeout: Duration,
}

impl TlsArgs {
    fn flags(&self) -> tls::settings::Flags {
        tls::settings::Flags {
            ca: self.tls_ca.clone(),
            sni: self.tls_sni.clone(),
            no_sni: self.tls_no_sni,
            name: self.tls_name.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            upstream_cert: self.tls_upstream_cert.clone(),
            upstream_key: self.tls_upstream_key.clone(),
            client_ca: self.tls_client_ca.clone(),
            allow_names: self.tls_allow_name.clone(),
            alpn: self.tls_alpn.clone(),
            tls13_only: self.tls_min_version == "1.3",
            insecure: self.tls_insecure,
            keylog: self.tls_keylog.clone(),
        }
    }
}

#[derive(Args)]
struct LogArgs {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;

enum Job {
    Forward(Box<Route>),
    Observe(ObserveArgs),
}

/// A route to serve, and what to observe beside it.
struct Route {
    listen: ListenAddr,
    target: TargetAddr,
    observe: Option<Target>,
    /// `--pcap` and friends, with `--observe`.
    capture: Option<observe::capture::CaptureOptions>,
}

/// `publish web 8080[:18080]`: listen on the host, connect to the port on
/// the container's own localhost from inside its namespace.
fn publish_route(args: PublishArgs) -> Result<Route, String> {
    let target: Target = if args.container.contains(':') {
        parse_observe_target(&args.container)?
    } else {
        parse_observe_target(&format!("container:{}", args.container))?
    };
    let (inner, outer) = args.ports;
    let listen = addr::parse_listen(&std::net::SocketAddr::new(args.bind, outer).to_string())
        .map_err(|e| e.to_string())?;
    let connect = addr::parse_target(&format!("tcp://127.0.0.1:{inner}@{}", target.spec()))
        .map_err(|e| e.to_string())?;
    Ok(Route {
        listen,
        target: connect,
        observe: args.observe.then_some(target),
        capture: None,
    })
}

/// SIGTERM and SIGINT, as one stream of named signals. SIGHUP is caught
/// too, so that a closing terminal or a `kill -HUP` meant as "reload" does
/// not end the relay without a drain: it is logged and ignored, since a
/// single-route relay has no configuration to read again.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())
                .context("cannot install the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt())
                .context("cannot install the SIGINT handler")?,
            hangup: signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?,
        })
    }

    /// The next signal that stops the relay.
    async fn next(&mut self) -> &'static str {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => return "SIGTERM",
                _ = self.interrupt.recv() => return "SIGINT",
                _ = self.hangup.recv() => tracing::warn!(
                    signal = "SIGHUP",
                    "ignored: this relay was started from the command line and has no configuration file to reload; stop it with SIGTERM"
                ),
            }
        }
    }
}

/// Starts the metrics endpoint when asked for.
async fn serve_metrics(addr: Option<SocketAddr>, registry: &Arc<Metrics>) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        let listener = metrics::bind(addr).await?;
        tracing::info!(
            "metrics on http://{}/metrics",
            listener.local_addr().unwrap_or(addr)
        );
        tokio::spawn(metrics::serve(listener, registry.clone()));
    }
    Ok(())
}

async fn watch_target(args: ObserveArgs, metrics_addr: Option<SocketAddr>) -> anyhow::Result<()> {
    let registry = Arc::new(Metrics::new());
    let options = observe::session::SessionOptions {
        observe: ObserveOptions {
            interfaces: args.interfaces,
            loopback: false,
            top_flows: args.top_flows,
            bpf_stats: args.bpf_stats,
            capture: None,
        },
        follow: args.follow,
        watch: args.watch,
        capture: args.capture.options(),
    };
    let mut signals = Signals::install()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let session = observe::session::Session::start(args.target, options, &registry).await?;
    let session = session.run(stop_rx);
    tokio::pin!(session);
    serve_metrics(metrics_addr, &registry).await?;
    tokio::select! {
        result = &mut session => return Ok(result?),
        signal = signals.next() => tracing::info!(signal, "stopping: detaching"),
    }
    stop_tx.send_replace(true);
    Ok(session.await?)
}

/// `relay man`: relay.1 on stdout, or with `--dir` relay.1 and one
/// relay-<subcommand>.1 per subcommand (the pages relay.1 refers to).
fn man_pages(dir: Option<PathBuf>) -> ExitCode {
    let command = Cli::command();
    let result = match &dir {
        None => clap_mangen::Man::new(command).render(&mut std::io::stdout().lock()),
        Some(dir) => {
            std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(command, dir))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let place = dir.map_or_else(|| "stdout".to_string(), |d| d.display().to_string());
            eprintln!("relay: error: cannot write man pages to {place}: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code for a usage error, as clap uses and socat scripts expect.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let job = match (cli.command, cli.socat_listen, cli.socat_target) {
        (Some(Command::Forward(args)), None, None)
            if args.capture.pcap.is_some() && args.observe.is_none() =>
        {
            eprintln!("relay: error: --pcap on forward needs --observe <TARGET> (what to capture)");
            return ExitCode::from(USAGE);
        }
        (Some(Command::Forward(args)), None, None) => Job::Forward(Box::new(Route {
            listen: args.listen,
            target: args.target,
            observe: args.observe,
            capture: args.capture.options(),
        })),
        (Some(Command::Publish(args)), None, None) => match publish_route(args) {
            Ok(route) => Job::Forward(Box::new(route)),
            Err(message) => {
                eprintln!("relay: error: {message}");
                return ExitCode::from(USAGE);
            }
        },
        (Some(Command::Observe(args)), None, None) if args.capture.pcap_embed_keys => {
            eprintln!(
                "relay: error: --pcap-embed-keys needs a TLS route: use it with relay forward <tls listener or target> --observe"
            );
            return ExitCode::from(USAGE);
        }
        (Some(Command::Observe(args)), None, None)
            if args.watch && args.capture.pcap == Some(observe::sink::Output::Stdout) =>
        {
            eprintln!(
                "relay: error: --watch draws on the terminal and --pcap - writes the capture to stdout: use one"
            );
            return ExitCode::from(USAGE);
        }
        (Some(Command::Observe(args)), None, None) => Job::Observe(args),
        (Some(Command::Completions { shell }), None, None) => {
            clap_complete::generate(shell, &mut Cli::command(), "relay", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        (Some(Command::Man { dir }), None, None) => return man_pages(dir),
        (None, Some(listen), Some(target)) => Job::Forward(Box::new(Route {
            listen,
            target,
            observe: None,
            capture: None,
        })),
        _ => {
            let _ = Cli::command().write_help(&mut std::io::stderr());
            return ExitCode::from(USAGE);
        }
    };
    if let Err(err) = data_path::require_opt_in(cli.route.data_path, cli.route.experimental_sockmap)
    {
        eprintln!("relay: error: {err}");
        return ExitCode::from(USAGE);
    }
    logging::init(
        cli.log.verbose as i8 - cli.log.quiet as i8,
        cli.log.log_format,
    );
    if cli.route.data_path == DataPath::Sockmap {
        // Once per process, before any route starts: the operator chose a
        // path known to lose data, and the log should say so where it begins.
        tracing::warn!(
            "--experimental-sockmap: running the sockmap data path, which has known defects: {}",
            data_path::SOCKMAP_DEFECTS
        );
    }
    let mut route = cli.route;
    let nofile = limits::raise_nofile().unwrap_or_else(|err| {
        tracing::warn!(error = %err, "cannot raise the open-file limit; the relay may run out of descriptors early");
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
    });
    let fits = u32::try_from(limits::connections_for(nofile)).unwrap_or(u32::MAX);
    route.max_connections = Some(match route.max_connections {
        Some(asked) if asked > fits => {
            tracing::warn!(
                requested = asked,
                nofile,
                max_connections = fits,
                "--max-connections lowered to what the open-file limit holds (two descriptors per connection)"
            );
            fits
        }
        Some(asked) => asked,
        None => DEFAULT_MAX_CONNECTIONS.min(fits),
    });

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("relay: error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match job {
        Job::Forward(job) => runtime.block_on(serve(*job, route, cli.tls)),
        Job::Observe(args) => runtime.block_on(watch_target(args, route.metrics)),
    };
    // Name lookups may still sit on blocking threads; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("relay: error: {err:#}");
            // Bad input (a TLS file, a flag that does not fit, a target
            // that does not exist) is a usage error.
            let usage = matches!(err.downcast_ref::<ForwardError>(), Some(e) if e.is_bad_input())
                || matches!(err.downcast_ref::<ObserveError>(), Some(e) if e.is_bad_input());
            if usage {
                ExitCode::from(USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn serve(route: Route, args: RouteArgs, tls_args: TlsArgs) -> anyhow::Result<()> {
    let Route {
        listen,
        target,
        observe,
        capture,
    } = route;
    // First, so that no signal meant for a drain ends the relay abruptly.
    let mut signals = Signals::install()?;
    let name = args.name.unwrap_or_else(|| listen.text.clone());
    let (mut tls_server, mut tls_client) =
        tls::settings::resolve(&listen, &target, &tls_args.flags()).map_err(ForwardError::from)?;
    if let Some(keys) = capture.as_ref().and_then(|c| c.keys.clone()) {
        // --pcap-embed-keys: every key log line of either leg also goes into the capture.
        let legs = [
            tls_server.as_mut().map(|s| &mut s.common),
            tls_client.as_mut().map(|c| &mut c.common),
        ];
        let mut tls_legs = 0;
        for common in legs.into_iter().flatten() {
            let keys = keys.clone();
            let tee =
                tls::keylog::KeyLogTee::new(common.keylog.take(), move |line| keys.push(line));
            common.keylog = Some(Arc::new(tee));
            tls_legs += 1;
        }
        if tls_legs == 0 {
            return Err(ForwardError::from(tls::TlsError::Config(
                "--pcap-embed-keys needs a TLS listener or target (tls://... or OPENSSL:...)"
                    .into(),
            ))
            .into());
        }
    }
    let config = RouteConfig {
        listen,
        target,
        connect_timeout: args.connect_timeout,
        idle_timeout: args.idle_timeout.0,
        max_connections: args.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS) as usize,
        drain_timeout: args.drain_timeout,
        tls_server,
        tls_client,
        handshake_timeout: tls_args.tls_handshake_timeout,
        data_path: args.data_path,
    };
    let registry = Arc::new(Metrics::new());
    let target_text = config.target.text.clone();
    let route_metrics = ForwardMetrics::register(registry.registry()).route(&name);
    let forwarder = Forwarder::bind(config, route_metrics).await?;
    let listening = registry
        .readiness()
        .register("listener", &forwarder.local_addr().to_string());
    listening.set(true);
    // The observer follows its target across restarts (a forwarder does not
    // stop because the container it watches did) and includes loopback,
    // where a published container port is reached.
    let (stop_observer, observer_stop) = watch::channel(false);
    let observer = match observe {
        Some(target) => {
            let options = observe::session::SessionOptions {
                observe: ObserveOptions {
                    loopback: true,
                    ..ObserveOptions::default()
                },
                follow: true,
                watch: false,
                capture,
            };
            let session = observe::session::Session::start(target, options, &registry).await?;
            Some(tokio::spawn(session.run(observer_stop)))
        }
        None => None,
    };
    serve_metrics(args.metrics, &registry).await?;
    tracing::info!(route = %name, upstream = %target_text, "listening on {}", forwarder.local_addr());

    let (drain_tx, drain_rx) = watch::channel(false);
    let run = forwarder.run(drain_rx);
    tokio::pin!(run);
    tokio::select! {
        () = &mut run => {
            stop_observer.send_replace(true);
            return Ok(());
        }
        signal = signals.next() => tracing::info!(signal, "stopping: no new connections; a second signal exits at once"),
    }
    // A draining relay accepts nothing more: orchestrators should stop sending.
    listening.set(false);
    drain_tx.send_replace(true);
    tokio::select! {
        () = &mut run => {}
        signal = signals.next() => anyhow::bail!("{signal} during drain: exiting at once"),
    }
    stop_observer.send_replace(true);
    if let Some(observer) = observer {
        observer.await.context("observer task")??;
    }
    Ok(())
}

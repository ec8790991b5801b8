//! The `relay` command line: parse it into a spec (`forward`, the socat
//! form, `publish` and `observe` are sugar for one; `run -c` reads one from
//! a file), run it, and turn the result into an exit code (2 for usage
//! errors, 1 for runtime failures). Everything else lives in the library.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use relay::addr::{self, ListenAddr, TargetAddr};
use relay::config::{
    self, ContainersSpec, Observed, ObserverSpec, RouteSpec, Spec, file::Problems,
};
use relay::duration::{self, Dur};
use relay::forward::dump::{Dump, DumpMode};
use relay::forward::{DataPath, Flow, data_path};
use relay::logging::{self, LogFormat};
use relay::metrics;
use relay::netns::Target;
use relay::observe::discover::{self, Rule, Selection, Sources};
use relay::observe::{self, ObserveOptions};
use relay::{limits, run, socat_flags, tls};

#[derive(Parser)]
#[command(
    name = "relay",
    version,
    about = "A network relay and observer for container hosts: forwards TCP and TLS (a drop-in for socat, stunnel, docker-proxy) and counts and captures a container's traffic with eBPF, for Prometheus and Wireshark.",
    override_usage = "relay run [-c relay.toml]\n       relay forward <LISTEN> <TARGET> [OPTIONS]\n       relay [OPTIONS] <ADDR1> <ADDR2>    (socat form, e.g. TCP-LISTEN:8080,fork TCP:127.0.0.1:80)\n       relay observe <TARGET> [OPTIONS]"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// socat form: the listening address, e.g. `TCP-LISTEN:8080,fork,reuseaddr`, `UNIX-LISTEN:/run/x.sock,fork` or `-` (STDIO).
    #[arg(value_name = "ADDR1", requires = "socat_target")]
    socat_listen: Option<String>,
    /// socat form: the address to connect to, e.g. `TCP:127.0.0.1:80`, `UNIX-CONNECT:/var/run/docker.sock` or `-` (STDIO); the two may come in either order.
    #[arg(value_name = "ADDR2")]
    socat_target: Option<String>,
    /// socat form: print what relay will do with these two addresses (each option, and where socat differs) and exit: 0, or 2 with the error a run would give.
    #[arg(long, requires = "socat_target")]
    explain: bool,
    /// socat's -u / -U, as the socat form's flags translate them: the address read, `first` or `second`.
    #[arg(long = "socat-unidirectional", hide = true, value_parser = ["first", "second"], requires = "socat_target")]
    socat_unidirectional: Option<String>,
    /// socat's -4 / -6, as the socat form's flags translate them.
    #[arg(long = "socat-family", hide = true, value_parser = ["4", "6"], requires = "socat_target")]
    socat_family: Option<String>,
    #[command(flatten)]
    route: RouteArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the routes and observers of a config file (TOML); with no file, observe this host with /metrics on 127.0.0.1:9100.
    Run {
        /// The config file (docs/CONFIG.md; an annotated example is deploy/relay.toml); SIGHUP reloads it.
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Also reload when the file changes (checked every second).
        #[arg(long, requires = "config")]
        watch_config: bool,
        /// Replace the relay serving this handover socket (its `[upgrade] socket`): take its listening sockets, serve, then it drains and exits; no connection is refused.
        #[arg(long, value_name = "SOCKET")]
        upgrade_from: Option<PathBuf>,
        /// Serve /metrics here instead of where the file says (a bare port binds 127.0.0.1).
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Check a config file without serving: every problem with file:line:column and key; exit 2 on any.
    Check {
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: PathBuf,
    },
    /// Relay connections from a listen address to a target.
    Forward(Box<ForwardArgs>),
    /// Count the traffic of a container or network namespace with eBPF (needs root).
    Observe(Box<ObserveArgs>),
    /// Publish a running container's port on the host, even one bound to the container's localhost.
    Publish(Box<PublishArgs>),
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
    /// What to observe: container:<name|id>, pid:<pid>, netns:<path|name>, host, or `containers` (every running container, or those --select takes, followed as they start and stop).
    #[arg(value_parser = parse_observed)]
    target: Observed,
    /// With `containers`: only those matching name=GLOB, label=KEY, label=KEY=GLOB or image=GLOB (repeatable: all must match).
    #[arg(long = "select", value_name = "RULE", value_parser = parse_select)]
    select: Vec<Rule>,
    /// With `containers`: attach at most this many; more are refused and counted.
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_CONTAINERS)]
    max_containers: usize,
    /// With `containers`: where they are found: docker, containerd (Kubernetes nodes), netns (every network namespace under /var/run/netns and /proc), or auto (the daemons that answer; the namespaces while none does).
    #[arg(long, value_name = "SOURCE", default_value = "auto", value_parser = parse_sources)]
    source: Sources,
    /// With `containers`: the Docker daemon's API socket.
    #[arg(long, value_name = "PATH", default_value = relay::netns::DEFAULT_SOCKET)]
    docker_socket: PathBuf,
    /// With `containers`: containerd's API socket.
    #[arg(long, value_name = "PATH", default_value = discover::containerd::DEFAULT_SOCKET)]
    containerd_socket: PathBuf,
    /// With `containers`: a containerd namespace to list (repeatable) [default: k8s.io and default].
    #[arg(long = "containerd-namespace", value_name = "NAME")]
    containerd_namespaces: Vec<String>,
    /// Interface to attach to (repeatable) [default: every one but lo].
    #[arg(long = "iface", value_name = "NAME")]
    interfaces: Vec<String>,
    /// Flows exported by name in relay_observe_top_flow_bytes; the rest are summed as rank="other".
    #[arg(long, default_value_t = config::DEFAULT_TOP_FLOWS)]
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
    #[command(flatten)]
    metrics: MetricsArgs,
}

fn parse_sources(text: &str) -> Result<Sources, String> {
    text.parse()
}

/// `containers`, or one target.
fn parse_observed(text: &str) -> Result<Observed, String> {
    if text == "containers" {
        return Ok(Observed::Containers(ContainersSpec::default()));
    }
    parse_observe_target(text).map(Observed::Target)
}

fn parse_select(text: &str) -> Result<Rule, String> {
    text.parse::<Rule>().map_err(|e| e.to_string())
}

fn parse_observe_target(text: &str) -> Result<Target, String> {
    text.parse::<Target>().map_err(|e| e.to_string())
}

#[derive(Args)]
struct ForwardArgs {
    /// Where to listen: `host:port`, `[v6]:port`, `tcp://host:port`, `udp://host:port` or `TCP-LISTEN:<port>[,opts]`.
    #[arg(value_parser = addr::parse_listen)]
    listen: ListenAddr,
    /// Where to connect: `host:port`, `[v6]:port`, `tcp://host:port`, `udp://host:port` (with a UDP listener) or `TCP:<host>:<port>[,opts]`.
    #[arg(value_parser = addr::parse_target)]
    target: TargetAddr,
    /// Also count the traffic of this target with eBPF (container:<name>, pid:<pid>, netns:<name|path>, host).
    #[arg(long, value_name = "TARGET", value_parser = parse_observe_target)]
    observe: Option<Target>,
    /// With --observe: sampled packets to pcapng.
    #[command(flatten)]
    capture: observe::capture::CaptureArgs,
    #[command(flatten)]
    route: RouteArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
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
    #[command(flatten)]
    route: RouteArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
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

/// Options of a command-line route: the socat form, `forward` and
/// `publish` each take them (after the subcommand), so each one's `--help`
/// lists what applies to it.
#[derive(Args)]
#[command(next_help_heading = "Route")]
struct RouteArgs {
    /// Route name for metrics and logs [default: the listen address].
    #[arg(long)]
    name: Option<String>,
    /// Give up connecting to the target after this long.
    #[arg(long, default_value_t = Dur(config::DEFAULT_CONNECT_TIMEOUT))]
    connect_timeout: Dur,
    /// Close a connection with no bytes either way for this long (socat's -T); `none` never does.
    #[arg(long, short = 'T', value_name = "DURATION|none",
          default_value_t = duration::Timeout(Some(config::DEFAULT_IDLE_TIMEOUT)))]
    idle_timeout: duration::Timeout,
    /// Open connections at most; beyond it accepting pauses until one closes
    /// [default: 10000, or what the open-file limit holds if less].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
    /// UDP routes: sessions (client addresses) at most; a new client beyond it has its datagrams dropped, counted as limited.
    #[arg(long, default_value_t = config::DEFAULT_MAX_SESSIONS, value_parser = clap::value_parser!(u32).range(1..))]
    max_sessions: u32,
    /// After SIGTERM/SIGINT, how long open connections may take to finish.
    #[arg(long, default_value_t = Dur(config::DEFAULT_DRAIN_TIMEOUT))]
    drain_timeout: Dur,
    /// How plain TCP bytes move: auto (the benchmark's winner, with fallback), copy, splice, or sockmap (eBPF, in the kernel; experimental, needs --experimental-sockmap). TLS legs always copy.
    #[arg(long, value_enum, default_value_t = DataPath::Auto)]
    data_path: DataPath,
    /// Allow --data-path sockmap, which has known defects (duplicated bytes over veth/TUN links, resets after a large write and half-close, no backpressure; README, Data paths).
    #[arg(long)]
    experimental_sockmap: bool,
    /// Relay one direction only: to-target (the client's bytes), or to-client (the target's); what the other side sends is read and dropped. socat: -u / -U.
    #[arg(long, value_enum, value_name = "to-target|to-client")]
    one_way: Option<Flow>,
    /// Once one side has closed, close the connection after this long even if the other direction still runs (socat's -t) [default: never; 0.5s one way].
    #[arg(long, value_name = "DURATION")]
    half_close_timeout: Option<Dur>,
    /// The copy path's buffer per direction at most this many bytes (socat's -b) [default: it grows from 16 KiB to 1 MiB as reads fill it]; splice and sockmap have none.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    block_size: Option<u32>,
    /// Also write every block relayed to stderr, as socat's -v (text), -x (hex) or -v -x (both) show it; the route copies.
    #[arg(long, value_enum, value_name = "text|hex|both")]
    dump: Option<DumpMode>,
}

/// Where `/metrics` is served: every command that runs something takes it.
#[derive(Args)]
#[command(next_help_heading = "Metrics")]
struct MetricsArgs {
    /// Serve Prometheus metrics at http://<addr>/metrics and readiness at /healthz; a bare port binds 127.0.0.1.
    #[arg(long, value_name = "ADDR|PORT", value_parser = metrics::parse_endpoint)]
    metrics: Option<SocketAddr>,
}

/// TLS options of a command-line route. Options written into a socat address (`cafile=`, `cert=` ...) win over these.
#[derive(Args)]
#[command(next_help_heading = "TLS")]
struct TlsArgs {
    /// Trust roots for a TLS target: a PEM file, or a directory of *.crt/*.pem [default: system store].
    #[arg(long, value_name = "FILE|DIR")]
    tls_ca: Option<PathBuf>,
    /// SNI name sent to a TLS target [default: the target host].
    #[arg(long, value_name = "NAME")]
    tls_sni: Option<String>,
    /// Send no SNI to the TLS target.
    #[arg(long, conflicts_with = "tls_sni")]
    tls_no_sni: bool,
    /// Name the target's certificate must carry [default: the SNI name].
    #[arg(long, value_name = "NAME")]
    tls_name: Option<String>,
    /// Certificate (PEM): the listener's when it is TLS, else the client certificate for the target.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Client certificate for a TLS target when the listener is TLS too.
    #[arg(long, value_name = "FILE")]
    tls_upstream_cert: Option<PathBuf>,
    /// Private key for --tls-upstream-cert.
    #[arg(long, value_name = "FILE")]
    tls_upstream_key: Option<PathBuf>,
    /// TLS listener: require client certificates signed by these roots.
    #[arg(long, value_name = "FILE|DIR")]
    tls_client_ca: Option<PathBuf>,
    /// TLS listener: accept only client certificates with this CN or DNS name (repeatable).
    #[arg(long, value_name = "NAME")]
    tls_allow_name: Vec<String>,
    /// ALPN protocols to offer (target) or accept (listener), comma-separated.
    #[arg(long, value_name = "PROTO,...", value_delimiter = ',')]
    tls_alpn: Vec<String>,
    /// Lowest TLS version accepted.
    #[arg(long, value_name = "1.2|1.3", default_value = "1.2", value_parser = ["1.2", "1.3"])]
    tls_min_version: String,
    /// Do not verify the TLS target's certificate (logged as a warning). socat: verify=0.
    #[arg(long)]
    tls_insecure: bool,
    /// Append NSS key log lines for both legs to this file [default: $SSLKEYLOGFILE].
    #[arg(long, value_name = "FILE")]
    tls_keylog: Option<PathBuf>,
    /// Give up a TLS handshake after this long.
    #[arg(long, default_value_t = Dur(config::DEFAULT_HANDSHAKE_TIMEOUT))]
    tls_handshake_timeout: Dur,
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
#[command(next_help_heading = "Logging")]
struct LogArgs {
    /// More log output (-v debug, -vv trace; in the socat form, where -v is socat's data dump, --verbose).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Append log lines to this file instead of stderr (socat's -lf).
    #[arg(long, value_name = "FILE", global = true)]
    log_file: Option<PathBuf>,
}

impl RouteArgs {
    /// A route from `listen` to `target` with these options.
    fn spec(&self, listen: ListenAddr, target: TargetAddr, tls: &TlsArgs) -> RouteSpec {
        let mut route = RouteSpec::new(listen, target);
        if let Some(name) = &self.name {
            route.name = name.clone();
        }
        route.connect_timeout = self.connect_timeout.0;
        route.idle_timeout = self.idle_timeout.0;
        // --max-connections wins over a `max-children=` in the address.
        if self.max_connections.is_some() {
            route.max_connections = self.max_connections;
        }
        route.max_sessions = self.max_sessions;
        route.drain_timeout = self.drain_timeout.0;
        route.data_path = self.data_path;
        route.experimental_sockmap = self.experimental_sockmap;
        route.flow = self.one_way.unwrap_or_default();
        route.half_close_timeout = self.half_close_timeout.map(|d| d.0);
        route.block_size = self.block_size.map(|b| b as usize);
        route.dump = self.dump.map(|mode| Dump {
            mode,
            listener_second: false,
        });
        route.tls = tls.flags();
        route.handshake_timeout = tls.tls_handshake_timeout.0;
        route
    }
}

/// `publish web 8080[:18080]`: listen on the host, connect to the port on
/// the container's own localhost from inside its namespace.
fn publish_route(args: PublishArgs) -> Result<RouteSpec, String> {
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
    let mut spec = args.route.spec(listen, connect, &args.tls);
    spec.observe = args.observe.then_some(target);
    Ok(spec)
}

/// `relay observe`: one observer.
fn observer(args: ObserveArgs) -> ObserverSpec {
    let observed = match args.target {
        Observed::Containers(_) => Observed::Containers(ContainersSpec {
            select: Selection { rules: args.select },
            max_containers: args.max_containers,
            source: args.source,
            docker_socket: args.docker_socket,
            containerd_socket: args.containerd_socket,
            containerd_namespaces: if args.containerd_namespaces.is_empty() {
                ContainersSpec::default().containerd_namespaces
            } else {
                args.containerd_namespaces
            },
        }),
        target => target,
    };
    ObserverSpec {
        observed,
        session: observe::session::SessionOptions {
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
        },
    }
}

/// What the command line asks for.
enum Plan {
    Run(Spec, run::Source),
    Check(PathBuf),
    /// Done already (help, completions, man pages, a refusal).
    Exit(ExitCode),
}

/// A usage error: the message, exit 2.
fn usage(message: impl std::fmt::Display) -> Plan {
    eprintln!("relay: error: {message}");
    Plan::Exit(ExitCode::from(USAGE))
}

/// The spec a command line describes.
fn plan(cli: Cli) -> Plan {
    let one_route = |route: RouteSpec, metrics: &MetricsArgs| {
        Plan::Run(
            Spec {
                routes: vec![route],
                observers: Vec::new(),
                metrics: metrics.metrics,
                upgrade_socket: None,
            },
            run::Source::command_line(),
        )
    };
    let Cli {
        command,
        socat_listen,
        socat_target,
        explain,
        socat_unidirectional,
        socat_family,
        route,
        tls,
        metrics,
        ..
    } = cli;
    match (command, socat_listen, socat_target) {
        (Some(Command::Forward(args)), None, None)
            if args.capture.pcap.is_some() && args.observe.is_none() =>
        {
            usage("--pcap on forward needs --observe <TARGET> (what to capture)")
        }
        (Some(Command::Forward(args)), None, None) => {
            let args = *args;
            if let Err(err) = addr::check_route(&args.listen, &args.target) {
                return usage(err);
            }
            let mut spec = args.route.spec(args.listen, args.target, &args.tls);
            spec.observe = args.observe;
            spec.capture = args.capture.options();
            one_route(spec, &args.metrics)
        }
        (Some(Command::Publish(args)), None, None) => {
            let metrics = MetricsArgs {
                metrics: args.metrics.metrics,
            };
            match publish_route(*args) {
                Ok(spec) => one_route(spec, &metrics),
                Err(message) => usage(message),
            }
        }
        (Some(Command::Observe(args)), None, None) if args.capture.pcap_embed_keys => usage(
            "--pcap-embed-keys needs a TLS route: use it with relay forward <tls listener or target> --observe",
        ),
        (Some(Command::Observe(args)), None, None)
            if args.watch && args.capture.pcap == Some(observe::sink::Output::Stdout) =>
        {
            usage(
                "--watch draws on the terminal and --pcap - writes the capture to stdout: use one",
            )
        }
        (Some(Command::Observe(args)), None, None)
            if !matches!(args.target, Observed::Containers(_)) && !args.select.is_empty() =>
        {
            usage("--select chooses among containers: use it with `relay observe containers`")
        }
        (Some(Command::Observe(args)), None, None)
            if matches!(args.target, Observed::Containers(_))
                && (args.capture.pcap.is_some() || args.follow) =>
        {
            usage(
                "`relay observe containers` follows every container by itself (no --follow) and has no --pcap yet: observe one container:<name> to capture",
            )
        }
        (Some(Command::Observe(args)), None, None) if args.max_containers == 0 => {
            usage("--max-containers must be at least 1")
        }
        (Some(Command::Observe(args)), None, None) => Plan::Run(
            Spec {
                routes: Vec::new(),
                metrics: args.metrics.metrics,
                observers: vec![observer(*args)],
                upgrade_socket: None,
            },
            run::Source::command_line(),
        ),
        (
            Some(Command::Run {
                config,
                watch_config,
                upgrade_from,
                metrics,
            }),
            None,
            None,
        ) => {
            let loaded = match &config {
                Some(path) => config::file::load(path),
                None => {
                    config::file::parse(Path::new("<embedded default>"), config::EMBEDDED_DEFAULT)
                        .map(|spec| (spec, config::EMBEDDED_DEFAULT.to_string()))
                }
            };
            match loaded {
                Ok((mut spec, text)) => {
                    if metrics.metrics.is_some() {
                        spec.metrics = metrics.metrics;
                    }
                    let source = run::Source {
                        file: config,
                        watch: watch_config,
                        hash: run::config_hash(&text),
                        metrics_override: metrics.metrics,
                        upgrade_from,
                    };
                    Plan::Run(spec, source)
                }
                Err(problems) => {
                    report(&problems);
                    Plan::Exit(ExitCode::from(USAGE))
                }
            }
        }
        (Some(Command::Check { config }), None, None) => Plan::Check(config),
        (Some(Command::Completions { shell }), None, None) => {
            clap_complete::generate(shell, &mut Cli::command(), "relay", &mut std::io::stdout());
            Plan::Exit(ExitCode::SUCCESS)
        }
        (Some(Command::Man { dir }), None, None) => Plan::Exit(man_pages(dir)),
        (None, Some(first), Some(second)) if explain => {
            match relay::socat_table::explain(&first, &second) {
                Ok(text) => {
                    print!("{text}");
                    Plan::Exit(ExitCode::SUCCESS)
                }
                Err(err) => usage(err),
            }
        }
        (None, Some(first), Some(second)) => match socat_flags::pair(
            &first,
            &second,
            socat_unidirectional.as_deref(),
            socat_family.as_deref(),
        ) {
            Ok(pair) => {
                let mut spec = route.spec(pair.listen, pair.target, &tls);
                // -u / -U, when given; else what --one-way said.
                if pair.flow != Flow::Both {
                    spec.flow = pair.flow;
                }
                if let Some(dump) = &mut spec.dump {
                    dump.listener_second = pair.listener_second;
                }
                one_route(spec, &metrics)
            }
            Err(err) => usage(err),
        },
        _ => {
            let _ = Cli::command().write_help(&mut std::io::stderr());
            Plan::Exit(ExitCode::from(USAGE))
        }
    }
}

/// The route, TLS and metrics options before a subcommand are the socat
/// form's; a subcommand takes its own after its name. Says which option
/// was written where, if one was.
fn option_before_subcommand(matches: &ArgMatches) -> Option<String> {
    let (subcommand, _) = matches.subcommand()?;
    let top = Cli::command();
    top.get_arguments()
        .filter(|arg| !arg.is_global_set() && arg.get_long().is_some())
        .find(|arg| matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine))
        .map(|arg| {
            let flag = format!("--{}", arg.get_long().unwrap_or_default());
            let takes = top
                .find_subcommand(subcommand)
                .is_some_and(|sub| sub.get_arguments().any(|a| a.get_long() == arg.get_long()));
            if takes {
                format!("{flag} goes after the subcommand: relay {subcommand} ... {flag} ...")
            } else {
                format!(
                    "{flag} does not apply to `relay {subcommand}` (see relay {subcommand} --help)"
                )
            }
        })
}

fn report(problems: &Problems) {
    for problem in &problems.0 {
        eprintln!("relay: error: {problem}");
    }
}

/// `relay check -c FILE`: exit 0 with a summary, or 2 with every problem.
fn check(path: &Path) -> ExitCode {
    match config::file::load(path) {
        Ok((spec, _)) => {
            println!(
                "{}: ok ({} routes, {} observers, metrics {})",
                path.display(),
                spec.routes.len(),
                spec.observers.len(),
                spec.metrics
                    .map_or_else(|| "off".to_string(), |a| format!("on {a}"))
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            report(&problems);
            eprintln!(
                "relay: {}: {} problem{}",
                path.display(),
                problems.0.len(),
                if problems.0.len() == 1 { "" } else { "s" }
            );
            ExitCode::from(USAGE)
        }
    }
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

/// The static build (`cargo xtask dist`) links libpcap.a, whose D-Bus
/// capture source pulls in libdbus-1.a, which refers to two functions of
/// libsystemd (socket activation of a D-Bus *daemon*) that Debian ships no
/// static library for. Nothing in relay calls them (libpcap's D-Bus source
/// is a client, and relay only compiles filters): these answer "no
/// sockets passed" should anything ever ask.
#[cfg(target_feature = "crt-static")]
mod libsystemd_for_static_libdbus {
    use std::ffi::c_int;

    #[unsafe(no_mangle)]
    extern "C" fn sd_listen_fds(_unset_environment: c_int) -> c_int {
        0
    }

    #[unsafe(no_mangle)]
    extern "C" fn sd_is_socket(
        _fd: c_int,
        _family: c_int,
        _kind: c_int,
        _listening: c_int,
    ) -> c_int {
        0
    }
}

/// Whether relay's own top-level option `flag` consumes the next argument.
fn takes_value(command: &clap::Command, flag: &str) -> bool {
    let is_flag = |arg: &&clap::Arg| match flag.strip_prefix("--") {
        Some(long) => arg.get_long() == Some(long),
        None => {
            let mut chars = flag.chars().skip(1);
            matches!((chars.next(), chars.next()), (Some(c), None) if arg.get_short() == Some(c))
        }
    };
    command
        .get_arguments()
        .find(is_flag)
        .is_some_and(|arg| arg.get_action().takes_values())
}

/// The command line, with the socat form's global flags translated
/// (`socat_flags`), and the log level its `-d` flags set; `Err` is a
/// refused flag, already reported.
fn arguments() -> Result<(Vec<OsString>, Option<i8>), ExitCode> {
    let args: Vec<OsString> = std::env::args_os().collect();
    // Arguments that are not UTF-8 are file names, not socat flags.
    let Some(strings) = args[1.min(args.len())..]
        .iter()
        .map(|a| a.to_str().map(String::from))
        .collect::<Option<Vec<String>>>()
    else {
        return Ok((args, None));
    };
    let command = Cli::command();
    if !socat_flags::is_socat_form(&strings, |flag| takes_value(&command, flag)) {
        return Ok((args, None));
    }
    match socat_flags::translate(&strings) {
        Ok(translated) => Ok((
            args.iter()
                .take(1)
                .cloned()
                .chain(translated.args.into_iter().map(OsString::from))
                .collect(),
            translated.verbosity,
        )),
        Err(err) => {
            eprintln!("relay: error: {err}");
            Err(ExitCode::from(USAGE))
        }
    }
}

fn main() -> ExitCode {
    let (args, socat_verbosity) = match arguments() {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    let matches = Cli::command().get_matches_from(args);
    if let Some(refused) = option_before_subcommand(&matches) {
        eprintln!("relay: error: {refused}");
        return ExitCode::from(USAGE);
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    let (verbosity, log_format) = (
        socat_verbosity.unwrap_or(0) + cli.log.verbose as i8 - cli.log.quiet as i8,
        cli.log.log_format,
    );
    let cli_log_file = cli.log.log_file.clone();
    let (mut spec, source) = match plan(cli) {
        Plan::Run(spec, source) => (spec, source),
        Plan::Check(path) => return check(&path),
        Plan::Exit(code) => return code,
    };
    for route in &spec.routes {
        if let Err(err) = data_path::require_opt_in(route.data_path, route.experimental_sockmap) {
            eprintln!("relay: error: {err}");
            return ExitCode::from(USAGE);
        }
        if let Err(err) = route.flow.check(&route.listen, &route.target) {
            eprintln!("relay: error: {err}");
            return ExitCode::from(USAGE);
        }
    }
    if let Err(err) = logging::init(verbosity, log_format, cli_log_file.as_deref()) {
        eprintln!("relay: error: {err}");
        return ExitCode::from(USAGE);
    }
    if spec.routes.iter().any(|r| r.data_path == DataPath::Sockmap) {
        // Once per process, before any route starts: the operator chose a
        // path known to lose data, and the log should say so where it begins.
        tracing::warn!(
            "--experimental-sockmap: running the sockmap data path, which has known defects: {}",
            data_path::SOCKMAP_DEFECTS
        );
    }
    limits::fit_connections(&mut spec);
    // SAFETY: taking the sockets unsets LISTEN_* so that no child sees
    // them; no other thread runs yet (the runtime starts below).
    let inherited = match unsafe { run::Inherited::from_systemd() } {
        Ok(inherited) => inherited,
        Err(err) => {
            eprintln!("relay: error: {err}");
            return ExitCode::FAILURE;
        }
    };
    if !inherited.names().is_empty() {
        tracing::info!(sockets = ?inherited.names(), "systemd passed listening sockets");
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("relay: error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run::run(spec, source, inherited));
    // Name lookups may still sit on blocking threads; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Bad input (a TLS file, a flag that does not fit, a target
            // that does not exist) is a usage error.
            let code = if err.is_bad_input() {
                ExitCode::from(USAGE)
            } else {
                ExitCode::FAILURE
            };
            eprintln!("relay: error: {:#}", anyhow::Error::from(err));
            code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The long options `relay <subcommand> --help` lists.
    fn options_of(subcommand: &str) -> Vec<String> {
        let mut command = Cli::command();
        command.build();
        let sub = command
            .find_subcommand(subcommand)
            .unwrap_or_else(|| panic!("no subcommand {subcommand}"));
        sub.get_arguments()
            .filter(|arg| !arg.is_hide_set())
            .filter_map(|arg| arg.get_long().map(str::to_string))
            .collect()
    }

    #[test]
    fn each_subcommand_lists_only_the_options_that_apply_to_it() {
        let route_and_tls = ["name", "connect-timeout", "data-path", "tls-ca", "tls-cert"];
        for sub in ["forward", "publish"] {
            let options = options_of(sub);
            for option in route_and_tls.iter().chain(&["metrics"]) {
                assert!(
                    options.iter().any(|o| o == option),
                    "{sub} lacks --{option}: {options:?}"
                );
            }
        }
        for sub in ["observe", "run", "check", "completions", "man"] {
            let options = options_of(sub);
            for option in route_and_tls {
                assert!(
                    !options.iter().any(|o| o == option),
                    "{sub} lists --{option}: {options:?}"
                );
            }
        }
        assert!(options_of("observe").iter().any(|o| o == "metrics"));
        assert!(options_of("run").iter().any(|o| o == "metrics"));
        // The log options apply everywhere.
        assert!(options_of("check").iter().any(|o| o == "log-format"));
    }

    fn matches(args: &[&str]) -> ArgMatches {
        Cli::command()
            .try_get_matches_from(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn route_options_go_after_the_subcommand() {
        let after = matches(&[
            "relay",
            "forward",
            "127.0.0.1:1",
            "127.0.0.1:2",
            "--name",
            "web",
        ]);
        assert_eq!(option_before_subcommand(&after), None);
        let before = matches(&[
            "relay",
            "--name",
            "web",
            "forward",
            "127.0.0.1:1",
            "127.0.0.1:2",
        ]);
        assert_eq!(
            option_before_subcommand(&before).as_deref(),
            Some("--name goes after the subcommand: relay forward ... --name ...")
        );
        let tls_on_observe = matches(&["relay", "--tls-ca", "x.pem", "observe", "host"]);
        assert_eq!(
            option_before_subcommand(&tls_on_observe).as_deref(),
            Some("--tls-ca does not apply to `relay observe` (see relay observe --help)")
        );
        // The socat form takes them anywhere after `relay`.
        let socat = matches(&["relay", "--name", "web", "TCP-LISTEN:1", "TCP:127.0.0.1:2"]);
        assert_eq!(option_before_subcommand(&socat), None);
        // The log options go anywhere.
        let verbose = matches(&["relay", "-v", "observe", "host"]);
        assert_eq!(option_before_subcommand(&verbose), None);
    }
}

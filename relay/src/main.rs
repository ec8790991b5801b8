//! The `relay` command line: parse, build the route, run it, and turn the
//! result into an exit code (2 for usage errors, 1 for runtime failures).
//! Everything else lives in the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use relay::addr::{self, ListenAddr, TargetAddr};
use relay::forward::{Forwarder, RouteConfig};
use relay::logging::{self, LogFormat};
use relay::metrics::{self, Metrics};
use relay::{duration, limits};
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
    log: LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Relay connections from a listen address to a target.
    Forward(ForwardArgs),
}

#[derive(Args)]
struct ForwardArgs {
    /// Where to listen: `host:port`, `[v6]:port`, `tcp://host:port` or `TCP-LISTEN:<port>[,opts]`.
    #[arg(value_parser = addr::parse_listen)]
    listen: ListenAddr,
    /// Where to connect: `host:port`, `[v6]:port`, `tcp://host:port` or `TCP:<host>:<port>[,opts]`.
    #[arg(value_parser = addr::parse_target)]
    target: TargetAddr,
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
    /// Close a connection with no bytes either way for this long (socat's -T).
    #[arg(global = true, long, short = 'T', value_parser = duration::parse)]
    idle_timeout: Option<Duration>,
    /// Open connections at most; beyond it accepting pauses until one closes.
    #[arg(global = true, long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// After SIGTERM/SIGINT, how long open connections may take to finish.
    #[arg(global = true, long, value_parser = duration::parse, default_value = "30s")]
    drain_timeout: Duration,
    /// Serve Prometheus metrics at http://<addr>/metrics; a bare port binds 127.0.0.1.
    #[arg(global = true, long, value_name = "ADDR|PORT", value_parser = metrics::parse_endpoint)]
    metrics: Option<SocketAddr>,
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

/// Exit code for a usage error, as clap uses and socat scripts expect.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (listen, target, route) = match (cli.command, cli.socat_listen, cli.socat_target) {
        (Some(Command::Forward(args)), None, None) => (args.listen, args.target, cli.route),
        (None, Some(listen), Some(target)) => (listen, target, cli.route),
        _ => {
            let _ = Cli::command().write_help(&mut std::io::stderr());
            return ExitCode::from(USAGE);
        }
    };
    logging::init(cli.log.verbose as i8 - cli.log.quiet as i8, cli.log.log_format);
    let mut route = route;
    match limits::raise_nofile() {
        Ok(nofile) => {
            let fits = limits::connections_for(nofile);
            if route.max_connections as usize > fits {
                tracing::warn!(requested = route.max_connections, nofile, max_connections = fits,
                    "--max-connections lowered to what the open-file limit holds (two descriptors per connection)");
                route.max_connections = u32::try_from(fits).unwrap_or(u32::MAX);
            }
        }
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-file limit; the relay may run out of descriptors early"),
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("relay: error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve(listen, target, route));
    // Name lookups may still sit on blocking threads; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("relay: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: ListenAddr, target: TargetAddr, args: RouteArgs) -> anyhow::Result<()> {
    let name = args.name.unwrap_or_else(|| listen.text.clone());
    let config = RouteConfig {
        listen,
        target,
        connect_timeout: args.connect_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections as usize,
        drain_timeout: args.drain_timeout,
    };
    let registry = Arc::new(Metrics::new());
    let target_text = config.target.text.clone();
    let forwarder = Forwarder::bind(config, registry.route(&name)).await?;
    if let Some(addr) = args.metrics {
        let listener = metrics::bind(addr).await?;
        tracing::info!("metrics on http://{}/metrics", listener.local_addr().unwrap_or(addr));
        tokio::spawn(metrics::serve(listener, registry.clone()));
    }
    tracing::info!(route = %name, target = %target_text, "listening on {}", forwarder.local_addr());

    let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut next_signal = async move || {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    };

    let (drain_tx, drain_rx) = watch::channel(false);
    let run = forwarder.run(drain_rx);
    tokio::pin!(run);
    tokio::select! {
        () = &mut run => return Ok(()),
        signal = next_signal() => tracing::info!(signal, "stopping: no new connections; a second signal exits at once"),
    }
    drain_tx.send_replace(true);
    tokio::select! {
        () = &mut run => Ok(()),
        signal = next_signal() => anyhow::bail!("{signal} during drain: exiting at once"),
    }
}

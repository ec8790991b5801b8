//! `cargo xtask`: the project's own build and check commands.
//!
//! This file only parses the command line and dispatches; each command
//! lives in its own module (`test`, `bench`, `fuzz`, `ebpf`, `dist`). A failing child command's
//! exit code becomes xtask's exit code (see `cmd::ExitCodeError`).

mod bench;
mod cmd;
mod dist;
mod ebpf;
mod fuzz;
mod packages;
mod test;
mod workspace;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  test [ARGS...]   install missing Debian test packages, build relay (release),
                   then run `cargo test --workspace --release ARGS...`
                   (ARGS are passed to cargo test as given, e.g.
                   `cargo xtask test half_close -- --nocapture`)
  bench [--quick] [--rounds N] [--only SECTION,...] [--peers PEER,...]
                   relay beside direct and the real peers on loopback, in one
                   run, order rotated, medians of rounds: socat, haproxy
                   (tcp mode, nbthread 2), haproxy-splice (option
                   splice-auto), nginx (stream, 2 workers), docker-proxy, and
                   stunnel for the TLS rows. Throughput (1 and 8 streams, CPU
                   per GiB), new connections/s, 1-byte ping-pong latency, RSS
                   per idle connection, TLS bridge and handshakes, new
                   connections/s over 200 routes, relay's data paths, the
                   observer's cost, packet capture vs tcpdump, reload; prints
                   a markdown table (a column per peer, relay / best peer,
                   targets) and writes target/bench/results.json, the peers'
                   configurations in target/bench/<peer>-<row>.conf.
                   Installs missing Debian packages first (as root).
                   --quick: 2 s runs, 1 round; --rounds N: N rounds per
                   measurement (default 3); --only: some of throughput,
                   connrate,latency,rss,tls,routes,datapath,observe,capture,
                   reload; --peers: only these peers (direct and relay always
                   run). A full run takes about 30 minutes on 2 cores.
  dist             static relay binary (glibc, +crt-static), CA bundle, shell
                   completions and man pages in target/dist; the Dockerfile
                   builds its FROM scratch image from there
  fuzz [--seconds N] [TARGET...]
                   build the coverage-guided fuzz targets of fuzz/ (libFuzzer,
                   stable Rust) and run each for N seconds (default 60) from
                   its committed corpus in fuzz/corpus/; a crash fails the
                   run and leaves its input in target/fuzz/artifacts/.
                   Targets: addr, config, filter, cbpf, pcapng, metrics_http
  build-ebpf       compile relay-ebpf/src/*.bpf.c into the committed
                   relay-ebpf/obj/*.o (needs clang and libbpf-dev)
  help             this text";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test::run(&args[1..]),
        Some("build-ebpf") => ebpf::build(),
        Some("dist") => dist::run(),
        Some("bench") => match bench::Options::parse(&args[1..]) {
            Ok(opts) => bench::run(&opts),
            Err(err) => {
                // A usage error: exit 2, as for an unknown command.
                eprintln!("xtask: bench: {err:#}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("fuzz") => match fuzz::Options::parse(&args[1..]) {
            Ok(opts) => fuzz::run(&opts),
            Err(err) => {
                eprintln!("xtask: fuzz: {err:#}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => {
            eprintln!("xtask: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(code) = err.downcast_ref::<cmd::ExitCodeError>() {
                eprintln!("xtask: {err:#}");
                return ExitCode::from(code.code());
            }
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

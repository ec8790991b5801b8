//! `cargo xtask`: the project's own build and check commands.
//!
//! This file only parses the command line and dispatches; each command
//! lives in its own module (`test`, `bench`, `ebpf`, `dist`). A failing child command's
//! exit code becomes xtask's exit code (see `cmd::ExitCodeError`).

mod bench;
mod cmd;
mod dist;
mod ebpf;
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
  bench [--quick] [--only SECTION,...]
                   direct vs socat vs relay on loopback: throughput, new
                   connections/s, 1-byte ping-pong latency, RSS per idle
                   connection, TLS bridge and handshakes, relay's data paths,
                   the observer's cost,
                   packet capture vs tcpdump; prints a markdown table and writes
                   target/bench/results.json (--quick: shorter runs;
                   --only: some of throughput,connrate,latency,rss,tls,datapath,
                   observe,capture)
  dist             static relay binary (glibc, +crt-static), CA bundle, shell
                   completions and man pages in target/dist; the Dockerfile
                   builds its FROM scratch image from there
  build-ebpf       compile relay-ebpf/src/*.bpf.c into the committed
                   relay-ebpf/obj/*.o (needs clang and libbpf-dev)
  help             this text";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test::run(&args[1..]),
        Some("build-ebpf") => ebpf::build(),
        Some("dist") => dist::run(),
        Some("bench") => bench::Options::parse(&args[1..]).and_then(|opts| bench::run(&opts)),
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

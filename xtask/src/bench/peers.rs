//! What the bench tells each peer forwarder to do: the HAProxy, nginx and
//! stunnel configuration files and the docker-proxy command line, from one
//! description of the job ([`Job`]: routes, TLS on which side, how many
//! connections). `via.rs` starts them; this module only writes the text,
//! so that every file can be checked in `target/bench/` and unit-tested.
//!
//! Each is set up as its own documentation describes a TCP forwarder:
//! HAProxy `mode tcp` with `nbthread 2` (and `option splice-auto` for the
//! splice variant), nginx `stream {}` with 2 workers, stunnel with
//! TCP_NODELAY on both legs; timeouts generous (1 h idle, 10 s connect, as
//! relay's), no access logging, connection limits far above what a row
//! needs, listen backlogs as deep as relay's (4096).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Listen backlog for every listener, as relay's default.
pub const BACKLOG: u32 = 4096;

/// One listening port and the loopback port it forwards to.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub listen: u16,
    pub target: u16,
}

/// Certificate files for the TLS rows (made at bench time, see tls.rs).
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key in one file, the form HAProxy's `crt` takes.
    pub cert_and_key: PathBuf,
    /// The name the originating hop checks in the certificate.
    pub name: &'static str,
}

/// Which side of a hop speaks TLS.
#[derive(Clone, Copy)]
pub enum TlsSide<'a> {
    /// Accepts TLS, forwards plain.
    Terminate(&'a TlsFiles),
    /// Accepts plain, connects with TLS and verifies the target's name.
    Originate(&'a TlsFiles),
}

/// What a forwarder is asked to do.
pub struct Job<'a> {
    pub routes: &'a [Route],
    pub tls: Option<TlsSide<'a>>,
    /// Connections it must hold at once.
    pub max_connections: usize,
    /// HAProxy only: `option splice-auto`.
    pub splice: bool,
    /// Where it may write its pid file and error log.
    pub run_dir: &'a Path,
    /// The hard RLIMIT_NOFILE it inherits: no tool here can go above it
    /// (raising it needs CAP_SYS_RESOURCE), and HAProxy refuses to start
    /// when its `maxconn` needs more.
    pub fd_limit: u64,
}

/// Generous limits so that no peer refuses what a row asks of it.
fn conn_limit(job: &Job) -> usize {
    job.max_connections.max(4096) + 1024
}

/// HAProxy's splice pipes (`maxpipes`, two descriptors each): far more
/// than the few connections a throughput row moves at once. Its default,
/// maxconn / 4, would not leave room for the memory row's connections.
const MAX_PIPES: u64 = 1024;

/// Relayed connections (two descriptors each) a forwarder can hold within
/// `fd_limit`, keeping some for listeners, logs, and HAProxy's pipes.
pub fn max_forwarded(fd_limit: u64) -> usize {
    usize::try_from(fd_limit.saturating_sub(512 + 2 * MAX_PIPES) / 2).unwrap_or(usize::MAX)
}

/// The hard RLIMIT_NOFILE of this process, which the peers inherit.
pub fn fd_hard_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(_, hard)| hard)
}

/// HAProxy 2.6, `mode tcp`, 2 threads, one frontend and backend per route.
pub fn haproxy(job: &Job) -> Result<String> {
    let maxconn = conn_limit(job).min(max_forwarded(job.fd_limit));
    let mut text = format!(
        "# HAProxy as a TCP forwarder, written by `cargo xtask bench`.\n\
         global\n\
         \x20   nbthread 2\n\
         \x20   maxconn {maxconn}\n\
         \x20   pidfile {run}/haproxy.pid\n\
         {pipes}\
         \x20   # no `log` line: nothing is logged\n\
         \n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   maxconn {maxconn}\n\
         \x20   backlog {BACKLOG}\n\
         \x20   timeout connect 10s\n\
         \x20   timeout client 1h\n\
         \x20   timeout server 1h\n\
         {splice}",
        run = job.run_dir.display(),
        splice = if job.splice {
            "    option splice-auto\n"
        } else {
            ""
        },
        pipes = if job.splice {
            format!("    maxpipes {MAX_PIPES}\n")
        } else {
            String::new()
        },
    );
    for (i, route) in job.routes.iter().enumerate() {
        let (bind_tls, server_tls) = match job.tls {
            None => (String::new(), String::new()),
            Some(TlsSide::Terminate(files)) => (
                format!(" ssl crt {}", files.cert_and_key.display()),
                String::new(),
            ),
            Some(TlsSide::Originate(files)) => (
                String::new(),
                format!(
                    " ssl verify required ca-file {} verifyhost {name} sni str({name})",
                    files.ca.display(),
                    name = files.name
                ),
            ),
        };
        write!(
            text,
            "\nfrontend fe{i}\n\
             \x20   bind 127.0.0.1:{listen}{bind_tls}\n\
             \x20   default_backend be{i}\n\
             \n\
             backend be{i}\n\
             \x20   server s{i} 127.0.0.1:{target}{server_tls}\n",
            listen = route.listen,
            target = route.target,
        )
        .expect("invariant: writing to a String cannot fail");
    }
    Ok(text)
}

/// nginx 1.22 `stream {}`, 2 workers, one `server` block per route.
/// `stream_module`: the `.so` to `load_module` when the module is dynamic.
pub fn nginx(job: &Job, stream_module: Option<&Path>) -> Result<String> {
    let limit = conn_limit(job);
    let run = job.run_dir.display();
    let mut text =
        String::from("# nginx stream as a TCP forwarder, written by `cargo xtask bench`.\n");
    if let Some(module) = stream_module {
        writeln!(text, "load_module {};", module.display()).expect("invariant: String");
    }
    write!(
        text,
        "daemon off;\n\
         worker_processes 2;\n\
         # Each relayed connection is two of nginx's: client and upstream.\n\
         worker_rlimit_nofile {files};\n\
         pid {run}/nginx.pid;\n\
         error_log {run}/error.log error;\n\
         events {{ worker_connections {conns}; }}\n\
         stream {{\n\
         \x20   access_log off;\n\
         \x20   proxy_connect_timeout 10s;\n\
         \x20   proxy_timeout 1h;\n",
        files = (2 * limit as u64 + 1024).min(job.fd_limit),
        conns = (2 * limit as u64).min(job.fd_limit.saturating_sub(256)),
    )
    .expect("invariant: String");
    for route in job.routes {
        let (listen_tls, server_tls) = match job.tls {
            None => (String::new(), String::new()),
            Some(TlsSide::Terminate(files)) => (
                " ssl".to_string(),
                // nginx 1.22's default protocols stop at TLS 1.2; the
                // others negotiate 1.3, as nginx does from 1.23.4 on.
                format!(
                    "        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_certificate {};\n        ssl_certificate_key {};\n",
                    files.cert.display(),
                    files.key.display()
                ),
            ),
            Some(TlsSide::Originate(files)) => (
                String::new(),
                format!(
                    "        proxy_ssl on;\n\
                     \x20       proxy_ssl_verify on;\n\
                     \x20       proxy_ssl_trusted_certificate {};\n\
                     \x20       proxy_ssl_name {name};\n\
                     \x20       proxy_ssl_server_name on;\n",
                    files.ca.display(),
                    name = files.name
                ),
            ),
        };
        write!(
            text,
            "    server {{\n\
             \x20       listen 127.0.0.1:{listen} backlog={BACKLOG}{listen_tls};\n\
             {server_tls}\
             \x20       proxy_pass 127.0.0.1:{target};\n\
             \x20   }}\n",
            listen = route.listen,
            target = route.target,
        )
        .expect("invariant: String");
    }
    text.push_str("}\n");
    Ok(text)
}

/// stunnel 5, one service per route; it only bridges TLS and plain.
pub fn stunnel(job: &Job) -> Result<String> {
    let Some(tls) = job.tls else {
        bail!("stunnel needs TLS on one side; it is not a plain TCP forwarder");
    };
    let mut text = String::from(
        "; stunnel as a TLS bridge, written by `cargo xtask bench`.\n\
         foreground = yes\n\
         pid =\n\
         syslog = no\n\
         ; errors only, to the process's stderr (target/bench/logs)\n\
         debug = err\n\
         socket = l:TCP_NODELAY=1\n\
         socket = r:TCP_NODELAY=1\n",
    );
    for (i, route) in job.routes.iter().enumerate() {
        write!(
            text,
            "\n[route{i}]\naccept = 127.0.0.1:{}\nconnect = 127.0.0.1:{}\n",
            route.listen, route.target
        )
        .expect("invariant: String");
        match tls {
            TlsSide::Terminate(files) => write!(
                text,
                "cert = {}\nkey = {}\n",
                files.cert.display(),
                files.key.display()
            ),
            TlsSide::Originate(files) => write!(
                text,
                "client = yes\nCAfile = {}\nverifyChain = yes\ncheckHost = {name}\nsni = {name}\n",
                files.ca.display(),
                name = files.name
            ),
        }
        .expect("invariant: String");
    }
    Ok(text)
}

/// docker-proxy's arguments (it takes no file): one route, plain only.
pub fn docker_proxy_args(job: &Job) -> Result<Vec<String>> {
    let [route] = job.routes else {
        bail!("docker-proxy forwards one port per process; a multi-route row marks it n/a");
    };
    if job.tls.is_some() {
        bail!("docker-proxy does not speak TLS");
    }
    Ok([
        "-proto",
        "tcp",
        "-host-ip",
        "127.0.0.1",
        "-host-port",
        &route.listen.to_string(),
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        &route.target.to_string(),
    ]
    .map(str::to_string)
    .to_vec())
}

/// The nginx stream module to `load_module`: None when nginx has it built
/// in, the `.so` when it is dynamic (Debian: libnginx-mod-stream).
pub fn nginx_stream_module(nginx: &Path) -> Result<Option<PathBuf>> {
    let out = std::process::Command::new(nginx)
        .arg("-V")
        .output()
        .with_context(|| format!("cannot run `{} -V`", nginx.display()))?;
    // nginx -V prints to stderr.
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let flags: Vec<&str> = text.split_whitespace().collect();
    if flags.contains(&"--with-stream") {
        return Ok(None);
    }
    if !flags.contains(&"--with-stream=dynamic") {
        bail!(
            "{} was built without the stream module; install nginx-full or nginx-light with libnginx-mod-stream",
            nginx.display()
        );
    }
    let modules = flags
        .iter()
        .find_map(|f| f.strip_prefix("--modules-path="))
        .unwrap_or("/usr/lib/nginx/modules");
    let so = Path::new(modules).join("ngx_stream_module.so");
    if !so.is_file() {
        bail!(
            "nginx's stream module is dynamic and {} is missing; install it with \
             `apt-get install libnginx-mod-stream` (or run `cargo xtask bench`, which does)",
            so.display()
        );
    }
    Ok(Some(so))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packages::find_program;

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            cert_and_key: dir.join("both.pem"),
            name: "localhost",
        }
    }

    fn routes(n: u16) -> Vec<Route> {
        (0..n)
            .map(|i| Route {
                listen: 20_000 + i,
                target: 30_000 + i,
            })
            .collect()
    }

    #[test]
    fn haproxy_gets_a_frontend_per_route_and_splice_only_when_asked() {
        let dir = Path::new("/run/x");
        let routes = routes(200);
        let job = |splice| Job {
            routes: &routes,
            tls: None,
            max_connections: 10_000,
            splice,
            run_dir: dir,
            fd_limit: 1 << 20,
        };
        let plain = haproxy(&job(false)).unwrap();
        assert_eq!(plain.matches("\nfrontend ").count(), 200);
        assert!(plain.contains("bind 127.0.0.1:20199\n"));
        assert!(plain.contains("server s199 127.0.0.1:30199\n"));
        assert!(plain.contains("nbthread 2") && plain.contains("mode tcp"));
        assert!(!plain.contains("splice"));
        assert!(plain.contains("maxconn 11024\n"));
        let capped = haproxy(&Job {
            fd_limit: 20_000,
            ..job(false)
        })
        .unwrap();
        assert!(capped.contains("maxconn 8720\n"), "{capped}");
        let splice = haproxy(&job(true)).unwrap();
        assert!(splice.contains("option splice-auto") && splice.contains("maxpipes 1024"));
    }

    #[test]
    fn tls_lands_on_the_side_asked_for() {
        let dir = Path::new("/c");
        let f = files(dir);
        let one = routes(1);
        let job = |tls| Job {
            routes: &one,
            tls: Some(tls),
            max_connections: 1,
            splice: false,
            run_dir: dir,
            fd_limit: 1 << 20,
        };
        let h = haproxy(&job(TlsSide::Terminate(&f))).unwrap();
        assert!(h.contains("bind 127.0.0.1:20000 ssl crt /c/both.pem"));
        let h = haproxy(&job(TlsSide::Originate(&f))).unwrap();
        assert!(h.contains(
            "127.0.0.1:30000 ssl verify required ca-file /c/ca.pem verifyhost localhost"
        ));
        let n = nginx(&job(TlsSide::Terminate(&f)), None).unwrap();
        assert!(n.contains("listen 127.0.0.1:20000 backlog=4096 ssl;"));
        let n = nginx(&job(TlsSide::Originate(&f)), None).unwrap();
        assert!(n.contains("proxy_ssl_verify on;") && n.contains("proxy_ssl_name localhost;"));
        let s = stunnel(&job(TlsSide::Originate(&f))).unwrap();
        assert!(s.contains("client = yes") && s.contains("checkHost = localhost"));
        let s = stunnel(&job(TlsSide::Terminate(&f))).unwrap();
        assert!(s.contains("cert = /c/cert.pem") && !s.contains("client = yes"));
    }

    #[test]
    fn tools_refuse_jobs_they_cannot_do() {
        let dir = Path::new("/r");
        let two = routes(2);
        let job = Job {
            routes: &two,
            tls: None,
            max_connections: 1,
            splice: false,
            run_dir: dir,
            fd_limit: 1 << 20,
        };
        assert!(docker_proxy_args(&job).is_err());
        assert!(stunnel(&job).is_err());
        let one = routes(1);
        let args = docker_proxy_args(&Job {
            routes: &one,
            ..job
        })
        .unwrap();
        assert_eq!(args[5], "20000");
        assert_eq!(args[9], "30000");
    }

    /// The files pass the tools' own checks (`haproxy -c`, `nginx -t`);
    /// skipped, saying so, where a tool is not installed.
    #[test]
    fn configurations_pass_the_tools_own_checks() {
        let dir =
            std::env::temp_dir().join(format!("relay-bench-peers-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let routes = routes(3);
        let job = Job {
            routes: &routes,
            tls: None,
            max_connections: 10_000,
            splice: true,
            run_dir: &dir,
            fd_limit: fd_hard_limit(),
        };
        if let Some(bin) = find_program("haproxy") {
            let path = dir.join("haproxy.conf");
            std::fs::write(&path, haproxy(&job).unwrap()).unwrap();
            let out = std::process::Command::new(bin)
                .arg("-c")
                .arg("-f")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "haproxy -c: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            println!("skipped haproxy -c: haproxy is not installed");
        }
        match find_program("nginx").map(|bin| (nginx_stream_module(&bin), bin)) {
            Some((Ok(module), bin)) => {
                let path = dir.join("nginx.conf");
                std::fs::write(&path, nginx(&job, module.as_deref()).unwrap()).unwrap();
                let out = std::process::Command::new(bin)
                    .arg("-t")
                    .arg("-p")
                    .arg(&dir)
                    .arg("-c")
                    .arg(&path)
                    .arg("-e")
                    .arg(dir.join("error.log"))
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "nginx -t: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Some((Err(err), _)) => println!("skipped nginx -t: {err:#}"),
            None => println!("skipped nginx -t: nginx is not installed"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

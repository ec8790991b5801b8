//! The config file: TOML, keys in kebab-case, unknown keys refused. This
//! module owns the file's shape and turns it into a [`Spec`], reporting
//! every problem it finds with file, line, column and key path
//! (`relay.toml:12:10: route[2].listen: ...`), as `nginx -t` does.
//!
//! Values are read with the same parsers as the command line (addresses in
//! URL or socat form, durations, filters, sizes), so a route reads the same
//! in either place. `docs/CONFIG.md` documents the format.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::ValueEnum;
use serde::Deserialize;
use toml::Spanned;

use super::{ContainersSpec, DEFAULT_TOP_FLOWS, Observed, ObserverSpec, RouteSpec, Spec, TlsFlags};
use crate::addr::{self, Host};
use crate::duration::{self, Timeout};
use crate::forward::dump::{Dump, DumpMode};
use crate::forward::{DataPath, Flow, data_path};
use crate::netns::Target;
use crate::observe::ObserveOptions;
use crate::observe::capture::{self, CaptureOptions, KernelCapture, SNAPLEN_MAX};
use crate::observe::discover::Rule;
use crate::observe::session::SessionOptions;
use crate::observe::sink::{Output, SinkOptions};

/// One problem in a config file, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no place (the file as a whole).
    pub line: usize,
    pub column: usize,
    /// `route[2].listen`; empty for the file as a whole.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a config file.
#[derive(Debug, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Reads and validates the config file at `path`; the text comes back
/// beside the spec (its hash names the running config).
pub fn load(path: &Path) -> Result<(Spec, String), Problems> {
    let text = read(path)?;
    parse(path, &text).map(|spec| (spec, text))
}

/// The text of the config file at `path`.
fn read(path: &Path) -> Result<String, Problems> {
    std::fs::read_to_string(path).map_err(|e| {
        Problems(vec![Problem {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        }])
    })
}

/// Validates config `text`, read from `file` (named in the problems).
pub fn parse(file: &Path, text: &str) -> Result<Spec, Problems> {
    let mut report = Report {
        file,
        text,
        problems: Vec::new(),
    };
    let model: Model = match toml::Deserializer::parse(text)
        .map_err(|e| (String::new(), e))
        .and_then(|de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                // Spanned values add a private segment to the path.
                let key = e
                    .path()
                    .to_string()
                    .replace(".$__serde_spanned_private_value", "");
                (key, e.into_inner())
            })
        }) {
        Ok(model) => model,
        Err((key, e)) => {
            report.at(e.span(), &key, e.message());
            return Err(Problems(report.problems));
        }
    };
    let spec = report.spec(model);
    if report.problems.is_empty() {
        Ok(spec)
    } else {
        Err(Problems(report.problems))
    }
}

// ------------------------------------------------------------------ model

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Model {
    #[serde(default)]
    route: Vec<RouteEntry>,
    #[serde(default)]
    observe: Vec<Spanned<ObserveEntry>>,
    metrics: Option<MetricsEntry>,
    upgrade: Option<UpgradeEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct UpgradeEntry {
    socket: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct MetricsEntry {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RouteEntry {
    name: Option<Spanned<String>>,
    listen: Spanned<String>,
    socket: Option<Spanned<String>>,
    target: Spanned<String>,
    connect_timeout: Option<Spanned<String>>,
    half_close_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<u32>>,
    max_sessions: Option<Spanned<u32>>,
    drain_timeout: Option<Spanned<String>>,
    data_path: Option<Spanned<String>>,
    #[serde(default)]
    experimental_sockmap: bool,
    one_way: Option<Spanned<String>>,
    dump: Option<Spanned<String>>,
    tls: Option<TlsEntry>,
    observe: Option<Spanned<String>>,
    capture: Option<Spanned<CaptureEntry>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct TlsEntry {
    ca: Option<PathBuf>,
    sni: Option<String>,
    #[serde(default)]
    no_sni: bool,
    name: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    upstream_cert: Option<PathBuf>,
    upstream_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    #[serde(default)]
    allow_names: Vec<String>,
    #[serde(default)]
    alpn: Vec<String>,
    min_version: Option<Spanned<String>>,
    #[serde(default)]
    insecure: bool,
    keylog: Option<PathBuf>,
    handshake_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ObserveEntry {
    /// One namespace; or `containers`, not both.
    target: Option<Spanned<String>>,
    containers: Option<Spanned<ContainersEntry>>,
    max_containers: Option<Spanned<usize>>,
    source: Option<Spanned<String>>,
    docker_socket: Option<PathBuf>,
    containerd_socket: Option<PathBuf>,
    containerd_namespaces: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    interfaces: Vec<String>,
    top_flows: Option<usize>,
    #[serde(default)]
    bpf_stats: bool,
    /// A daemon follows its targets across restarts unless told not to.
    #[serde(default = "yes")]
    follow: bool,
    capture: Option<Spanned<CaptureEntry>>,
}

fn yes() -> bool {
    true
}

/// `containers = "all"`, or a table of rules that must all match:
/// `containers = { name = "web-*", label = ["tier=front"], image = "nginx*" }`.
enum ContainersEntry {
    All,
    Select(SelectEntry),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct SelectEntry {
    name: Option<Spanned<String>>,
    /// `KEY` (present) or `KEY=GLOB`, each of which must match.
    #[serde(default)]
    label: Vec<Spanned<String>>,
    image: Option<Spanned<String>>,
}

impl<'de> Deserialize<'de> for ContainersEntry {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ContainersEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    r#""all" or a table { name = "GLOB", label = ["KEY=GLOB"], image = "GLOB" }"#,
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "all" => Ok(ContainersEntry::All),
                    other => Err(E::custom(format!(
                        r#"{other:?}: expected "all" or a table {{ name = "GLOB", label = ["KEY=GLOB"], image = "GLOB" }}"#
                    ))),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                SelectEntry::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ContainersEntry::Select)
            }
        }
        de.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CaptureEntry {
    pcap: Spanned<String>,
    filter: Option<Spanned<String>>,
    direction: Option<Spanned<String>>,
    sample: Option<Spanned<String>>,
    #[serde(default)]
    flow_head: u32,
    snaplen: Option<Spanned<u32>>,
    ring_size: Option<Spanned<String>>,
    rotate_size: Option<Spanned<String>>,
    rotate_count: Option<u32>,
    #[serde(default)]
    embed_keys: bool,
}

// ------------------------------------------------------------- validation

/// The longest `[upgrade] socket` path: a unix socket's address holds 107
/// bytes, and a new relay binds `<path>.new` first.
const UPGRADE_SOCKET_MAX: usize = 100;

fn parse_upgrade_socket(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("an empty path: give the handover socket's path, e.g. \"/run/relay/upgrade.sock\", or leave [upgrade] out".into());
    }
    if text.len() > UPGRADE_SOCKET_MAX {
        return Err(format!(
            "{} bytes long; a unix socket path may have at most {UPGRADE_SOCKET_MAX} here: choose a shorter one, e.g. \"/run/relay/upgrade.sock\"",
            text.len()
        ));
    }
    if text.ends_with('/') {
        return Err(format!(
            "`{text}` names a directory: give a file name in it, e.g. \"{text}upgrade.sock\""
        ));
    }
    Ok(PathBuf::from(text))
}

/// Problems found so far, and what is needed to place them.
struct Report<'a> {
    file: &'a Path,
    text: &'a str,
    problems: Vec<Problem>,
}

impl Report<'_> {
    fn at(&mut self, span: Option<Range<usize>>, key: &str, message: impl Into<String>) {
        let (line, column) = match span {
            Some(span) => line_column(self.text, span.start),
            None => (0, 0),
        };
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Parses `value` with `parse`; a failure is a problem at its place.
    fn value<T, E: fmt::Display>(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        match parse(value.get_ref()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.at(Some(value.span()), key, e.to_string());
                None
            }
        }
    }

    fn spec(&mut self, model: Model) -> Spec {
        let metrics = model
            .metrics
            .and_then(|m| self.value(&m.listen, "metrics.listen", crate::metrics::parse_endpoint));
        let upgrade_socket = model
            .upgrade
            .and_then(|u| self.value(&u.socket, "upgrade.socket", parse_upgrade_socket));
        let mut routes = Vec::new();
        // Where each name and listen address was first declared.
        let mut names: HashMap<String, String> = HashMap::new();
        let mut listens: HashMap<String, String> = HashMap::new();
        let mut sockets: HashMap<String, String> = HashMap::new();
        for (i, entry) in model.route.into_iter().enumerate() {
            let key = format!("route[{i}]");
            let name_span = entry.name.as_ref().map(Spanned::span);
            let listen_span = entry.listen.span();
            let socket_span = entry.socket.as_ref().map(Spanned::span);
            let Some(route) = self.route(&key, entry) else {
                continue;
            };
            if let Some(socket) = &route.socket
                && let Some(first) = sockets.insert(socket.clone(), key.clone())
            {
                self.at(
                    socket_span,
                    &format!("{key}.socket"),
                    format!(
                        "socket `{socket}` is already taken by {first}: a passed socket serves one route; give the .socket unit another ListenStream= with its own FileDescriptorName="
                    ),
                );
            }
            if let Some(first) = names.insert(route.name.clone(), key.clone()) {
                let span = name_span.unwrap_or(listen_span.clone());
                self.at(
                    Some(span),
                    &format!("{key}.name"),
                    format!(
                        "route name `{}` is already used by {first}: names label metrics and logs, so each must be unique",
                        route.name
                    ),
                );
            }
            if let Some(identity) = listen_identity(&route.listen)
                && let Some(first) = listens.insert(identity, key.clone())
            {
                self.at(
                    Some(listen_span),
                    &format!("{key}.listen"),
                    format!(
                        "`{}` listens where {first} already does: give each route its own address or port",
                        route.listen.text
                    ),
                );
            }
            routes.push(route);
        }
        let observers = model
            .observe
            .into_iter()
            .enumerate()
            .filter_map(|(i, entry)| {
                let span = entry.span();
                self.observer(&format!("observe[{i}]"), span, entry.into_inner())
            })
            .collect();
        Spec {
            routes,
            observers,
            metrics,
            upgrade_socket,
        }
    }

    fn route(&mut self, key: &str, entry: RouteEntry) -> Option<RouteSpec> {
        let listen = self.value(&entry.listen, &format!("{key}.listen"), addr::parse_listen);
        let target = self.value(&entry.target, &format!("{key}.target"), addr::parse_target);
        let (listen, target) = (listen?, target?);
        if let Err(e) = addr::check_datagram_pair(&listen, &target) {
            self.at(
                Some(entry.target.span()),
                &format!("{key}.target"),
                e.to_string(),
            );
        }
        if listen.once && !listen.is_stdio() && entry.socket.is_none() {
            // socat's single-connection listener ends its route after one
            // client; a host daemon's route serves until it is removed, and
            // a reload could not hand such a listener over.
            self.at(
                Some(entry.listen.span()),
                &format!("{key}.listen"),
                format!(
                    "`{}` serves one connection only (socat without `fork`); a route of the config file serves until removed: add `,fork`",
                    listen.text
                ),
            );
        }
        for (is_stdio, value, field) in [
            (listen.is_stdio(), &entry.listen, "listen"),
            (target.is_stdio(), &entry.target, "target"),
        ] {
            if is_stdio {
                self.at(
                    Some(value.span()),
                    &format!("{key}.{field}"),
                    "STDIO belongs to a command line (a daemon's stdin and stdout are not a client): use `relay - <address>` there, or a UNIX or TCP address here",
                );
            }
        }
        let mut route = RouteSpec::new(listen, target);
        if let Some(socket) = &entry.socket {
            route.socket = self.socket(key, socket, &route.listen);
        }
        if let Some(name) = &entry.name {
            if name.get_ref().trim().is_empty() {
                self.at(
                    Some(name.span()),
                    &format!("{key}.name"),
                    "a route name cannot be empty",
                );
            }
            route.name = name.get_ref().clone();
        }
        let duration = |report: &mut Self, v: &Option<Spanned<String>>, field: &str| {
            v.as_ref()
                .and_then(|v| report.value(v, &format!("{key}.{field}"), duration::parse))
        };
        if let Some(d) = duration(self, &entry.connect_timeout, "connect-timeout") {
            route.connect_timeout = d;
        }
        if let Some(d) = duration(self, &entry.half_close_timeout, "half-close-timeout") {
            route.half_close_timeout = Some(d);
        }
        if let Some(d) = duration(self, &entry.drain_timeout, "drain-timeout") {
            route.drain_timeout = d;
        }
        if let Some(idle) = &entry.idle_timeout
            && let Some(Timeout(idle)) =
                self.value(idle, &format!("{key}.idle-timeout"), Timeout::from_str)
        {
            route.idle_timeout = idle;
        }
        if let Some(max) = &entry.max_connections {
            if *max.get_ref() == 0 {
                self.at(
                    Some(max.span()),
                    &format!("{key}.max-connections"),
                    "must be at least 1",
                );
            }
            if route.listen.is_udp() {
                self.at(
                    Some(max.span()),
                    &format!("{key}.max-connections"),
                    "a UDP route has sessions, not connections: use `max-sessions`",
                );
            }
            route.max_connections = Some(*max.get_ref());
        }
        if let Some(max) = &entry.max_sessions {
            if *max.get_ref() == 0 {
                self.at(
                    Some(max.span()),
                    &format!("{key}.max-sessions"),
                    "must be at least 1",
                );
            }
            if !route.listen.is_udp() {
                self.at(
                    Some(max.span()),
                    &format!("{key}.max-sessions"),
                    "applies to UDP routes only (a session per client address); a stream route takes `max-connections`",
                );
            }
            route.max_sessions = *max.get_ref();
        }
        if let Some(path) = &entry.data_path
            && let Some(path) = self.value(path, &format!("{key}.data-path"), |p| {
                DataPath::from_str(p, true).map_err(|_| {
                    format!("`{p}` is not a data path; expected auto, copy, splice or sockmap")
                })
            })
        {
            route.data_path = path;
        }
        route.experimental_sockmap = entry.experimental_sockmap;
        if let Err(e) = data_path::require_opt_in(route.data_path, route.experimental_sockmap) {
            let span = entry.data_path.as_ref().map(Spanned::span);
            self.at(
                span,
                &format!("{key}.data-path"),
                e.to_string().replace(
                    data_path::EXPERIMENTAL_SOCKMAP_FLAG,
                    "experimental-sockmap = true",
                ),
            );
        }
        if let Some(flow) = &entry.one_way
            && let Some(flow) = self.value(flow, &format!("{key}.one-way"), |f| match f {
                "to-target" => Ok(Flow::ToTarget),
                "to-client" => Ok(Flow::ToClient),
                _ => Err(format!(
                    "`{f}` is not a direction; expected to-target or to-client (leave it out for both)"
                )),
            })
        {
            route.flow = flow;
        }
        if let Err(e) = route.flow.check(&route.listen, &route.target) {
            let (span, field) = match &entry.one_way {
                Some(flow) => (Some(flow.span()), "one-way"),
                None => (Some(entry.target.span()), "target"),
            };
            self.at(span, &format!("{key}.{field}"), e);
        }
        if let Some(dump) = &entry.dump {
            route.dump = self.value(dump, &format!("{key}.dump"), |mode| {
                let mode = match mode {
                    "text" => DumpMode::Text,
                    "hex" => DumpMode::Hex,
                    "both" => DumpMode::Both,
                    _ => {
                        return Err(format!(
                            "`{mode}` is not a dump; expected text, hex or both"
                        ));
                    }
                };
                Ok(Dump {
                    mode,
                    listener_second: false,
                })
            });
        }
        let tls = entry.tls.unwrap_or_default();
        if let Some(d) = duration(self, &tls.handshake_timeout, "tls.handshake-timeout") {
            route.handshake_timeout = d;
        }
        let tls13_only = match &tls.min_version {
            None => false,
            Some(v) => match v.get_ref().as_str() {
                "1.2" => false,
                "1.3" => true,
                other => {
                    self.at(
                        Some(v.span()),
                        &format!("{key}.tls.min-version"),
                        format!("`{other}` is not a TLS version relay speaks; expected \"1.2\" or \"1.3\""),
                    );
                    false
                }
            },
        };
        route.tls = TlsFlags {
            ca: tls.ca,
            sni: tls.sni,
            no_sni: tls.no_sni,
            name: tls.name,
            cert: tls.cert,
            key: tls.key,
            upstream_cert: tls.upstream_cert,
            upstream_key: tls.upstream_key,
            client_ca: tls.client_ca,
            allow_names: tls.allow_names,
            alpn: tls.alpn,
            tls13_only,
            insecure: tls.insecure,
            keylog: tls.keylog,
        };
        self.tls_material(key, &entry.target, &route);
        if let Some(observe) = &entry.observe {
            route.observe = self.value(observe, &format!("{key}.observe"), Target::from_str);
        }
        if let Some(capture) = &entry.capture {
            if entry.observe.is_none() {
                self.at(
                    Some(capture.span()),
                    &format!("{key}.capture"),
                    "a route's capture needs `observe = \"<target>\"` (what to capture)",
                );
            }
            route.capture = self.capture(&format!("{key}.capture"), capture.get_ref());
        }
        Some(route)
    }

    /// A route's `socket`: a name systemd can pass (its `FileDescriptorName=`
    /// rules), on a listen address that describes a socket relay does not
    /// make itself (no namespace to bind in, no socket options to set, no
    /// single-connection listener).
    fn socket(
        &mut self,
        key: &str,
        socket: &Spanned<String>,
        listen: &addr::ListenAddr,
    ) -> Option<String> {
        let name = socket.get_ref();
        let field = format!("{key}.socket");
        if let Err(why) = fd_name_problem(name) {
            self.at(Some(socket.span()), &field, why);
            return None;
        }
        let mut refuse = |what: &str| {
            self.at(
                Some(socket.span()),
                &field,
                format!(
                    "a route with `socket` takes its listener from systemd, so its listen cannot {what}; set it in the .socket unit instead, or drop `socket` to bind"
                ),
            );
        };
        if listen.netns.is_some() {
            refuse("name a namespace (the socket lives where systemd made it)");
        }
        if listen.once {
            refuse("serve one connection only (add `fork`)");
        }
        if !matches!(listen.endpoint, addr::ListenEndpoint::Tcp(_)) {
            refuse("be anything but TCP (relay takes TCP sockets from systemd only)");
        }
        if listen.tcp().is_some_and(|t| t.reuseport) || listen.backlog.is_some() {
            refuse("set reuseport or backlog (ReusePort=, Backlog=)");
        }
        Some(name.clone())
    }

    /// Loads the route's certificates, keys and CAs as the forwarder will,
    /// so an unreadable file or a key that does not match its certificate
    /// is found before serving.
    fn tls_material(&mut self, key: &str, target_value: &Spanned<String>, route: &RouteSpec) {
        let (server, client) =
            match crate::tls::settings::resolve(&route.listen, &route.target, &route.tls) {
                Ok(legs) => legs,
                Err(e) => {
                    self.at(
                        Some(target_value.span()),
                        &format!("{key}.tls"),
                        e.to_string(),
                    );
                    return;
                }
            };
        if let Some(server) = &server
            && let Err(e) = crate::tls::Acceptor::new(server)
        {
            self.at(
                Some(target_value.span()),
                &format!("{key}.tls"),
                e.to_string(),
            );
        }
        if let Some(client) = &client
            && let Some(host) = route.target.host()
            && let Err(e) = crate::tls::Connector::new(client, host)
        {
            self.at(
                Some(target_value.span()),
                &format!("{key}.tls"),
                e.to_string(),
            );
        }
    }

    fn observer(
        &mut self,
        key: &str,
        span: Range<usize>,
        entry: ObserveEntry,
    ) -> Option<ObserverSpec> {
        let observed = match (&entry.target, &entry.containers) {
            (Some(target), None) => {
                for (set, what) in [
                    (
                        entry.max_containers.as_ref().map(Spanned::span),
                        "max-containers",
                    ),
                    (entry.source.as_ref().map(Spanned::span), "source"),
                    (
                        entry.docker_socket.as_ref().map(|_| span.clone()),
                        "docker-socket",
                    ),
                    (
                        entry.containerd_socket.as_ref().map(|_| span.clone()),
                        "containerd-socket",
                    ),
                    (
                        entry.containerd_namespaces.as_ref().map(Spanned::span),
                        "containerd-namespaces",
                    ),
                ] {
                    if let Some(at) = set {
                        self.at(
                            Some(at),
                            &format!("{key}.{what}"),
                            "applies to `containers` only; for one container write `target = \"container:NAME\"` without it",
                        );
                    }
                }
                Observed::Target(self.value(target, &format!("{key}.target"), Target::from_str)?)
            }
            (None, Some(containers)) => {
                if let Some(capture) = &entry.capture {
                    self.at(
                        Some(capture.span()),
                        &format!("{key}.capture"),
                        "capture is not available for `containers` yet: capture one with `target = \"container:NAME\"`",
                    );
                }
                Observed::Containers(self.containers(key, &entry, containers)?)
            }
            (Some(target), Some(_)) => {
                self.at(
                    Some(target.span()),
                    key,
                    "has both `target` and `containers`: an entry observes one target or the containers; write two [[observe]] entries",
                );
                return None;
            }
            (None, None) => {
                self.at(
                    Some(span),
                    key,
                    "needs `target = \"container:NAME|pid:PID|netns:NAME|host\"` or `containers = \"all\"` (or a selection table)",
                );
                return None;
            }
        };
        let capture = match &observed {
            Observed::Target(_) => entry
                .capture
                .as_ref()
                .and_then(|c| self.capture(&format!("{key}.capture"), c.get_ref())),
            Observed::Containers(_) => None,
        };
        Some(ObserverSpec {
            observed,
            session: SessionOptions {
                observe: ObserveOptions {
                    interfaces: entry.interfaces,
                    loopback: false,
                    top_flows: entry.top_flows.unwrap_or(DEFAULT_TOP_FLOWS),
                    bpf_stats: entry.bpf_stats,
                    capture: None,
                },
                follow: entry.follow,
                watch: false,
                capture,
            },
        })
    }

    /// A `containers` entry's selection, cap and socket.
    fn containers(
        &mut self,
        key: &str,
        entry: &ObserveEntry,
        containers: &Spanned<ContainersEntry>,
    ) -> Option<ContainersSpec> {
        let mut spec = ContainersSpec::default();
        if let ContainersEntry::Select(select) = containers.get_ref() {
            let key = format!("{key}.containers");
            let rules = select
                .name
                .iter()
                .map(|v| ("name", v))
                .chain(select.label.iter().map(|v| ("label", v)))
                .chain(select.image.iter().map(|v| ("image", v)));
            let mut ok = true;
            for (kind, value) in rules {
                match format!("{kind}={}", value.get_ref()).parse::<Rule>() {
                    Ok(rule) => spec.select.rules.push(rule),
                    Err(e) => {
                        self.at(Some(value.span()), &format!("{key}.{kind}"), e.to_string());
                        ok = false;
                    }
                }
            }
            if !ok {
                return None;
            }
        }
        if let Some(max) = &entry.max_containers {
            if *max.get_ref() == 0 {
                self.at(
                    Some(max.span()),
                    &format!("{key}.max-containers"),
                    "must be at least 1 (it caps how many containers are attached)",
                );
                return None;
            }
            spec.max_containers = *max.get_ref();
        }
        if let Some(source) = &entry.source {
            spec.source = self.value(source, &format!("{key}.source"), str::parse)?;
        }
        if let Some(socket) = &entry.docker_socket {
            spec.docker_socket = socket.clone();
        }
        if let Some(socket) = &entry.containerd_socket {
            spec.containerd_socket = socket.clone();
        }
        if let Some(namespaces) = &entry.containerd_namespaces {
            if namespaces.get_ref().is_empty() {
                self.at(
                    Some(namespaces.span()),
                    &format!("{key}.containerd-namespaces"),
                    "lists no namespace: leave it out for k8s.io and default",
                );
                return None;
            }
            spec.containerd_namespaces = namespaces.get_ref().clone();
        }
        Some(spec)
    }

    fn capture(&mut self, key: &str, entry: &CaptureEntry) -> Option<CaptureOptions> {
        let mut ok = true;
        let filter = match &entry.filter {
            Some(f) => self.value(f, &format!("{key}.filter"), capture::parse_filter),
            None => Some(Default::default()),
        };
        let direction = match &entry.direction {
            Some(d) => self
                .value(d, &format!("{key}.direction"), capture::parse_direction)
                .map(Some),
            None => Some(None),
        };
        let sample = match &entry.sample {
            Some(s) => self.value(s, &format!("{key}.sample"), capture::parse_sample),
            None => Some(1),
        };
        let ring = match &entry.ring_size {
            Some(r) => self.value(r, &format!("{key}.ring-size"), capture::parse_ring_size),
            None => Some(capture::DEFAULT_RING_BYTES),
        };
        let rotate_size = match &entry.rotate_size {
            Some(r) => self
                .value(r, &format!("{key}.rotate-size"), capture::parse_bytes)
                .map(Some),
            None => Some(None),
        };
        let snaplen = match &entry.snaplen {
            Some(s) if !(1..=SNAPLEN_MAX).contains(s.get_ref()) => {
                self.at(
                    Some(s.span()),
                    &format!("{key}.snaplen"),
                    format!("must be between 1 and {SNAPLEN_MAX}"),
                );
                ok = false;
                SNAPLEN_MAX
            }
            Some(s) => *s.get_ref(),
            None => SNAPLEN_MAX,
        };
        if entry.rotate_count.is_some() && entry.rotate_size.is_none() {
            self.at(
                Some(entry.pcap.span()),
                &format!("{key}.rotate-count"),
                "needs rotate-size (when to start a new file)",
            );
            ok = false;
        }
        let (filter, direction, sample_every, ring_bytes, rotate_size) =
            (filter?, direction?, sample?, ring?, rotate_size?);
        if !ok {
            return None;
        }
        let output = Output::from_str(entry.pcap.get_ref()).unwrap_or_else(|never| match never {});
        Some(CaptureOptions {
            kernel: KernelCapture {
                filter,
                direction,
                sample_every,
                flow_head: entry.flow_head,
                snaplen,
                ring_bytes,
            },
            sink: SinkOptions {
                output,
                rotate_size,
                rotate_count: entry.rotate_count,
            },
            keys: entry
                .embed_keys
                .then(|| std::sync::Arc::new(capture::KeyLines::default())),
        })
    }
}

/// What makes two listen addresses collide: the same host and port, or
/// the same socket path or abstract name, in the same namespace. (Two
/// names for one address, or a wildcard beside a specific address, are
/// left to the bind, which reports them; port 0, "any free port", never
/// collides, and stdin/stdout is not a socket.)
pub fn listen_identity(listen: &addr::ListenAddr) -> Option<String> {
    let netns = listen.netns.as_ref().map(Target::spec).unwrap_or_default();
    match &listen.endpoint {
        addr::ListenEndpoint::Tcp(tcp) => {
            if tcp.port == 0 {
                return None;
            }
            let host = match &tcp.host {
                Host::Ip(ip) => ip.to_string(),
                Host::Name(name) => name.to_ascii_lowercase(),
            };
            Some(format!("{host}|{}|{netns}", tcp.port))
        }
        addr::ListenEndpoint::Unix(unix) => Some(format!("unix|{}|{netns}", unix.name)),
        addr::ListenEndpoint::Vsock(vsock) => Some(format!("vsock|{}|{}", vsock.cid, vsock.port)),
        addr::ListenEndpoint::Stdio(_)
        | addr::ListenEndpoint::File(_)
        | addr::ListenEndpoint::Connect(_) => None,
        // A UDP port is not a TCP one: both may be bound at once.
        addr::ListenEndpoint::Udp(udp) => {
            if udp.port == 0 {
                return None;
            }
            let host = match &udp.host {
                Host::Ip(ip) => ip.to_string(),
                Host::Name(name) => name.to_ascii_lowercase(),
            };
            Some(format!("udp|{host}|{}|{netns}", udp.port))
        }
    }
}

/// Why systemd would not pass a socket under `name` (sd_listen_fds(3):
/// `FileDescriptorName=` is printable ASCII without `:`, at most 255
/// characters).
fn fd_name_problem(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a socket name cannot be empty; use the .socket unit's FileDescriptorName= (or its unit name, e.g. `relay.socket`)".into());
    }
    if name.len() > 255 {
        return Err(format!(
            "a socket name has at most 255 characters (systemd's limit); this one has {}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_graphic() || *c == ' ') || *c == ':')
    {
        return Err(format!(
            "`{name}` cannot be a FileDescriptorName=: {bad:?} is not allowed (printable ASCII without `:`)"
        ));
    }
    Ok(())
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match parse(Path::new("relay.toml"), text) {
            Ok(_) => Vec::new(),
            Err(Problems(p)) => p.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_route_may_relay_one_way_unless_it_is_udp() {
        let spec = parse(
            Path::new("relay.toml"),
            "[[route]]\nlisten = \"127.0.0.1:514\"\ntarget = \"UNIX-CONNECT:/run/log.sock\"\none-way = \"to-target\"\n",
        )
        .expect("one way on a stream route");
        assert_eq!(spec.routes[0].flow, Flow::ToTarget);
        let found = problems(
            "[[route]]\nlisten = \"127.0.0.1:514\"\ntarget = \"127.0.0.1:515\"\ndump = \"binary\"\n",
        );
        assert!(
            found
                .iter()
                .any(|p| p.contains("route[0].dump") && p.contains("expected text, hex or both")),
            "{found:?}"
        );
        let found = problems(
            "[[route]]\nlisten = \"127.0.0.1:514\"\ntarget = \"127.0.0.1:515\"\none-way = \"up\"\n",
        );
        assert!(
            found
                .iter()
                .any(|p| p.contains("route[0].one-way")
                    && p.contains("expected to-target or to-client")),
            "{found:?}"
        );
        let found = problems(
            "[[route]]\nlisten = \"udp://127.0.0.1:514\"\ntarget = \"UDP:127.0.0.1:515\"\none-way = \"to-client\"\n",
        );
        assert!(
            found.iter().any(|p| p.contains("applies to stream routes")),
            "{found:?}"
        );
    }

    #[test]
    fn a_udp_route_takes_max_sessions_and_a_udp_target_only() {
        let spec = parse(
            Path::new("relay.toml"),
            "[[route]]\nlisten = \"udp://127.0.0.1:5353\"\ntarget = \"UDP:127.0.0.1:53\"\nidle-timeout = \"30s\"\nmax-sessions = 64\n\n[[route]]\nlisten = \"127.0.0.1:5353\"\ntarget = \"127.0.0.1:53\"\n",
        )
        .expect("UDP and TCP may share a port number");
        let dns = &spec.routes[0];
        assert!(dns.listen.is_udp() && dns.target.is_udp());
        assert_eq!(dns.max_sessions, 64);
        assert_eq!(dns.idle_timeout, Some(std::time::Duration::from_secs(30)));
        assert_eq!(
            spec.routes[1].max_sessions,
            super::super::DEFAULT_MAX_SESSIONS
        );
        let found = problems(
            "[[route]]\nlisten = \"udp://127.0.0.1:5353\"\ntarget = \"127.0.0.1:53\"\nmax-connections = 5\n",
        );
        assert!(
            found
                .iter()
                .any(|p| p.contains("its target must be UDP too")),
            "{found:?}"
        );
        assert!(
            found.iter().any(|p| p.contains("use `max-sessions`")),
            "{found:?}"
        );
        let found = problems(
            "[[route]]\nlisten = \"127.0.0.1:5353\"\ntarget = \"127.0.0.1:53\"\nmax-sessions = 0\n",
        );
        assert!(
            found.iter().any(|p| p.contains("must be at least 1")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.contains("applies to UDP routes only")),
            "{found:?}"
        );
        let found =
            problems("[[route]]\nlisten = \"UDP-LISTEN:5353\"\ntarget = \"UDP:127.0.0.1:53\"\n");
        assert!(found.iter().any(|p| p.contains("add `,fork`")), "{found:?}");
    }

    #[test]
    fn a_file_of_routes_and_observers_reads_as_a_spec() {
        let spec = parse(
            Path::new("relay.toml"),
            r#"
[metrics]
listen = "9100"

[[route]]
name = "web"
listen = "127.0.0.1:8080"
target = "TCP:127.0.0.1:80,connect-timeout=2"
idle-timeout = "none"
max-connections = 500
drain-timeout = "5s"
data-path = "splice"

[[route]]
listen = "TCP-LISTEN:6379,fork,reuseaddr,bind=127.0.0.1"
target = "127.0.0.1:6380"

[[observe]]
target = "host"
interfaces = ["eth0"]
"#,
        )
        .expect("a valid file");
        assert_eq!(spec.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(spec.routes.len(), 2);
        let web = &spec.routes[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.idle_timeout, None);
        assert_eq!(web.max_connections, Some(500));
        assert_eq!(web.drain_timeout, std::time::Duration::from_secs(5));
        assert_eq!(web.data_path, DataPath::Splice);
        let redis = &spec.routes[1];
        assert_eq!(redis.name, "TCP-LISTEN:6379,fork,reuseaddr,bind=127.0.0.1");
        assert_eq!(redis.idle_timeout, Some(super::super::DEFAULT_IDLE_TIMEOUT));
        assert_eq!(spec.observers.len(), 1);
        assert!(
            spec.observers[0].session.follow,
            "a daemon follows by default"
        );
    }

    #[test]
    fn containers_entries_read_as_a_selection_and_bad_ones_are_placed() {
        let spec = parse(
            Path::new("relay.toml"),
            r#"
[[observe]]
containers = "all"

[[observe]]
containers = { name = "web-*", label = ["com.docker.compose.project=shop", "tier"], image = "nginx*" }
max-containers = 50
docker-socket = "/run/docker.sock"
"#,
        )
        .expect("a valid file");
        let Observed::Containers(all) = &spec.observers[0].observed else {
            panic!("containers = \"all\" is a containers entry");
        };
        assert_eq!(all, &ContainersSpec::default());
        let Observed::Containers(some) = &spec.observers[1].observed else {
            panic!("a selection table is a containers entry");
        };
        assert_eq!(
            some.select.to_string(),
            "name=web-* and label=com.docker.compose.project=shop and label=tier and image=nginx*"
        );
        assert_eq!(some.max_containers, 50);
        assert_eq!(some.docker_socket, PathBuf::from("/run/docker.sock"));

        for (text, expected) in [
            (
                "[[observe]]\ncontainers = \"some\"\n",
                "relay.toml:2:14: observe[0].containers: \"some\": expected \"all\" or a table",
            ),
            (
                "[[observe]]\ncontainers = { label = [\"=x\"] }\n",
                "relay.toml:2:25: observe[0].containers.label: invalid selection \"label==x\": empty label key",
            ),
            (
                "[[observe]]\ncontainers = { pod = \"x\" }\n",
                "relay.toml:2:16: observe[0].containers.pod: unknown field `pod`, expected one of `name`, `label`, `image`",
            ),
            (
                "[[observe]]\ntarget = \"host\"\ncontainers = \"all\"\n",
                "relay.toml:2:10: observe[0]: has both `target` and `containers`",
            ),
            ("[[observe]]\nfollow = true\n", "observe[0]: needs `target"),
            (
                "[[observe]]\ncontainers = \"all\"\nmax-containers = 0\n",
                "relay.toml:3:18: observe[0].max-containers: must be at least 1",
            ),
            (
                "[[observe]]\ntarget = \"host\"\nmax-containers = 5\n",
                "relay.toml:3:18: observe[0].max-containers: applies to `containers` only",
            ),
            (
                "[[observe]]\ncontainers = \"all\"\n[observe.capture]\npcap = \"x.pcapng\"\n",
                "observe[0].capture: capture is not available for `containers` yet",
            ),
        ] {
            let found = problems(text);
            assert!(
                found.iter().any(|p| p.contains(expected)),
                "{text:?}: expected a problem containing {expected:?}, got {found:?}"
            );
        }
    }

    #[test]
    fn problems_name_file_line_column_and_key() {
        let text = "[[route]]\nlisten = \"127.0.0.1:8080\"\ntarget = \"TCP:host\"\n";
        assert_eq!(
            problems(text),
            vec![
                "relay.toml:3:10: route[0].target: `TCP:host`: `host` has no port; expected `host:port`"
            ]
        );
        let unknown = "[[route]]\nlisten = \"127.0.0.1:8080\"\ntarget = \"127.0.0.1:80\"\nconect-timeout = \"1s\"\n";
        let found = problems(unknown);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(
                "relay.toml:4:1: route[0].conect-timeout: unknown field `conect-timeout`"
            ),
            "{found:?}"
        );
        let wrong_type = "[[route]]\nlisten = \"127.0.0.1:8080\"\ntarget = \"127.0.0.1:80\"\nmax-connections = \"many\"\n";
        let found = problems(wrong_type);
        assert!(
            found[0].starts_with("relay.toml:4:19: route[0].max-connections: invalid type"),
            "{found:?}"
        );
        let broken = problems("[[route]\n");
        assert!(broken[0].starts_with("relay.toml:1:"), "{broken:?}");
    }

    #[test]
    fn a_single_connection_socat_listener_is_refused_with_the_fix() {
        let text = "[[route]]\nlisten = \"TCP-LISTEN:8080,reuseaddr\"\ntarget = \"127.0.0.1:80\"\n";
        assert_eq!(
            problems(text),
            vec![
                "relay.toml:2:10: route[0].listen: `TCP-LISTEN:8080,reuseaddr` serves one connection only (socat without `fork`); a route of the config file serves until removed: add `,fork`"
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_not_only_the_first() {
        let text = r#"
[[route]]
name = "a"
listen = "127.0.0.1:8080"
target = "127.0.0.1:80"
drain-timeout = "soon"

[[route]]
name = "a"
listen = "127.0.0.1:8080"
target = "127.0.0.1:81"
data-path = "sockmap"

[[observe]]
target = "nonsense:x"
"#;
        let found = problems(text);
        let expect = [
            "relay.toml:6:17: route[0].drain-timeout: `soon`",
            "relay.toml:12:13: route[1].data-path: --data-path sockmap is experimental",
            "relay.toml:9:8: route[1].name: route name `a` is already used by route[0]",
            "relay.toml:10:10: route[1].listen: `127.0.0.1:8080` listens where route[0] already does",
            "relay.toml:15:10: observe[0].target:",
        ];
        assert_eq!(found.len(), expect.len(), "{found:#?}");
        for (found, expect) in found.iter().zip(expect) {
            assert!(
                found.starts_with(expect),
                "expected `{expect}...`, got `{found}`"
            );
        }
        assert!(
            found[1].contains("experimental-sockmap = true"),
            "{}",
            found[1]
        );
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let spec = parse(Path::new("<embedded>"), super::super::EMBEDDED_DEFAULT)
            .expect("the embedded default parses");
        assert!(spec.routes.is_empty());
        assert_eq!(spec.observers.len(), 1);
        assert_eq!(spec.metrics, Some("127.0.0.1:9100".parse().unwrap()));
    }

    #[test]
    fn a_route_may_take_a_socket_systemd_passes_by_name() {
        let spec = parse(
            Path::new("relay.toml"),
            r#"
[[route]]
name = "web"
listen = "0.0.0.0:8080"
socket = "web"
target = "127.0.0.1:80"

[[route]]
listen = "127.0.0.1:9000"
target = "127.0.0.1:90"
"#,
        )
        .expect("a valid file");
        assert_eq!(spec.routes[0].socket.as_deref(), Some("web"));
        assert_eq!(
            spec.routes[0].listen.tcp().map(|t| t.port),
            Some(8080),
            "listen still says where"
        );
        assert_eq!(
            spec.routes[1].socket, None,
            "without `socket` a route binds"
        );
    }

    #[test]
    fn a_socket_name_is_checked_as_systemd_checks_it() {
        let route = |socket: &str| {
            format!(
                "[[route]]\nlisten = \"127.0.0.1:8080\"\nsocket = {socket}\ntarget = \"127.0.0.1:80\"\n"
            )
        };
        let found = problems(&route("\"\""));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("relay.toml:3:10: route[0].socket: a socket name cannot be empty"),
            "{found:?}"
        );
        let found = problems(&route("\"web:admin\""));
        assert!(
            found[0].contains("`web:admin` cannot be a FileDescriptorName=: ':'"),
            "{found:?}"
        );
        let found = problems(&route("\"café\""));
        assert!(found[0].contains("'é' is not allowed"), "{found:?}");
        let found = problems(&route(&format!("\"{}\"", "s".repeat(256))));
        assert!(found[0].contains("at most 255 characters"), "{found:?}");
        assert!(problems(&route("\"relay.socket\"")).is_empty());
        assert!(problems(&route("42")).len() == 1, "a name is a string");
    }

    #[test]
    fn a_socket_route_cannot_set_what_only_a_bind_does() {
        let with = |listen: &str| {
            problems(&format!(
                "[[route]]\nlisten = \"{listen}\"\nsocket = \"web\"\ntarget = \"127.0.0.1:80\"\n"
            ))
        };
        for (listen, says) in [
            ("127.0.0.1:8080@host", "name a namespace"),
            (
                "TCP-LISTEN:8080,bind=127.0.0.1",
                "serve one connection only",
            ),
            (
                "TCP-LISTEN:8080,fork,backlog=10",
                "set reuseport or backlog",
            ),
            ("TCP-LISTEN:8080,fork,reuseport", "set reuseport or backlog"),
        ] {
            let found = with(listen);
            assert_eq!(found.len(), 1, "{listen}: {found:?}");
            assert!(
                found[0].starts_with("relay.toml:3:10: route[0].socket: a route with `socket`")
                    && found[0].contains(says),
                "{listen}: expected `{says}`, got {found:?}"
            );
        }
        assert!(with("TCP-LISTEN:8080,fork,reuseaddr").is_empty());
        assert!(
            with("tls://127.0.0.1:8443").len() == 1,
            "TLS needs its cert, not a socket problem"
        );
    }

    #[test]
    fn two_routes_cannot_take_one_socket() {
        let text = r#"
[[route]]
listen = "127.0.0.1:8080"
socket = "web"
target = "127.0.0.1:80"

[[route]]
listen = "127.0.0.1:8081"
socket = "web"
target = "127.0.0.1:81"
"#;
        let found = problems(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(
                "relay.toml:9:10: route[1].socket: socket `web` is already taken by route[0]"
            ),
            "{found:?}"
        );
    }

    #[test]
    fn the_upgrade_socket_is_a_short_file_path() {
        let spec = parse(
            Path::new("relay.toml"),
            "[upgrade]\nsocket = \"/run/relay/upgrade.sock\"\n",
        )
        .expect("a valid file");
        assert_eq!(
            spec.upgrade_socket,
            Some(PathBuf::from("/run/relay/upgrade.sock"))
        );
        assert_eq!(
            parse(Path::new("relay.toml"), "")
                .expect("empty")
                .upgrade_socket,
            None,
            "upgrades are off unless asked for"
        );
        let long = format!("[upgrade]\nsocket = \"/{}\"\n", "x".repeat(120));
        let found = problems(&long);
        assert!(
            found[0].starts_with("relay.toml:2:10: upgrade.socket: 121 bytes long"),
            "{found:?}"
        );
        let found = problems("[upgrade]\nsocket = \"/run/relay/\"\n");
        assert!(found[0].contains("names a directory"), "{found:?}");
        let found = problems("[upgrade]\nsoket = \"/run/relay/x\"\n");
        assert!(found[0].contains("unknown field `soket`"), "{found:?}");
    }

    #[test]
    fn line_and_column_count_characters_from_one() {
        assert_eq!(line_column("ab\ncé\nx", 0), (1, 1));
        assert_eq!(line_column("ab\ncé\nx", 3), (2, 1));
        assert_eq!(line_column("ab\ncé\nx", 7), (3, 1));
    }
}

use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

fn v4(a: u8, b: u8, c: u8, d: u8) -> Host {
    Host::Ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
}

#[test]
fn url_forms_parse_to_the_same_target() {
    for text in ["127.0.0.1:80", "tcp://127.0.0.1:80", "TCP://127.0.0.1:80"] {
        let t = parse_target(text).unwrap();
        let t = t.tcp().unwrap();
        assert_eq!((&t.host, t.port), (&v4(127, 0, 0, 1), 80), "{text}");
    }
    let t = parse_target("[::1]:6379").unwrap();
    assert_eq!(
        t.tcp().unwrap().host,
        Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST))
    );
    let t = parse_target("redis.internal:6379").unwrap();
    assert_eq!(t.tcp().unwrap().host, Host::Name("redis.internal".into()));
    let t = parse_target("my-redis:6379").unwrap();
    assert_eq!(t.tcp().unwrap().host, Host::Name("my-redis".into()));
}

#[test]
fn socat_listen_keeps_socat_semantics() {
    let l = parse_listen("TCP-LISTEN:8080,fork,reuseaddr").unwrap();
    let tcp = l.tcp().unwrap();
    assert_eq!(
        (tcp.port, l.once, tcp.reuseaddr, tcp.reuseport),
        (8080, false, true, false)
    );
    assert_eq!(tcp.host, v4(0, 0, 0, 0));
    let l = parse_listen("tcp-l:8080").unwrap();
    assert!(l.once, "socat without fork serves one connection");
    assert!(!l.tcp().unwrap().reuseaddr);
    let l = parse_listen("TCP6-LISTEN:443,bind=[::1],backlog=512,reuseport,fork").unwrap();
    let tcp = l.tcp().unwrap();
    assert_eq!(tcp.host, Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    assert_eq!(
        (tcp.family, l.backlog, tcp.reuseport),
        (Family::V6, Some(512), true)
    );
    let l = parse_listen("TCP4-LISTEN:80,bind=127.0.0.2,fork=1").unwrap();
    assert_eq!((&l.tcp().unwrap().host, l.once), (&v4(127, 0, 0, 2), false));
}

#[test]
fn socat_connect_options() {
    let t = parse_target("TCP:db:5432,connect-timeout=2.5,nodelay,keepalive").unwrap();
    assert_eq!(t.tcp().unwrap().host, Host::Name("db".into()));
    assert_eq!(t.connect_timeout, Some(Duration::from_millis(2500)));
    assert!(t.tcp().unwrap().keepalive);
    let t = parse_target("tcp6-connect:[::1]:80").unwrap();
    assert_eq!(t.tcp().unwrap().family, Family::V6);
}

#[test]
fn range_admits_only_its_networks() {
    let l = parse_listen(
        "TCP-LISTEN:80,fork,range=10.0.0.0/8,range=192.168.1.7,range=172.16.0.0:255.240.0.0,range=[fd00::]/8",
    )
    .unwrap();
    let tcp = l.tcp().unwrap();
    assert_eq!(tcp.range.len(), 4);
    for inside in [
        "10.1.2.3",
        "192.168.1.7",
        "172.31.255.1",
        "fd12::1",
        "::ffff:10.9.9.9",
    ] {
        assert!(tcp.admits(inside.parse().unwrap()), "{inside}");
    }
    for outside in [
        "11.0.0.1",
        "192.168.1.8",
        "172.32.0.1",
        "fe80::1",
        "127.0.0.1",
    ] {
        assert!(!tcp.admits(outside.parse().unwrap()), "{outside}");
    }
    // Host bits in the network are dropped, as socat masks them.
    let l = parse_listen("TCP-LISTEN:80,range=127.0.0.9/8").unwrap();
    assert!(l.tcp().unwrap().admits("127.1.1.1".parse().unwrap()));
    // No range: everyone.
    let l = parse_listen("TCP-LISTEN:80").unwrap();
    assert!(l.tcp().unwrap().admits("203.0.113.1".parse().unwrap()));
    for bad in [
        "range=10.0.0.0/33",
        "range=nowhere",
        "range=10.0.0.0:255.0.255.0",
        "range=",
    ] {
        let err = parse_listen(&format!("TCP-LISTEN:80,{bad}")).unwrap_err();
        assert!(err.to_string().contains("range="), "{bad}: {err}");
    }
    // A UNIX socket has no client address to match.
    let err = parse_listen("UNIX-LISTEN:/tmp/x.sock,range=10.0.0.0/8").unwrap_err();
    assert!(err.to_string().contains("option `range`"), "{err}");
}

#[test]
fn max_children_is_the_connection_limit() {
    let l = parse_listen("TCP-LISTEN:80,fork,max-children=8").unwrap();
    assert_eq!(l.max_children, Some(8));
    let l = parse_listen("UNIX-LISTEN:/tmp/x.sock,fork,max-children=3").unwrap();
    assert_eq!(l.max_children, Some(3));
    let spec = crate::config::RouteSpec::new(l, parse_target("TCP:db:1").unwrap());
    assert_eq!(spec.max_connections, Some(3));
    for bad in ["max-children=0", "max-children=many", "max-children"] {
        let err = parse_listen(&format!("TCP-LISTEN:80,{bad}")).unwrap_err();
        assert!(err.to_string().contains("max-children"), "{bad}: {err}");
    }
}

#[test]
fn connect_retries_as_socat() {
    let t = parse_target("TCP:db:5432").unwrap();
    assert_eq!(t.retry, Retry::NONE);
    assert!(!t.retry.again_after(1));
    let t = parse_target("TCP:db:5432,retry=3,interval=0.5").unwrap();
    assert_eq!(
        t.retry,
        Retry {
            retries: Some(3),
            interval: Duration::from_millis(500)
        }
    );
    assert!(t.retry.again_after(3));
    assert!(!t.retry.again_after(4));
    let t = parse_target("UNIX-CONNECT:/run/x.sock,forever").unwrap();
    assert_eq!(t.retry.retries, None);
    assert!(t.retry.again_after(u32::MAX));
    assert_eq!(t.retry.interval, DEFAULT_RETRY_INTERVAL);
    for bad in [
        "retry=-1",
        "retry=",
        "interval=0",
        "interval=x",
        "forever=2",
    ] {
        let err = parse_target(&format!("TCP:db:1,{bad}")).unwrap_err();
        let key = bad.split('=').next().unwrap();
        assert!(err.to_string().contains(key), "{bad}: {err}");
    }
    // Retrying belongs to the connect side.
    let err = parse_listen("TCP-LISTEN:80,retry=3").unwrap_err();
    assert!(err.to_string().contains("option `retry`"), "{err}");
}

#[test]
fn known_socat_options_are_refused_with_what_to_use() {
    let cases = [
        ("TCP-LISTEN:80,fork,su=nobody", "su", "User="),
        ("UNIX-LISTEN:/x.sock,substuser=nobody", "su", "runuser"),
    ];
    for (input, name, instead) in cases {
        let err = if input.contains("LISTEN") {
            parse_listen(input).map(|_| ())
        } else {
            parse_target(input).map(|_| ())
        }
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!("socat option `{name}`")),
            "{input}: {err}"
        );
        assert!(err.contains(instead), "{input}: {err}");
    }
    let ListenEndpoint::Tcp(tcp) = parse_listen("TCP-LISTEN:80,keepalive,rcvbuf=65536")
        .unwrap()
        .endpoint
    else {
        panic!("a TCP listener");
    };
    assert!(tcp.keepalive && tcp.buffers.recv == Some(65536) && tcp.buffers.send.is_none());
    let target = parse_target("TCP:h:80,so-sndbuf=32768").unwrap();
    assert_eq!(target.tcp().unwrap().buffers.send, Some(32768));
    let err = parse_target("TCP:h:80,sndbuf=big").unwrap_err();
    assert!(err.to_string().contains("buffer size in bytes"), "{err}");
    assert!(parse_listen("TCP-LISTEN:80,nodelay").is_ok());
}

#[test]
fn tls_addresses_carry_their_options() {
    let t = parse_target("tls://redis:6380").unwrap();
    assert_eq!(
        t.tls,
        Some(TlsTarget {
            verify: true,
            ..TlsTarget::default()
        })
    );
    let t = parse_target("OPENSSL:redis:6380,cafile=/ca.pem,cert=c.pem,key=c.key,snihost=r.internal,commonname=redis,verify=1").unwrap();
    let tls = t.tls.unwrap();
    assert_eq!(tls.ca.as_deref(), Some(std::path::Path::new("/ca.pem")));
    assert_eq!(
        (tls.sni.as_deref(), tls.name.as_deref(), tls.verify),
        (Some("r.internal"), Some("redis"), true)
    );
    let t = parse_target("SSL:redis:6380,verify=0,no-sni").unwrap();
    assert!(!t.tls.as_ref().unwrap().verify && t.tls.unwrap().no_sni);
    assert!(parse_target("127.0.0.1:80").unwrap().tls.is_none());

    let l = parse_listen("OPENSSL-LISTEN:443,cert=s.pem,key=s.key,cafile=ca.pem,fork").unwrap();
    let tls = l.tls.unwrap();
    assert!(
        tls.verify_clients,
        "socat's OPENSSL-LISTEN verifies clients by default"
    );
    assert_eq!(tls.ca.as_deref(), Some(std::path::Path::new("ca.pem")));
    assert!(!l.once);
    let l = parse_listen("tls://0.0.0.0:443").unwrap();
    assert!(
        !l.tls.unwrap().verify_clients,
        "the URL form asks for no client certificate unless told"
    );
    assert!(
        parse_listen("tls-listen://127.0.0.1:443")
            .unwrap()
            .tls
            .is_some()
    );
}

#[test]
fn addresses_may_live_in_a_namespace() {
    let t = parse_target("tcp://127.0.0.1:5005@container:web").unwrap();
    assert_eq!(
        (t.tcp().unwrap().port, t.netns.map(|n| n.spec())),
        (5005, Some("container:web".to_string()))
    );
    let l = parse_listen("127.0.0.1:6379@pid:1234").unwrap();
    assert_eq!(l.netns.map(|n| n.spec()), Some("pid:1234".to_string()));
    let t = parse_target("tls://db:6380@netns:blue").unwrap();
    assert!(t.tls.is_some() && t.netns.is_some());
    let t = parse_target("TCP:127.0.0.1:80,container=web").unwrap();
    assert_eq!(t.netns.map(|n| n.spec()), Some("container:web".to_string()));
    let l = parse_listen("TCP-LISTEN:80,fork,netns=blue").unwrap();
    assert_eq!(l.netns.map(|n| n.spec()), Some("netns:blue".to_string()));
    assert!(parse_target("127.0.0.1:80").unwrap().netns.is_none());
    let err = parse_target("127.0.0.1:80@vm:x").unwrap_err().to_string();
    assert!(err.contains("after `@`"), "{err}");
}

fn unix(l: &ListenAddr) -> &UnixListen {
    match &l.endpoint {
        ListenEndpoint::Unix(unix) => unix,
        other => panic!("expected a UNIX listener, got {other:?}"),
    }
}

#[test]
fn unix_listen_keeps_socat_semantics() {
    let l =
        parse_listen("UNIX-LISTEN:/run/x.sock,fork,mode=660,user=root,group=docker,unlink-early")
            .unwrap();
    let u = unix(&l);
    assert_eq!(u.name, UnixName::Path("/run/x.sock".into()));
    assert_eq!(
        (u.mode, u.unlink_early, u.unlink_close),
        (Some(0o660), true, true)
    );
    assert_eq!(
        (u.user.as_deref(), u.group.as_deref()),
        (Some("root"), Some("docker"))
    );
    assert!(!l.once);
    let l = parse_listen("unix-l:/tmp/a.sock,unlink-close=0,backlog=8").unwrap();
    assert!(l.once, "socat without fork serves one connection");
    assert!(!unix(&l).unlink_close);
    assert_eq!(l.backlog, Some(8));
    let l = parse_listen("ABSTRACT-LISTEN:relay-test,fork,netns=blue").unwrap();
    assert_eq!(unix(&l).name, UnixName::Abstract("relay-test".into()));
    assert_eq!(l.netns.map(|n| n.spec()), Some("netns:blue".to_string()));
    let l = parse_listen("UNIX-LISTEN:/run/x.sock,fork,container=web").unwrap();
    assert_eq!(l.netns.map(|n| n.spec()), Some("container:web".to_string()));
}

#[test]
fn unix_targets_in_every_spelling() {
    for text in [
        "UNIX-CONNECT:/var/run/docker.sock",
        "unix-client:/var/run/docker.sock",
        "UNIX:/var/run/docker.sock",
        "unix:///var/run/docker.sock",
    ] {
        let t = parse_target(text).unwrap();
        assert_eq!(
            t.endpoint,
            TargetEndpoint::Unix(UnixName::Path("/var/run/docker.sock".into())),
            "{text}"
        );
        assert!(t.tls.is_none() && t.host().is_none(), "{text}");
    }
    let t = parse_target("ABSTRACT-CONNECT:dbus,connect-timeout=1,pid=42").unwrap();
    assert_eq!(
        t.endpoint,
        TargetEndpoint::Unix(UnixName::Abstract("dbus".into()))
    );
    assert_eq!(t.connect_timeout, Some(Duration::from_secs(1)));
    assert_eq!(t.netns.map(|n| n.spec()), Some("pid:42".to_string()));
    let t = parse_target("unix-abstract://dbus@container:web").unwrap();
    assert_eq!(
        t.endpoint,
        TargetEndpoint::Unix(UnixName::Abstract("dbus".into()))
    );
    assert!(t.netns.is_some());
    let l = parse_listen("unix:///run/relay.sock").unwrap();
    assert_eq!(unix(&l).name, UnixName::Path("/run/relay.sock".into()));
    assert!(!l.once, "the URL form serves many connections");
}

#[test]
fn stdio_is_either_address() {
    for (text, mode) in [
        ("-", StdioMode::Both),
        ("STDIO", StdioMode::Both),
        ("stdio", StdioMode::Both),
        ("STDIN", StdioMode::In),
        ("STDOUT", StdioMode::Out),
    ] {
        let l = parse_listen(text).unwrap();
        assert_eq!(
            (l.endpoint, l.once),
            (ListenEndpoint::Stdio(mode), true),
            "{text}"
        );
        let t = parse_target(text).unwrap();
        assert_eq!(t.endpoint, TargetEndpoint::Stdio(mode), "{text}");
    }
}

#[test]
fn unix_addresses_refuse_what_does_not_apply() {
    let cases = [
        (
            parse_listen("UNIX-LISTEN:").map(|_| ()),
            "the socket path is empty",
        ),
        (
            parse_listen("UNIX-LISTEN:/x.sock,mode=rw").map(|_| ()),
            "`mode=rw`: expected octal",
        ),
        (
            parse_listen("ABSTRACT-LISTEN:x,mode=600").map(|_| ()),
            "an abstract socket has none",
        ),
        (
            parse_listen("UNIX-LISTEN:/x.sock,umask=022").map(|_| ()),
            "option `umask` is not supported by relay on a UNIX listen address",
        ),
        (
            parse_target("UNIX-CONNECT:/x.sock,fork").map(|_| ()),
            "option `fork` is not supported by relay on a UNIX connect address",
        ),
        (
            parse_target("UNIX-CONNECT:/x.sock,netns=blue").map(|_| ()),
            "not a network namespace",
        ),
        (
            parse_target("unix://run/x.sock").map(|_| ()),
            "three slashes",
        ),
        (
            parse_target(&format!("UNIX:/{}", "a".repeat(120))).map(|_| ()),
            "at most 107",
        ),
        (parse_target("STDIO,raw").map(|_| ()), "option `raw`"),
        (
            parse_listen("UNIX-CONNECT:/x.sock").map(|_| ()),
            "first address must listen",
        ),
        (
            parse_target("UNIX-LISTEN:/x.sock").map(|_| ()),
            "second address must connect",
        ),
    ];
    for (result, expected) in cases {
        let err = result.expect_err(expected).to_string();
        assert!(err.contains(expected), "expected `{expected}` in `{err}`");
    }
}

#[test]
fn the_pair_may_come_in_either_order() {
    let (l, t) = parse_pair("-", "TCP:127.0.0.1:80").unwrap();
    assert!(l.is_stdio() && t.tcp().is_some());
    let (l, t) = parse_pair("TCP:127.0.0.1:80", "STDIO").unwrap();
    assert!(
        l.is_stdio() && t.tcp().is_some(),
        "a connect address first, STDIO second"
    );
    let (l, t) = parse_pair("UNIX-CONNECT:/run/x.sock", "TCP-LISTEN:2375,fork").unwrap();
    assert!(l.tcp().is_some() && !l.once);
    assert!(matches!(t.endpoint, TargetEndpoint::Unix(_)));
    let (l, t) = parse_pair("TCP-LISTEN:8080", "-").unwrap();
    assert!(l.once && t.is_stdio());
    let err = parse_pair("TCP-LISTEN:8080,fork", "STDIO")
        .unwrap_err()
        .to_string();
    assert!(err.contains("drop `fork`"), "{err}");
    let err = parse_pair("-", "STDIO").unwrap_err().to_string();
    assert!(err.contains("relays nothing"), "{err}");
    // Two connect addresses: the first is the route's one client.
    let (l, t) = parse_pair("TCP:a:1", "UNIX-CONNECT:/run/b.sock").unwrap();
    assert!(matches!(&l.endpoint, ListenEndpoint::Connect(first) if first.tcp().is_some()));
    assert!(l.once && l.text == "TCP:a:1" && t.text == "UNIX-CONNECT:/run/b.sock");
    let (l, _) = parse_pair("EXEC:/bin/cat", "TCP:b:2").unwrap();
    assert!(
        matches!(&l.endpoint, ListenEndpoint::Connect(first) if matches!(first.endpoint, TargetEndpoint::Exec(_)))
    );
    let err = parse_pair("OPENSSL:a:443", "TCP:b:2")
        .unwrap_err()
        .to_string();
    assert!(err.contains("write it second"), "{err}");
    let err = parse_pair("TCP:a:1", "TCP:b").unwrap_err().to_string();
    assert!(err.contains("TCP:b"), "{err}");
}

#[test]
fn exec_and_system_split_like_socat() {
    let exec = |text: &str| match parse_target(text).unwrap().endpoint {
        TargetEndpoint::Exec(spec) => spec,
        other => panic!("{text}: expected EXEC, got {other:?}"),
    };
    let spec = exec("EXEC:/usr/bin/tr  a-z A-Z,stderr");
    assert_eq!(spec.argv, ["/usr/bin/tr", "a-z", "A-Z"]);
    assert!(spec.stderr_to_peer);
    let spec = exec("SYSTEM:grep -v x | sort");
    assert_eq!(spec.argv, ["/bin/sh", "-c", "grep -v x | sort"]);
    assert!(!spec.stderr_to_peer);
}

#[test]
fn bad_addresses_name_the_token() {
    let cases = [
        (
            parse_listen("TCP-LISTEN:notaport").map(|_| ()),
            "`notaport` is not a port",
        ),
        (
            parse_listen("TCP-LISTEN:80,bogus=1").map(|_| ()),
            "option `bogus`",
        ),
        (
            parse_listen("TCP-LISTEN:80,nodelay=0").map(|_| ()),
            "`nodelay=0` cannot be honoured",
        ),
        (parse_target("TCP:host").map(|_| ()), "`host` has no port"),
        (parse_target("TCP:db:1,fork").map(|_| ()), "option `fork`"),
        (parse_target("foo://x:1").map(|_| ()), "scheme `foo://`"),
        (parse_target("[::1:80").map(|_| ()), "missing `]`"),
        (parse_target("::1:80").map(|_| ()), "needs brackets"),
        (
            parse_target("OPENSSL:x:443,bogus").map(|_| ()),
            "option `bogus`",
        ),
        (
            parse_listen("OPENSSL-LISTEN:443,snihost=x").map(|_| ()),
            "option `snihost`",
        ),
        (
            parse_target("UDP-SENDTO:127.0.0.1:53").map(|_| ()),
            "`UDP-SENDTO` is not supported by relay: relay relays UDP as a listener",
        ),
        (
            parse_target("unix-sendto:/run/x.sock").map(|_| ()),
            "`unix-sendto` is not supported by relay: relay forwards UNIX stream sockets only",
        ),
        (
            parse_target("EXEC:/bin/cat,nofork").map(|_| ()),
            "option `nofork` is not supported by relay",
        ),
        (parse_target("EXEC:/bin/sh,raw").map(|_| ()), "add `pty`"),
        (
            parse_target("FD:3").map(|_| ()),
            "`FD` is not supported by relay",
        ),
        (parse_target("SYSTEM:").map(|_| ()), "the command is empty"),
        (
            parse_listen("EXEC:/bin/cat").map(|_| ()),
            "put a listener first",
        ),
        (
            parse_target("TCP:db:5432,connect-timeout=soon").map(|_| ()),
            "connect-timeout=soon",
        ),
        (
            parse_target("TCP:db:5432,nodelay=0").map(|_| ()),
            "nodelay=0",
        ),
        (parse_target("TCP4:[::1]:80").map(|_| ()), "address family"),
        (parse_target("bad host!:80").map(|_| ()), "neither an IP"),
        (
            parse_listen("TCP:db:80").map(|_| ()),
            "first address must listen",
        ),
        (
            parse_target("TCP-L:80").map(|_| ()),
            "second address must connect",
        ),
        (parse_target("127.0.0.1:0").map(|_| ()), "port 0"),
        (
            parse_listen("TCP-LISTEN:80,,fork").map(|_| ()),
            "an empty option",
        ),
        (
            parse_listen("TCP-LISTEN:80,fork,").map(|_| ()),
            "an empty option",
        ),
        (
            parse_target("TCP:db:5432,,nodelay").map(|_| ()),
            "an empty option",
        ),
        (parse_target("TCP:db:5432,").map(|_| ()), "an empty option"),
        (
            parse_listen("TCP-LISTEN:80,bind=notanip").map(|_| ()),
            "`bind=notanip`: expected an IP address",
        ),
    ];
    for (result, expected) in cases {
        let err = result.expect_err(expected).to_string();
        assert!(err.contains(expected), "expected `{expected}` in `{err}`");
    }
}

#[test]
fn udp_addresses_parse_in_both_forms() {
    let l = parse_listen("UDP-LISTEN:5353,fork,reuseaddr,so-reuseport,bind=127.0.0.1").unwrap();
    let ListenEndpoint::Udp(udp) = &l.endpoint else {
        panic!("a UDP listener: {l:?}")
    };
    assert_eq!(
        (&udp.host, udp.port, udp.reuseaddr, udp.reuseport, l.once),
        (&v4(127, 0, 0, 1), 5353, true, true, false)
    );
    assert!(
        parse_listen("udp6-listen:53").unwrap().once,
        "without fork, one client"
    );
    let l = parse_listen("udp://127.0.0.1:5353").unwrap();
    assert!(l.is_udp() && !l.once && l.tls.is_none());
    for text in [
        "UDP:127.0.0.1:53",
        "udp-connect:127.0.0.1:53",
        "udp://127.0.0.1:53",
    ] {
        let t = parse_target(text).unwrap();
        let TargetEndpoint::Udp(udp) = &t.endpoint else {
            panic!("a UDP target: {t:?}")
        };
        assert_eq!((&udp.host, udp.port), (&v4(127, 0, 0, 1), 53), "{text}");
    }
    let t = parse_target("UDP:dns:53,container=web").unwrap();
    assert_eq!(t.netns, Some("container:web".parse().unwrap()));
    assert!(parse_target("UDP4:[::1]:53").is_err(), "family checked");
}

#[test]
fn udp_pairs_with_udp_only_and_takes_no_tls() {
    let err = parse_pair("UDP-LISTEN:53,fork", "TCP:127.0.0.1:53").unwrap_err();
    assert!(
        err.to_string().contains("its target must be UDP too"),
        "{err}"
    );
    let err = parse_pair("TCP-LISTEN:53,fork", "UDP:127.0.0.1:53").unwrap_err();
    assert!(
        err.to_string().contains("its listener must be UDP too"),
        "{err}"
    );
    assert!(parse_pair("UDP-LISTEN:53,fork", "UDP:127.0.0.1:53").is_ok());
    let err = parse_listen("UDP-LISTEN:53,cert=/x.pem").unwrap_err();
    assert!(err.to_string().contains("`cert` is a TLS option"), "{err}");
    let err = parse_target("UDP:127.0.0.1:53,verify=0").unwrap_err();
    assert!(err.to_string().contains("no DTLS"), "{err}");
    let err = parse_listen("UDP-RECVFROM:53").unwrap_err();
    assert!(err.to_string().contains("UDP-LISTEN:<port>,fork"), "{err}");
    let err = parse_listen("UDP-LISTEN:53,backlog=5").unwrap_err();
    assert!(err.to_string().contains("no accept queue"), "{err}");
}

fn hop(text: &str) -> (Host, u16, ProxyHop) {
    let target = parse_target(text).unwrap();
    let tcp = target.tcp().unwrap().clone();
    (tcp.host, tcp.port, tcp.proxy.expect("a proxied target"))
}

#[test]
fn proxied_targets_take_socat_spelling_and_default_ports() {
    let (proxy, port, via) = hop("SOCKS4A:socks.internal:db.internal:5432,socksuser=app");
    assert_eq!((proxy, port), (Host::Name("socks.internal".into()), 1080));
    assert_eq!(
        via,
        ProxyHop {
            protocol: ProxyProtocol::Socks4a {
                user: Some("app".into())
            },
            host: Host::Name("db.internal".into()),
            port: 5432
        }
    );
    let (_, port, via) = hop("socks4:127.0.0.1:10.0.0.5:80,socksport=1081");
    assert_eq!(port, 1081);
    assert_eq!(via.protocol, ProxyProtocol::Socks4 { user: None });
    let (_, port, via) = hop("SOCKS5-CONNECT:127.0.0.1:1085:[::1]:6379");
    assert_eq!((port, via.protocol), (1085, ProxyProtocol::Socks5));
    assert_eq!(via.host, Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    let (proxy, port, via) = hop(
        "PROXY:[::1]:www.example.org:443,proxyport=3128,proxyauth=u:p,resolve,ignorecr,connect-timeout=2,retry=3",
    );
    assert_eq!(
        (proxy, port),
        (Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)), 3128)
    );
    assert_eq!(
        via.protocol,
        ProxyProtocol::HttpConnect {
            auth: Some(ProxyAuth::Inline("u:p".into())),
            resolve: true
        }
    );
    let (_, port, _) = hop("PROXY:proxy:host:22");
    assert_eq!(port, 8080, "socat's default HTTP proxy port");
    let target =
        parse_target("PROXY:proxy:host:22,proxy-authorization-file=/etc/relay/proxy.cred").unwrap();
    assert_eq!(target.retry, Retry::NONE);
}

#[test]
fn proxied_targets_refuse_what_their_protocol_cannot_carry() {
    for (text, expected) in [
        ("SOCKS4:proxy:[::1]:80", "IPv4 addresses only"),
        (
            "SOCKS4A:proxy:host",
            "expected `SOCKS4A:<proxy>:<host>:<port>`",
        ),
        (
            "SOCKS4:proxy:host:80,proxyport=1",
            "supported: connect-timeout",
        ),
        (
            "SOCKS5-CONNECT:proxy:1080:host:80,socksuser=x",
            "socksport=<port>",
        ),
        ("PROXY:proxy:host:80,socksport=1", "proxyport=<port>"),
        (
            "PROXY:proxy:host:80,proxyauth=nopassword",
            "`<user>:<password>`",
        ),
        ("PROXY:proxy:host:0", "port 0"),
        ("SOCKS4:proxy:host:80,cafile=/x", "supported:"),
        ("SOCKS5-LISTEN:1080", "relay is not a SOCKS server"),
    ] {
        let err = parse_target(text).unwrap_err().to_string();
        assert!(err.contains(expected), "{text}: {err}");
    }
    let err = parse_listen("SOCKS4A:proxy:host:80")
        .unwrap_err()
        .to_string();
    assert!(err.contains("this is a connect address"), "{err}");
}

#[test]
fn socat_family_flags_fill_only_addresses_that_name_none() {
    let mut target = parse_target("TCP:localhost:80").unwrap();
    target.default_family(Family::V6);
    assert_eq!(target.tcp().unwrap().family, Family::V6);
    let mut target = parse_target("TCP4:localhost:80").unwrap();
    target.default_family(Family::V6);
    assert_eq!(target.tcp().unwrap().family, Family::V4);
    let mut listen = parse_listen("TCP-LISTEN:80,fork").unwrap();
    listen.default_family(Family::V6);
    let ListenEndpoint::Tcp(tcp) = &listen.endpoint else {
        panic!("a TCP listener");
    };
    assert_eq!(
        (tcp.family, &tcp.host),
        (Family::V6, &Host::Ip(Ipv6Addr::UNSPECIFIED.into()))
    );
    let mut listen = parse_listen("TCP-LISTEN:80,fork,bind=127.0.0.1").unwrap();
    listen.default_family(Family::V4);
    let ListenEndpoint::Tcp(tcp) = &listen.endpoint else {
        panic!("a TCP listener");
    };
    assert_eq!(tcp.host, Host::Ip(Ipv4Addr::LOCALHOST.into()));
}

#[test]
fn file_addresses_read_their_open_options() {
    let target = parse_target("OPEN:/var/log/app.log,ignoreeof,rdonly").unwrap();
    let spec = target.file().expect("a file target");
    assert!(spec.ignore_eof && spec.kind == FileKind::Open);
    assert_eq!(spec.access, Some(Access::ReadOnly));
    let listen = parse_listen("CREATE:/tmp/out,perm=0600").unwrap();
    let spec = listen.file().expect("a file first");
    assert!(listen.once && spec.create && spec.truncate && spec.perm == 0o600);
    assert_eq!(spec.access_for(true, true), Access::WriteOnly);
    let open = parse_target("FILE:/dev/ttyS0,raw,echo=0").unwrap();
    let spec = open.file().unwrap();
    assert!(spec.raw && spec.echo == Some(false));
    assert_eq!(spec.access_for(true, false), Access::ReadOnly);
    assert_eq!(spec.access_for(true, true), Access::ReadWrite);
    let (pty, _) = parse_pair("PTY,link=/tmp/ttyV0,raw,echo=0", "TCP:127.0.0.1:2000").unwrap();
    let spec = pty.file().expect("a PTY first");
    assert_eq!(spec.kind, FileKind::Pty);
    assert_eq!(
        spec.link.as_deref(),
        Some(std::path::Path::new("/tmp/ttyV0"))
    );
    for (text, says) in [
        ("PTY,creat", "on PTY"),
        ("PTY:/dev/x", "`PTY` is not supported here"),
        ("PIPE:", "unnamed pipes"),
        ("OPEN:/x,excl", "`excl`"),
        ("CREATE:/x,rdwr", "writing only"),
        ("OPEN:/x,perm=999", "octal"),
        ("OPEN:/x,ignoreeof,nonblock", "file address"),
        ("UNIX-CONNECT:/x.sock,ignoreeof", "UNIX connect address"),
    ] {
        let err = parse_target(text).unwrap_err().to_string();
        assert!(err.contains(says), "{text}: {err}");
    }
}

#[test]
fn vsock_addresses_take_cid_and_port() {
    let listen = parse_listen("VSOCK-LISTEN:5000,fork,cid=3").unwrap();
    assert_eq!(
        listen.endpoint,
        ListenEndpoint::Vsock(VsockAddress { cid: 3, port: 5000 })
    );
    assert!(!listen.once);
    let target = parse_target("VSOCK-CONNECT:2:5000,retry=3").unwrap();
    assert_eq!(
        target.endpoint,
        TargetEndpoint::Vsock(VsockAddress { cid: 2, port: 5000 })
    );
    for (text, says) in [
        ("VSOCK-CONNECT:5000", "VSOCK-CONNECT:<cid>:<port>"),
        ("VSOCK-CONNECT:host:5000", "not a VSOCK context id"),
        ("VSOCK-CONNECT:2:5000,nodelay", "on VSOCK-CONNECT"),
    ] {
        let err = parse_target(text).unwrap_err().to_string();
        assert!(err.contains(says), "{text}: {err}");
    }
    let err = parse_listen("VSOCK-LISTEN:x").unwrap_err().to_string();
    assert!(err.contains("not a VSOCK port"), "{err}");
}

#[test]
fn proxied_and_vsock_targets_have_url_forms_meaning_the_socat_ones() {
    for (url, socat) in [
        (
            "socks5://bastion:1081/db.internal:5432",
            "SOCKS5-CONNECT:bastion:1081:db.internal:5432",
        ),
        (
            "socks4a://bastion/db.internal:5432",
            "SOCKS4A:bastion:db.internal:5432",
        ),
        (
            "socks4://bastion:1080/10.0.0.5:22",
            "SOCKS4:bastion:10.0.0.5:22",
        ),
        (
            "http-connect://squid:3128/git.internal:22",
            "PROXY:squid:3128:git.internal:22",
        ),
        ("vsock://2:5000", "VSOCK-CONNECT:2:5000"),
    ] {
        let (a, b) = (parse_target(url).unwrap(), parse_target(socat).unwrap());
        assert_eq!(a.endpoint, b.endpoint, "{url} is {socat}");
        assert_eq!(a.text, url);
    }
    let err = parse_target("socks5://bastion:1080")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("socks5://<proxy>[:<port>]/<host>:<port>"),
        "{err}"
    );
}

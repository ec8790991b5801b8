# relay in an image FROM scratch: the static binary and a CA bundle, nothing
# else. No registry is needed to build it.
#
#   cargo xtask dist                                   # target/dist/{relay,ca-certificates.crt,...}
#   docker build -f Dockerfile target/dist -t relay:0.1.0
#
# Forwarding runs as an unprivileged user (65534, "nobody"); ports below 1024
# need `--cap-add NET_BIND_SERVICE` (or a port >= 1024 mapped with -p):
#
#   docker run --rm -p 8080:8080 relay:0.1.0 forward 0.0.0.0:8080 backend:80 --metrics 0.0.0.0:9100
#
# `relay observe` (and `--observe`) loads eBPF programs, attaches them at TC
# and enters other network namespaces. It needs root in the container and
# these capabilities (Docker's defaults have none of them):
#   CAP_BPF, CAP_PERFMON   load the programs, read their maps
#   CAP_NET_ADMIN          attach at TC ingress/egress (TCX links)
#   CAP_SYS_ADMIN          setns() into a target's namespace; --bpf-stats
# CAP_SYS_ADMIN also grants what CAP_BPF and CAP_PERFMON do, so on Docker
# 20.10 (Debian 12), which does not know the names BPF and PERFMON, add
# NET_ADMIN and SYS_ADMIN only. Add the host's pid namespace for pid: and
# container: targets, the Docker socket for container names, and the
# host's /run/netns (at /var/run/netns: there is no /var/run -> /run link
# in the image) for `ip netns` names:
#
#   docker run --rm --user 0 --network host --pid host \
#     --cap-drop ALL --cap-add BPF --cap-add PERFMON --cap-add NET_ADMIN --cap-add SYS_ADMIN \
#     -v /var/run/docker.sock:/var/run/docker.sock -v /run/netns:/var/run/netns:ro \
#     relay:0.1.0 observe container:web --metrics 127.0.0.1:9100
#
# Tested by tests/tests/deploy.rs: build, --help, a forward over loopback
# with --network host as uid 65534, and `observe netns:<name>` with
# --cap-drop ALL --cap-add NET_ADMIN --cap-add SYS_ADMIN.
FROM scratch
COPY relay /relay
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
USER 65534:65534
EXPOSE 9100
# /healthz answers 200 once every listener is bound and every observer
# attached; orchestrators probe it on the --metrics address.
ENTRYPOINT ["/relay"]
CMD ["--help"]

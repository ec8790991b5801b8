// SPDX-License-Identifier: GPL-2.0
/* sockmap: relay a plain TCP connection's bytes between its two sockets
 * inside the kernel, without a trip through userspace.
 *
 * relay puts both sockets of a connection into `relay_targets` (no program:
 * there they are only redirect destinations), records each one's peer in
 * `relay_links`, and only then adds them to `relay_sources`, whose stream
 * verdict program redirects every arriving skb to the egress of the peer.
 * Because the peer is a destination before the first byte is judged, no
 * byte meets a missing peer. Userspace still owns the connection: it sees
 * FIN and errors on the sockets, waits for the redirected bytes to reach the
 * peer before it forwards a FIN, and reads the byte counts from here. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "sockmap.h"

#define RELAY_MAX_SOCKETS 65536

/* Every socket on the sockmap path, keyed by socket cookie, as a redirect
 * destination. Written by relay (insert after connect, delete at close);
 * read by the verdict program through bpf_sk_redirect_hash. No program is
 * attached to it. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, RELAY_MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u32);
} relay_targets SEC(".maps");

/* The same sockets once their peers are destinations: relay attaches the
 * verdict program to this map, so entering it starts the redirect. Written
 * by relay; the kernel runs the program for its members. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, RELAY_MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u32);
} relay_sources SEC(".maps");

/* Socket cookie -> its peer and the bytes redirected to it. Written by
 * relay (created before the socket enters relay_sources, deleted at close)
 * and by the verdict program (the byte count); read by relay for metrics,
 * idle tracking and the flush before a forwarded FIN. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RELAY_MAX_SOCKETS);
	__type(key, __u64);
	__type(value, struct relay_link);
} relay_links SEC(".maps");

SEC("sk_skb/stream_verdict")
int relay_redirect(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct relay_link *link = bpf_map_lookup_elem(&relay_links, &cookie);
	__u32 len = skb->len;

	/* Not (or no longer) paired: leave the bytes to userspace, which
	 * copies them like the copy path would. */
	if (!link)
		return SK_PASS;
	/* A FIN that came in a segment of its own reaches the verdict as an
	 * empty skb. Redirected, the peer's send of nothing would fail and
	 * break its pipe (EPIPE); passed, it is the EOF userspace reads and
	 * forwards once the redirected bytes have left. */
	if (len == 0)
		return SK_PASS;
	if (bpf_sk_redirect_hash(skb, &relay_targets, &link->peer, 0) != SK_PASS)
		/* The peer left relay_targets (it is closing): userspace reads
		 * these bytes, fails to write them, and resets both sides. */
		return SK_PASS;
	__sync_fetch_and_add(&link->bytes, len);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";

// SPDX-License-Identifier: GPL-2.0
/* observe: count what crosses the interfaces of a network namespace.
 *
 * Attached at TC ingress and egress (TCX links where the kernel has them).
 * Counts packets and bytes per interface, direction, protocol class and IP
 * family; TCP SYN, SYN-ACK, FIN and RST; and per-flow packets and bytes in
 * an LRU map. Never changes a packet or a verdict: every exit is
 * TC_ACT_UNSPEC (TCX_NEXT), so programs after this one still decide. */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "observe.h"

/* Written by this program, read and summed over CPUs by relay's collector. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct relay_traffic_key);
	__type(value, struct relay_counter);
} traffic SEC(".maps");

/* Written by this program, read and summed over CPUs by relay's collector. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct relay_flag_key);
	__type(value, __u64);
} tcp_flags SEC(".maps");

/* Written by this program; relay's collector reads it to rank the top flows.
 * LRU: the least recently seen flows make room, so memory stays bounded. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct relay_flow_key);
	__type(value, struct relay_counter);
} flows SEC(".maps");

/* Written by relay when it attaches (ifindex -> bytes before the IP header:
 * 14 for Ethernet and loopback, 0 for L3 devices such as WireGuard); read
 * here. An interface missing from it is taken as Ethernet. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} l2_len SEC(".maps");

static __always_inline void add(void *map, const void *key, __u64 bytes)
{
	struct relay_counter *c = bpf_map_lookup_elem(map, key);
	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	} else {
		struct relay_counter fresh = { .packets = 1, .bytes = bytes };
		bpf_map_update_elem(map, key, &fresh, BPF_NOEXIST);
	}
}

static __always_inline void count_flag(__u32 ifindex, __u8 direction, __u8 flag)
{
	struct relay_flag_key key = { .ifindex = ifindex, .direction = direction, .flag = flag };
	__u64 *n = bpf_map_lookup_elem(&tcp_flags, &key);
	if (n) {
		*n += 1;
	} else {
		__u64 one = 1;
		bpf_map_update_elem(&tcp_flags, &key, &one, BPF_NOEXIST);
	}
}

static __always_inline __u8 proto_class(__u8 ipproto)
{
	switch (ipproto) {
	case IPPROTO_TCP:
		return RELAY_PROTO_TCP;
	case IPPROTO_UDP:
		return RELAY_PROTO_UDP;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		return RELAY_PROTO_ICMP;
	default:
		return RELAY_PROTO_OTHER;
	}
}

static __always_inline int observe(struct __sk_buff *skb, __u8 direction)
{
	__u32 ifindex = skb->ifindex;
	__u32 *l2 = bpf_map_lookup_elem(&l2_len, &ifindex);
	__u32 l3 = l2 ? (*l2 & 0xff) : ETH_HLEN;
	struct relay_traffic_key key = { .ifindex = ifindex, .direction = direction, .proto = RELAY_PROTO_OTHER };
	struct relay_flow_key flow = { .ifindex = ifindex };
	__u32 l4 = 0;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, l3, &ip, sizeof(ip)) < 0)
			goto count;
		key.family = 4;
		flow.saddr[0] = ip.saddr;
		flow.daddr[0] = ip.daddr;
		flow.proto = ip.protocol;
		l4 = l3 + ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, l3, &ip6, sizeof(ip6)) < 0)
			goto count;
		key.family = 6;
		__builtin_memcpy(flow.saddr, &ip6.saddr, sizeof(flow.saddr));
		__builtin_memcpy(flow.daddr, &ip6.daddr, sizeof(flow.daddr));
		/* Extension headers are not walked: such packets count as "other". */
		flow.proto = ip6.nexthdr;
		l4 = l3 + sizeof(ip6);
	} else {
		goto count;
	}
	flow.family = key.family;
	key.proto = proto_class(flow.proto);

	if (flow.proto == IPPROTO_TCP) {
		struct tcphdr tcp;
		if (bpf_skb_load_bytes(skb, l4, &tcp, sizeof(tcp)) == 0) {
			flow.sport = bpf_ntohs(tcp.source);
			flow.dport = bpf_ntohs(tcp.dest);
			if (tcp.syn)
				count_flag(ifindex, direction, tcp.ack ? RELAY_TCP_SYNACK : RELAY_TCP_SYN);
			if (tcp.fin)
				count_flag(ifindex, direction, RELAY_TCP_FIN);
			if (tcp.rst)
				count_flag(ifindex, direction, RELAY_TCP_RST);
		}
	} else if (flow.proto == IPPROTO_UDP) {
		struct udphdr udp;
		if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)) == 0) {
			flow.sport = bpf_ntohs(udp.source);
			flow.dport = bpf_ntohs(udp.dest);
		}
	}
	add(&flows, &flow, skb->len);
count:
	add(&traffic, &key, skb->len);
	return TC_ACT_UNSPEC;
}

SEC("classifier")
int observe_ingress(struct __sk_buff *skb)
{
	return observe(skb, RELAY_INGRESS);
}

SEC("classifier")
int observe_egress(struct __sk_buff *skb)
{
	return observe(skb, RELAY_EGRESS);
}

char LICENSE[] SEC("license") = "GPL";

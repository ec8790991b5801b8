// SPDX-License-Identifier: GPL-2.0
/* observe: count what crosses the interfaces of a network namespace.
 *
 * Attached at TC ingress and egress (TCX links where the kernel has them).
 * Counts packets and bytes per interface, direction, protocol class and IP
 * family; TCP SYN, SYN-ACK, FIN and RST; per-flow packets and bytes in
 * an LRU map; the latency of TCP handshakes (SYN to SYN-ACK) in a
 * histogram, on segments with SYN set only; and DNS over UDP (port 53
 * only): messages by type and rcode, and response latency. Never changes
 * a packet or a verdict: every exit is
 * TC_ACT_UNSPEC (TCX_NEXT), so programs after this one still decide.
 *
 * With capture on (relay observe --pcap), packets that pass the filter and
 * the sampler are copied (up to the snap length) into the `samples` ring
 * buffer; every packet not delivered is counted by reason in
 * `capture_stats`. */

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

/* Written and read here: when each SYN was seen, until its SYN-ACK. LRU,
 * so a flood of unanswered SYNs evicts the oldest (their handshakes go
 * unmeasured, none is measured wrong). An answered entry stays, set to 0,
 * so a retransmitted SYN or SYN-ACK of that handshake is not measured
 * again; the ISN in the key keeps a later connection on the same 4-tuple
 * apart. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct relay_syn_key);
	__type(value, __u64);
} syn_pending SEC(".maps");

/* Written by this program (one entry per enum relay_handshake_dir), read
 * and summed over CPUs by relay's collector. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RELAY_HS_DIRS);
	__type(key, __u32);
	__type(value, struct relay_latency_hist);
} handshakes SEC(".maps");

/* DNS messages by kind, direction, query type and rcode; read and summed
 * over CPUs by relay's collector. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct relay_dns_key);
	__type(value, __u64);
} dns SEC(".maps");

/* Written and read here: when each query was seen, until its response
 * (LRU: unanswered queries make room; a response without its query is
 * counted, not timed). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct relay_dns_pending_key);
	__type(value, __u64);
} dns_pending SEC(".maps");

/* DNS response latency, one entry per direction, read by relay. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RELAY_HS_DIRS);
	__type(key, __u32);
	__type(value, struct relay_latency_hist);
} dns_latency SEC(".maps");

/* Written by relay when it attaches (ifindex -> bytes before the IP header:
 * 14 for Ethernet and loopback, 0 for L3 devices such as WireGuard); read
 * here. An interface missing from it is taken as Ethernet. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} l2_len SEC(".maps");

/* ---- capture tunables: set by relay at load time (EbpfLoader::override_global);
 * with capture_on == 0 the verifier prunes the whole capture path. */
const volatile __u32 capture_on = 0;
/* Keep one matched packet in sample_every per CPU; 1 keeps all, 0 none
 * (only the flow head, when flow_head > 0). */
const volatile __u32 sample_every = 1;
/* Keep the first flow_head packets of every flow, and every SYN, FIN and
 * RST, whatever the sampler says. 0: off. */
const volatile __u32 flow_head = 0;
const volatile __u32 snaplen = RELAY_SNAPLEN_MAX;
/* Wake relay's reader only once this many bytes wait in the ring buffer
 * (it also drains on a short timer): a wakeup per sample costs more than
 * the sample itself. 0: wake for every sample. */
const volatile __u32 wakeup_bytes = 0;
/* 1: run the capture filter (the stubs below, patched by relay); 0: every
 * packet matches and the verifier prunes the calls. */
const volatile __u32 filter_on = 0;
/* --direction: 0 both, RELAY_INGRESS + 1 ingress only, RELAY_EGRESS + 1
 * egress only. */
const volatile __u32 capture_direction = 0;

/* Written here (samples), read by relay's capture thread. Size: --ring-size,
 * set by relay at load time. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} samples SEC(".maps");

/* Written here (increments), read by relay (pcapng statistics blocks and
 * metrics). relay inserts every (ifindex, stat) key at attach time, so the
 * program only increments its own CPU's value and no count is ever lost to
 * a racing insert. max_entries: RELAY_CAP_STATS per interface, set by relay
 * when capturing (the small default costs nothing when not). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, RELAY_CAP_STATS);
	__type(key, struct relay_capture_key);
	__type(value, __u64);
} capture_stats SEC(".maps");

/* Written by relay: index 0 is 1 while capturing; relay clears it before
 * its final read so the counts and the ring buffer settle. Read here. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} capture_ctl SEC(".maps");

/* Written here: packets seen per flow (both directions in one entry), for
 * --flow-head. Nobody else reads it. LRU, so memory stays bounded; relay
 * sizes it (65536 flows) only with --flow-head: an LRU map is allocated
 * whole when created. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1);
	__type(key, struct relay_flow_key);
	__type(value, __u64);
} capture_flows SEC(".maps");

/* Written and read here: the 1/N sampler's count of matched packets, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} sampler SEC(".maps");

/* A sample being assembled: header and frame bytes, contiguous, so one
 * bpf_ringbuf_output copies both. */
struct relay_scratch {
	struct relay_sample hdr;
	__u8 data[RELAY_SNAPLEN_MAX];
};

/* Written and read here only: one scratch sample per CPU (a sample is too
 * big for the stack). TC programs on one CPU do not nest (egress runs with
 * bottom halves off, ingress in softirq), so a CPU's slot has one user.
 * max_entries: the number of possible CPUs, set by relay at load time. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct relay_scratch);
} capture_scratch SEC(".maps");

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

/* Adds one to the __u64 counter at `key` of per-CPU hash `map`. */
static __always_inline void increment(void *map, const void *key)
{
	__u64 *n = bpf_map_lookup_elem(map, key);
	if (n) {
		*n += 1;
	} else {
		__u64 one = 1;
		bpf_map_update_elem(map, key, &one, BPF_NOEXIST);
	}
}

static __always_inline void count_flag(__u32 ifindex, __u8 direction, __u8 flag)
{
	struct relay_flag_key key = { .ifindex = ifindex, .direction = direction, .flag = flag };
	increment(&tcp_flags, &key);
}

/* The histogram bucket of a latency (see RELAY_HS_BUCKETS in observe.h). */
static __always_inline __u64 latency_bucket(__u64 ns)
{
	__u64 us = ns / 1000;
	__u64 log2 = 0;
	__u64 v = us;

	if (us < (1ULL << RELAY_HS_MIN_LOG2))
		return 0;
	if (us >= (1ULL << RELAY_HS_MAX_LOG2))
		return RELAY_HS_BUCKETS - 1;
	if (v >> 16) {
		v >>= 16;
		log2 += 16;
	}
	if (v >> 8) {
		v >>= 8;
		log2 += 8;
	}
	if (v >> 4) {
		v >>= 4;
		log2 += 4;
	}
	if (v >> 2) {
		v >>= 2;
		log2 += 2;
	}
	if (v >> 1)
		log2 += 1;
	__u64 sub = (us >> (log2 - RELAY_HS_SUB_LOG2)) & (RELAY_HS_SUB - 1);
	return 1 + (log2 - RELAY_HS_MIN_LOG2) * RELAY_HS_SUB + sub;
}

/* Adds a latency of `took` ns to direction `dir` of histogram map `map`. */
static __always_inline void record_latency(void *map, __u32 dir, __u64 took)
{
	struct relay_latency_hist *hist = bpf_map_lookup_elem(map, &dir);
	if (!hist)
		return;
	/* 64-bit all the way: a 32-bit index is checked on a zero-extended
	 * copy, and the verifier does not carry that bound back to the one used. */
	__u64 bucket = latency_bucket(took);
	hist->sum_ns += took;
	if (bucket < RELAY_HS_BUCKETS)
		hist->count[bucket] += 1;
}

/* A segment with SYN set: a SYN starts timing its handshake, a SYN-ACK
 * ends it. The target's end of the connection is the source going out
 * and the destination coming in, so both halves find the same key. A
 * retransmitted SYN keeps the first one's time: the latency is what the
 * connecting side waited, retransmission timeouts included. */
static __always_inline void handshake(const struct relay_flow_key *flow, __u8 direction,
				      const struct tcphdr *tcp)
{
	struct relay_syn_key key = { .family = flow->family };
	int out = direction == RELAY_EGRESS;

	__builtin_memcpy(key.local, out ? flow->saddr : flow->daddr, sizeof(key.local));
	__builtin_memcpy(key.remote, out ? flow->daddr : flow->saddr, sizeof(key.remote));
	key.local_port = out ? flow->sport : flow->dport;
	key.remote_port = out ? flow->dport : flow->sport;
	if (!tcp->ack) {
		__u64 now = bpf_ktime_get_ns();
		key.dir = out ? RELAY_HS_OUTBOUND : RELAY_HS_INBOUND;
		key.isn = bpf_ntohl(tcp->seq);
		bpf_map_update_elem(&syn_pending, &key, &now, BPF_NOEXIST);
		return;
	}
	key.dir = out ? RELAY_HS_INBOUND : RELAY_HS_OUTBOUND;
	key.isn = bpf_ntohl(tcp->ack_seq) - 1;
	__u64 *sent = bpf_map_lookup_elem(&syn_pending, &key);
	if (!sent || *sent == 0)
		return;
	__u64 took = bpf_ktime_get_ns() - *sent;
	*sent = 0;
	record_latency(&handshakes, key.dir, took);
}

/* The query types counted by name; any other counts as 0 ("other"). */
static __always_inline __u16 dns_qtype(__u16 qtype)
{
	switch (qtype) {
	case 1:   /* A */
	case 2:   /* NS */
	case 5:   /* CNAME */
	case 6:   /* SOA */
	case 12:  /* PTR */
	case 15:  /* MX */
	case 16:  /* TXT */
	case 28:  /* AAAA */
	case 33:  /* SRV */
	case 64:  /* SVCB */
	case 65:  /* HTTPS */
	case 255: /* ANY */
		return qtype;
	default:
		return 0;
	}
}

/* Labels of a question name walked to find its type; longer names (or a
 * packet cut short) count with type 0. */
#define RELAY_DNS_MAX_LABELS 32

struct relay_dns_header {
	__u16 id;
	__u16 flags;
	__u16 qdcount;
	__u16 ancount;
	__u16 nscount;
	__u16 arcount;
};

/* The type of the first question of the message whose question section
 * starts at `off` (0 when it cannot be read). */
static __always_inline __u16 dns_question_type(struct __sk_buff *skb, __u32 off)
{
	for (int i = 0; i < RELAY_DNS_MAX_LABELS; i++) {
		__u8 len;
		if (bpf_skb_load_bytes(skb, off, &len, 1) < 0)
			return 0;
		if (len == 0) {
			off += 1;
			goto type;
		}
		if ((len & 0xc0) == 0xc0) { /* a compression pointer ends the name */
			off += 2;
			goto type;
		}
		off += 1 + (len & 0x3f);
	}
	return 0;
type:;
	__u16 qtype;
	if (bpf_skb_load_bytes(skb, off, &qtype, sizeof(qtype)) < 0)
		return 0;
	return dns_qtype(bpf_ntohs(qtype));
}

/* A UDP datagram to or from port 53 at `off` (its payload): a query to
 * the port, a response from it. Counts it by type (and rcode), and times
 * the response from its query (same client, server, port and ID). */
static __always_inline void dns_message(struct __sk_buff *skb, __u32 off,
					const struct relay_flow_key *flow, __u8 direction)
{
	struct relay_dns_header h;
	if (bpf_skb_load_bytes(skb, off, &h, sizeof(h)) < 0)
		return;
	__u16 flags = bpf_ntohs(h.flags);
	int response = flags >> 15;
	if (response ? flow->sport != RELAY_DNS_PORT : flow->dport != RELAY_DNS_PORT)
		return;
	int out = direction == RELAY_EGRESS;
	/* The target asked when its query goes out or its answer comes in. */
	__u8 dir = (response ? !out : out) ? RELAY_HS_OUTBOUND : RELAY_HS_INBOUND;
	struct relay_dns_key key = {
		.kind = response ? RELAY_DNS_RESPONSE : RELAY_DNS_QUERY,
		.direction = dir,
		.rcode = response ? (flags & 0xf) : 0,
		.qtype = h.qdcount ? dns_question_type(skb, off + sizeof(h)) : 0,
	};
	increment(&dns, &key);

	struct relay_dns_pending_key pending = {
		.family = flow->family,
		.direction = dir,
		.id = h.id,
	};
	__builtin_memcpy(pending.client, response ? flow->daddr : flow->saddr, sizeof(pending.client));
	__builtin_memcpy(pending.server, response ? flow->saddr : flow->daddr, sizeof(pending.server));
	pending.client_port = response ? flow->dport : flow->sport;
	if (!response) {
		__u64 now = bpf_ktime_get_ns();
		bpf_map_update_elem(&dns_pending, &pending, &now, BPF_NOEXIST);
		return;
	}
	__u64 *asked = bpf_map_lookup_elem(&dns_pending, &pending);
	if (!asked)
		return;
	__u64 took = bpf_ktime_get_ns() - *asked;
	bpf_map_delete_elem(&dns_pending, &pending);
	record_latency(&dns_latency, dir, took);
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

static __always_inline void capture_count(__u32 ifindex, __u32 stat)
{
	struct relay_capture_key key = { .ifindex = ifindex, .stat = stat };
	__u64 *n = bpf_map_lookup_elem(&capture_stats, &key);
	if (n)
		*n += 1;
}

/* The capture filter: tcpdump's expression, compiled by libpcap to classic
 * BPF and translated to eBPF by relay (relay/src/observe/cbpf.rs), which
 * writes the translation over the padding of these stubs in the object
 * before it is loaded (relay/src/observe/stub.rs). One stub per link type:
 * frames that start with an Ethernet header (DLT_EN10MB: Ethernet, veth,
 * and loopback, which carries a zeroed Ethernet header at TC) and frames
 * that start at the IP header (DLT_RAW: tun, WireGuard, ipip).
 *
 * The padding is RELAY_PCAP_FILTER_INSNS `goto +0`, then `r0 = 1; exit`:
 * relay puts the translation at the end and leaves `goto +0` before it,
 * which the verifier removes (opt_remove_nops), so an unused slot costs
 * nothing per packet. The translation reads the packet only through
 * bpf_skb_load_bytes, which bounds every access, keeps the skb in r6,
 * A, X in r7, r8, the direction (enum relay_direction, for tcpdump's
 * `inbound`/`outbound`) in r9, the scratch memory M[] on this function's
 * stack, and returns nonzero for a match. The asm keeps clang from
 * assuming the result (1) or dropping the arguments: all are decided at
 * load. */
#define RELAY_STR2(x) #x
#define RELAY_STR(x) RELAY_STR2(x)
#define RELAY_PCAP_STUB(name)                                                              \
	static __attribute__((noinline)) int name(struct __sk_buff *skb, __u32 direction) \
	{                                                                                   \
		int match;                                                                  \
		asm volatile(".rept " RELAY_STR(RELAY_PCAP_FILTER_INSNS) "\n\tgoto +0\n\t.endr\n\t%0 = 1" \
			     : "=r"(match)                                                  \
			     : "r"(skb), "r"(direction)                                     \
			     : "memory");                                                   \
		return match;                                                               \
	}

RELAY_PCAP_STUB(relay_pcap_filter_ether)
RELAY_PCAP_STUB(relay_pcap_filter_raw)

/* Does the packet pass --direction and --filter? `l3`: bytes before the IP header. */
static __always_inline int filter_matches(struct __sk_buff *skb, __u32 l3, __u8 direction)
{
	if (capture_direction != 0 && capture_direction != (__u32)direction + 1)
		return 0;
	if (!filter_on)
		return 1;
	if (l3 == 0)
		return relay_pcap_filter_raw(skb, direction) != 0;
	return relay_pcap_filter_ether(skb, direction) != 0;
}

/* Is this packet among the first flow_head of its flow (either direction)? */
static __always_inline int in_flow_head(const struct relay_flow_key *flow)
{
	struct relay_flow_key key = *flow;
	int swap = 0;

	/* One entry for both directions: the smaller (address, port) end first. */
	for (int i = 0; i < 4; i++) {
		if (flow->saddr[i] != flow->daddr[i]) {
			swap = flow->saddr[i] > flow->daddr[i];
			break;
		}
		if (i == 3)
			swap = flow->sport > flow->dport;
	}
	if (swap) {
		__builtin_memcpy(key.saddr, flow->daddr, sizeof(key.saddr));
		__builtin_memcpy(key.daddr, flow->saddr, sizeof(key.daddr));
		key.sport = flow->dport;
		key.dport = flow->sport;
	}
	__u64 *seen = bpf_map_lookup_elem(&capture_flows, &key);
	if (seen)
		return __sync_fetch_and_add(seen, 1) < flow_head;
	__u64 one = 1;
	bpf_map_update_elem(&capture_flows, &key, &one, BPF_NOEXIST);
	return 1;
}

/* Filter, sample, copy: the capture half of a packet's visit. */
static __always_inline void capture(struct __sk_buff *skb, const struct relay_flow_key *flow,
				    __u32 l3, __u8 direction, __u8 tcp_flags_seen)
{
	__u32 ifindex = skb->ifindex;
	__u32 zero = 0;
	__u32 *on = bpf_map_lookup_elem(&capture_ctl, &zero);

	if (!on || !*on)
		return;
	if (!filter_matches(skb, l3, direction)) {
		capture_count(ifindex, RELAY_CAP_FILTERED);
		return;
	}
	capture_count(ifindex, RELAY_CAP_MATCHED);

	int keep = 0;
	if (flow_head > 0 && flow->family != 0) {
		/* Every packet counts towards its flow's head, flagged ones too. */
		keep = in_flow_head(flow);
		if (tcp_flags_seen)
			keep = 1;
	}
	if (!keep && sample_every > 0) {
		__u64 *n = bpf_map_lookup_elem(&sampler, &zero);
		if (n) {
			keep = (*n % sample_every) == 0;
			*n += 1;
		}
	}
	if (!keep) {
		capture_count(ifindex, RELAY_CAP_SAMPLED);
		return;
	}

	__u32 cpu = bpf_get_smp_processor_id();
	struct relay_scratch *s = bpf_map_lookup_elem(&capture_scratch, &cpu);
	if (!s) {
		capture_count(ifindex, RELAY_CAP_RING_FULL);
		return;
	}
	__u64 caplen = skb->len < snaplen ? skb->len : snaplen;
	/* The verifier must see the very register passed to the helper bounded:
	 * keep clang from checking a copy. */
	asm volatile("" : "+r"(caplen));
	s->hdr.ts_ns = bpf_ktime_get_ns();
	s->hdr.ifindex = ifindex;
	s->hdr.len = skb->len;
	s->hdr.direction = direction;
	if (caplen < 1 || caplen > RELAY_SNAPLEN_MAX || bpf_skb_load_bytes(skb, 0, s->data, caplen) < 0)
		caplen = 0;
	s->hdr.caplen = caplen;
	__u64 wake = BPF_RB_FORCE_WAKEUP;
	if (wakeup_bytes > 0 && bpf_ringbuf_query(&samples, BPF_RB_AVAIL_DATA) < wakeup_bytes)
		wake = BPF_RB_NO_WAKEUP;
	if (bpf_ringbuf_output(&samples, s, sizeof(s->hdr) + caplen, wake) < 0) {
		capture_count(ifindex, RELAY_CAP_RING_FULL);
		return;
	}
	capture_count(ifindex, RELAY_CAP_SENT);
	if (caplen < skb->len)
		capture_count(ifindex, RELAY_CAP_TRUNCATED);
}

static __always_inline int observe(struct __sk_buff *skb, __u8 direction)
{
	__u32 ifindex = skb->ifindex;
	__u32 *l2 = bpf_map_lookup_elem(&l2_len, &ifindex);
	__u32 l3 = l2 ? (*l2 & 0xff) : ETH_HLEN;
	struct relay_traffic_key key = { .ifindex = ifindex, .direction = direction, .proto = RELAY_PROTO_OTHER };
	struct relay_flow_key flow = { .ifindex = ifindex };
	__u32 l4 = 0;
	__u8 tcp_flags_seen = 0; /* SYN, FIN or RST */

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
			if (tcp.syn) {
				count_flag(ifindex, direction, tcp.ack ? RELAY_TCP_SYNACK : RELAY_TCP_SYN);
				handshake(&flow, direction, &tcp);
			}
			if (tcp.fin)
				count_flag(ifindex, direction, RELAY_TCP_FIN);
			if (tcp.rst)
				count_flag(ifindex, direction, RELAY_TCP_RST);
			tcp_flags_seen = tcp.syn || tcp.fin || tcp.rst;
		}
	} else if (flow.proto == IPPROTO_UDP) {
		struct udphdr udp;
		if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)) == 0) {
			flow.sport = bpf_ntohs(udp.source);
			flow.dport = bpf_ntohs(udp.dest);
			if (flow.sport == RELAY_DNS_PORT || flow.dport == RELAY_DNS_PORT)
				dns_message(skb, l4 + sizeof(udp), &flow, direction);
		}
	}
	add(&flows, &flow, skb->len);
count:
	add(&traffic, &key, skb->len);
	if (capture_on)
		capture(skb, &flow, l3, direction, tcp_flags_seen);
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

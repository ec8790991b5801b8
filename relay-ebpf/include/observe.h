/* Types shared by observe.bpf.c and relay's userspace (relay/src/observe/maps.rs
 * mirrors every struct with #[repr(C)] and a test asserts sizes and offsets).
 * Change both sides together. */
#ifndef RELAY_OBSERVE_H
#define RELAY_OBSERVE_H

#include <linux/types.h>

enum relay_direction {
	RELAY_INGRESS = 0,
	RELAY_EGRESS = 1,
};

/* Transport protocol class of a packet. */
enum relay_proto {
	RELAY_PROTO_TCP = 0,
	RELAY_PROTO_UDP = 1,
	RELAY_PROTO_ICMP = 2, /* ICMP and ICMPv6 */
	RELAY_PROTO_OTHER = 3,
};

/* TCP flag events counted per interface and direction. */
enum relay_tcp_flag {
	RELAY_TCP_SYN = 0,    /* SYN without ACK: a connection attempt */
	RELAY_TCP_SYNACK = 1, /* SYN with ACK: an accepted attempt */
	RELAY_TCP_FIN = 2,
	RELAY_TCP_RST = 3,
};

/* Key of the `traffic` map: one counter per interface, direction,
 * protocol class and IP family (4, 6, or 0 for non-IP). */
struct relay_traffic_key {
	__u32 ifindex;
	__u8 direction;
	__u8 proto;
	__u8 family;
	__u8 _pad;
};

struct relay_counter {
	__u64 packets;
	__u64 bytes;
};

/* Key of the `tcp_flags` map. */
struct relay_flag_key {
	__u32 ifindex;
	__u8 direction;
	__u8 flag;
	__u16 _pad;
};

/* Key of the `flows` LRU map: one direction of a 5-tuple on one interface.
 * IPv4 addresses use the first word of saddr/daddr, the rest is zero. */
struct relay_flow_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 proto; /* IPPROTO_* number */
	__u16 _pad;
	__u32 ifindex;
};

/* ---- TCP handshake latency (relay_observe_tcp_handshake_seconds) ---- */

/* Which handshake of the target a latency belongs to. */
enum relay_handshake_dir {
	RELAY_HS_OUTBOUND = 0, /* the target's SYN out to the peer's SYN-ACK in */
	RELAY_HS_INBOUND = 1,  /* a peer's SYN in to the target's SYN-ACK out */
	RELAY_HS_DIRS = 2,
};

/* Histogram buckets, log-linear in microseconds: bucket 0 holds latencies
 * under 64 us; then each power of two from 64 us to 2^24 us (16.8 s) is
 * cut into RELAY_HS_SUB equal parts; the last bucket holds the rest.
 * Userspace derives the same bounds (relay/src/observe/handshake.rs). */
#define RELAY_HS_MIN_LOG2 6  /* 64 us */
#define RELAY_HS_MAX_LOG2 24 /* 16.8 s */
#define RELAY_HS_SUB_LOG2 2
#define RELAY_HS_SUB (1 << RELAY_HS_SUB_LOG2)
#define RELAY_HS_BUCKETS (2 + (RELAY_HS_MAX_LOG2 - RELAY_HS_MIN_LOG2) * RELAY_HS_SUB)

/* A latency histogram (the `handshakes` and `dns_latency` per-CPU arrays,
 * one entry per direction). */
struct relay_latency_hist {
	__u64 sum_ns;
	__u64 count[RELAY_HS_BUCKETS];
};

/* Key of the `syn_pending` LRU map: a SYN waiting for its SYN-ACK, from
 * the target's side of the connection. Only the program reads it. */
struct relay_syn_key {
	__u32 local[4];  /* the target's address (IPv4: first word) */
	__u32 remote[4]; /* the peer's */
	__u16 local_port;
	__u16 remote_port;
	__u32 isn; /* the SYN's sequence number: the SYN-ACK acks isn + 1 */
	__u8 family;
	__u8 dir; /* enum relay_handshake_dir */
	__u16 _pad;
};

/* ---- DNS over UDP (relay_observe_dns_*) ---- */

/* The port the programs parse as DNS (a query to it, a response from it). */
#define RELAY_DNS_PORT 53

/* Directions are those of the handshake: OUTBOUND when the target asked
 * (its query out, the answer in), INBOUND when it answered. */
enum relay_dns_kind {
	RELAY_DNS_QUERY = 0,
	RELAY_DNS_RESPONSE = 1,
};

/* Key of the `dns` per-CPU hash: what was counted. The query type is
 * kept only for the common types (see dns_qtype in observe.bpf.c), every
 * other one counts as 0, so the map holds at most
 * 2 kinds x 2 directions x 13 types x 16 rcodes entries. */
struct relay_dns_key {
	__u16 qtype;
	__u8 kind;      /* enum relay_dns_kind */
	__u8 direction; /* enum relay_handshake_dir */
	__u8 rcode;     /* responses: the header's RCODE (0..15) */
	__u8 _pad[3];
};

/* Key of the `dns_pending` LRU map: a query waiting for its response. */
struct relay_dns_pending_key {
	__u32 client[4];
	__u32 server[4];
	__u16 client_port;
	__u16 id;
	__u8 family;
	__u8 direction;
	__u16 _pad;
};

/* ---- capture: sampled packets to userspace (relay observe --pcap) ---- */

/* Largest --snaplen; the per-CPU scratch buffer holds this many bytes. */
#define RELAY_SNAPLEN_MAX 262144
/* eBPF instructions each capture filter stub holds (observe.bpf.c): the
 * longest translated filter relay can load. */
#define RELAY_PCAP_FILTER_INSNS 4096

/* Counters of the `capture_stats` map, per interface. */
enum relay_capture_stat {
	RELAY_CAP_MATCHED = 0,   /* passed the filter */
	RELAY_CAP_FILTERED = 1,  /* rejected by the filter */
	RELAY_CAP_SAMPLED = 2,   /* matched, not picked by 1/N sampling (nor flow head) */
	RELAY_CAP_RING_FULL = 3, /* picked, but the ring buffer had no room */
	RELAY_CAP_SENT = 4,      /* in the ring buffer for relay to write */
	RELAY_CAP_TRUNCATED = 5, /* sent, cut to the snap length */
	RELAY_CAP_STATS = 6,
};

/* Key of the `capture_stats` map. */
struct relay_capture_key {
	__u32 ifindex;
	__u32 stat;
};

/* Header of every record in the `samples` ring buffer; `caplen` bytes of
 * the frame (from the link-layer header) follow it. */
struct relay_sample {
	__u64 ts_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 ifindex;
	__u32 len;    /* the frame's length on the wire (skb->len) */
	__u32 caplen; /* bytes that follow */
	__u8 direction;
	__u8 _pad[3];
};

#endif

/* Types shared by sockmap.bpf.c and relay's userspace (relay/src/forward/sockmap.rs
 * mirrors the struct with #[repr(C)] and a test asserts its size and offsets
 * against the BTF of the committed object). Change both sides together. */
#ifndef RELAY_SOCKMAP_H
#define RELAY_SOCKMAP_H

#include <linux/types.h>

/* Value of the `relay_links` map, keyed by a relayed socket's cookie: where
 * the bytes arriving on that socket go, and how many went there. */
struct relay_link {
	__u64 peer;  /* socket cookie of the other leg of the connection */
	__u64 bytes; /* payload bytes redirected from this socket to `peer` */
};

#endif

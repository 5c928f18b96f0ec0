// In-pod capture for the eBPF mode: the same observable semantics as the iptables rules
// (protocols.md "Redirection inside the pod"), built from sk_assign instead of NAT.
//
// Three tc programs, compiled by bcc with the pod's settings as CFG_* macros:
//
// pod_ingress (every addressed interface, ingress): a new inbound TCP connection (a SYN
//   with no socket of its own yet) is assigned to the 15006 listener, unless it is for
//   15008 (HBONE, which reaches its listener anyway; dropped while none listens) or from
//   the kubelet probe address.
//   The packet keeps its addresses, so the accepted socket's local address is the
//   original destination. Later packets of the flow find that socket by the normal
//   lookup; nothing else is needed for them.
//
// pod_egress (every addressed interface, egress): the app's packets leave here, where
//   sk_assign is not allowed. A packet is turned back into the pod, onto lo's ingress,
//   when (a) a socket in this pod owns its 4-tuple, i.e. it belongs to a connection the
//   capture steered (the app's side of an outbound flow, or the app's replies to the
//   tunnel's transparent socket that carries the client's address), or (b) it is a new
//   outbound connection (a SYN). The packet gets the connection mark so that the policy
//   rule (fwmark -> table with a local default route) delivers it locally even though its
//   destination is not a pod address, as for TPROXY.
//
// lo_ingress (lo, ingress): a turned-back SYN with no socket of its own is assigned to the
//   15001 listener (which must be IP_TRANSPARENT: its SYN-ACK leaves from the original,
//   non-local destination address). Everything else on lo is left alone.
//
// DNS capture (CFG_CAPTURE_DNS): the app's UDP and TCP to port 53, whatever the resolver,
//   is turned back onto lo like outbound TCP, and lo_ingress assigns it to the tunnel's DNS
//   proxy on 127.0.0.1:CFG_DNS_PORT (UDP: the unconnected socket; TCP: the listener)
//   instead of 15001. The packet keeps its addresses: the proxy reads the resolver's
//   address as the datagram's original destination and answers from it (a transparent
//   socket), as conntrack makes the iptables mode's answers come from it.
//
// The tunnel's own packets carry CFG_TUNNEL_MARK and are never touched. Where no tunnel
// listener exists, a new connection is dropped rather than let through: fail closed.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

#ifndef CFG_CAPTURE_DNS
#define CFG_CAPTURE_DNS 0
#endif
#ifndef CFG_DNS_PORT
#define CFG_DNS_PORT 15053
#endif
#define DNS_PORT 53
#define LOOPBACK_ADDR 0x7f000001  // 127.0.0.1, where the DNS proxy listens

#ifndef CFG_RELEASE
// Release (the pod is leaving the mesh): no new connection is steered any more, while the
// packets of connections already steered still are, so they run to their end.
#define CFG_RELEASE 0
#endif

#define LO_IFINDEX 1  // loopback is ifindex 1 in every network namespace
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define IP_OFFSET_MASK 0x1fff

struct pkt {
    struct bpf_sock_tuple tuple;  // as the packet says: an incoming packet's view
    __u8 tcp_flags;
    __u8 proto;  // IPPROTO_TCP, or IPPROTO_UDP (only with DNS capture)
};

// IPv4 TCP, and UDP with DNS capture (the iptables mode captures IPv4 only too). bpf_skb_load_bytes copes with
// non-linear skbs and any IP header length; direct packet access would need both checked.
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p) {
    struct iphdr ip;
    __u8 tcp[14];  // ports .. flags
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return -1;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
        return -1;
    if (ip.version != 4 || ip.ihl < 5)
        return -1;
    if (ip.protocol != IPPROTO_TCP && !(CFG_CAPTURE_DNS && ip.protocol == IPPROTO_UDP))
        return -1;
    if (ip.frag_off & bpf_htons(IP_OFFSET_MASK))
        return -1;  // a later fragment has no TCP header
    __builtin_memset(tcp, 0, sizeof(tcp));
    // UDP: the ports only (a UDP header is 8 bytes; flags stay zero).
    __u32 want = ip.protocol == IPPROTO_TCP ? sizeof(tcp) : 4;
    if (want == 4) {
        if (bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, tcp, 4) < 0)
            return -1;
    } else if (bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, tcp, sizeof(tcp)) < 0) {
        return -1;
    }
    p->proto = ip.protocol;
    __builtin_memset(&p->tuple, 0, sizeof(p->tuple));
    p->tuple.ipv4.saddr = ip.saddr;
    p->tuple.ipv4.daddr = ip.daddr;
    __builtin_memcpy(&p->tuple.ipv4.sport, &tcp[0], 2);
    __builtin_memcpy(&p->tuple.ipv4.dport, &tcp[2], 2);
    p->tcp_flags = tcp[13];
    return 0;
}

static __always_inline int is_new(const struct pkt *p) {
    return (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

static __always_inline int is_loopback_dst(const struct pkt *p) {
    return (p->tuple.ipv4.daddr & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
}

// The state of the socket of this pod that would take the packet (its own connection's,
// or a listener on its port), or -1 when none would.
static __always_inline int socket_state(struct __sk_buff *skb, struct pkt *p) {
    struct bpf_sock *sk =
        bpf_skc_lookup_tcp(skb, &p->tuple, sizeof(p->tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return -1;
    int state = sk->state;
    bpf_sk_release(sk);
    return state;
}

// Whether a socket of this pod owns the packet's 4-tuple: an established or half-open
// connection. A listener only matches the port, and a time-wait socket is a flow that is
// over: neither makes the packet part of a live connection here.
static __always_inline int owned(struct __sk_buff *skb, struct pkt *p) {
    int state = socket_state(skb, p);
    return state >= 0 && state != BPF_TCP_LISTEN && state != BPF_TCP_TIME_WAIT;
}

static __always_inline int is_dns(const struct pkt *p) {
    return CFG_CAPTURE_DNS && p->tuple.ipv4.dport == bpf_htons(DNS_PORT);
}

// Hand a DNS query (UDP) or a new DNS connection (TCP) to the DNS proxy on
// 127.0.0.1:CFG_DNS_PORT, keeping the packet unchanged. No proxy: dropped (fail closed:
// the client retries, as against a resolver that does not answer).
static __always_inline int assign_dns(struct __sk_buff *skb, const struct pkt *p) {
    struct bpf_sock_tuple t = p->tuple;
    t.ipv4.daddr = bpf_htonl(LOOPBACK_ADDR);
    t.ipv4.dport = bpf_htons(CFG_DNS_PORT);
    // Two lookups, not one pointer for both: the verifier tracks each helper's socket type.
    if (p->proto == IPPROTO_UDP) {
        struct bpf_sock *usk =
            bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
        if (!usk)
            return TC_ACT_SHOT;
        long uerr = bpf_sk_assign(skb, usk, 0);
        bpf_sk_release(usk);
        return uerr ? TC_ACT_SHOT : TC_ACT_OK;
    }
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return TC_ACT_SHOT;
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return TC_ACT_SHOT;
    }
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    return err ? TC_ACT_SHOT : TC_ACT_OK;
}

// Hand a new connection to the tunnel's listener on `port`, keeping the packet unchanged.
static __always_inline int assign_to(struct __sk_buff *skb, const struct pkt *p, __u16 port) {
    struct bpf_sock_tuple t = p->tuple;
    t.ipv4.dport = bpf_htons(port);
    struct bpf_sock *sk =
        bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return TC_ACT_SHOT;  // no tunnel listening: never let the flow bypass it
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return TC_ACT_SHOT;
    }
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    return err ? TC_ACT_SHOT : TC_ACT_OK;
}

int pod_ingress(struct __sk_buff *skb) {
    struct pkt p;
    if ((skb->mark & CFG_MASK) == CFG_TUNNEL_MARK)
        return TC_ACT_OK;
    if (parse(skb, &p) < 0)
        return TC_ACT_OK;
    if (p.proto != IPPROTO_TCP)
        return TC_ACT_OK;  // inbound UDP is never captured (as in the iptables mode)
    if (p.tuple.ipv4.saddr == CFG_PROBE_IP)  // kubelet probes, SNATed on the node
        return TC_ACT_OK;
    if (is_loopback_dst(&p))
        return TC_ACT_OK;
    if (p.tuple.ipv4.dport == bpf_htons(CFG_HBONE_PORT)) {
        // HBONE reaches its listener anyway. A new connection while no tunnel listens
        // (between one tunnel's exit and the next one's start) is dropped, not refused,
        // so the dialler's SYN retransmission reaches the next tunnel: as the iptables
        // mode's ISTIO_INPUT rule. Only a SYN pays for the lookup.
        if (!CFG_RELEASE && is_new(&p) && socket_state(skb, &p) < 0)
            return TC_ACT_SHOT;
        return TC_ACT_OK;
    }
    if (CFG_RELEASE || !is_new(&p) || owned(skb, &p))
        return TC_ACT_OK;
    return assign_to(skb, &p, CFG_INBOUND_PORT);
}

int pod_egress(struct __sk_buff *skb) {
    struct pkt p;
    if ((skb->mark & CFG_MASK) == CFG_TUNNEL_MARK)
        return TC_ACT_OK;
    if (parse(skb, &p) < 0)
        return TC_ACT_OK;
    if (p.tuple.ipv4.daddr == CFG_PROBE_IP || is_loopback_dst(&p))
        return TC_ACT_OK;
    if (p.proto == IPPROTO_UDP) {
        if (CFG_RELEASE || !is_dns(&p))
            return TC_ACT_OK;  // only DNS queries; each datagram is a new one
    } else if (!owned(skb, &p) && (CFG_RELEASE || !is_new(&p)))
        return TC_ACT_OK;  // a flow the capture does not own (e.g. one older than it)
    // lo's address is all zeroes; any other destination MAC makes the packet "for another
    // host" on lo, and IP drops it.
    __u8 zero_mac[ETH_ALEN] = {};
    if (bpf_skb_store_bytes(skb, 0, zero_mac, ETH_ALEN, 0) < 0)
        return TC_ACT_SHOT;
    skb->mark = (skb->mark & ~CFG_MASK) | CFG_CONN_MARK;
    return bpf_redirect(LO_IFINDEX, BPF_F_INGRESS);
}

int lo_ingress(struct __sk_buff *skb) {
    struct pkt p;
    if ((skb->mark & CFG_MASK) != CFG_CONN_MARK)
        return TC_ACT_OK;  // ordinary loopback traffic, including the tunnel's own
    if (parse(skb, &p) < 0)
        return TC_ACT_OK;
    if (p.proto == IPPROTO_UDP)
        return CFG_RELEASE ? TC_ACT_OK : assign_dns(skb, &p);
    if (CFG_RELEASE || !is_new(&p) || owned(skb, &p))
        return TC_ACT_OK;
    if (is_dns(&p))
        return assign_dns(skb, &p);
    return assign_to(skb, &p, CFG_OUTBOUND_PORT);
}

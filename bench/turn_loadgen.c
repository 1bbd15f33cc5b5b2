/*
 * turn_loadgen: TURN allocation and relay load generator (and a trivial C TURN relay).
 *
 * Modes:
 *   session  Command-driven TURN client over UDP (IPv4). Reads one command per line on
 *            stdin and answers each with one JSON line on stdout:
 *              alloc N [bind]       open N client sockets and allocate on each (Allocate,
 *                                   401, authenticated Allocate); with "bind" also a
 *                                   ChannelBind of each to its own peer socket
 *              bind                 ChannelBind every allocation that has no channel yet
 *              relay DIR PPS SECS DRAIN_MS
 *                                   open-loop ChannelData load; DIR c2p = client -> server
 *                                   -> peer, p2c = peer -> server -> client (ChannelData)
 *              release              Refresh(LIFETIME=0) every allocation, close sockets
 *              quit
 *            Long-term credentials: key = MD5(user:realm:password), MESSAGE-INTEGRITY =
 *            HMAC-SHA1 (OpenSSL libcrypto), optional FINGERPRINT. Responses are matched by
 *            transaction ID; their integrity is not checked (loopback only).
 *            With --direct no server is used: "alloc N bind" just pairs client and peer
 *            sockets, and relay sends the bytes a server would deliver straight to the
 *            other side (the generator's own capacity, same sockets and system calls).
 *   fake     A trivial single-threaded TURN relay (no authentication: any Allocate with
 *            MESSAGE-INTEGRITY succeeds) for calibrating the generator.
 *
 * Relay load: every --tick-us the sender computes how many datagrams should have gone
 * out since the start (rate * elapsed) and sends the deficit in UDP GSO groups (one
 * sendmsg = --gso equal datagrams to one socket; the receiver sees separate datagrams),
 * visiting the allocations round-robin. Received datagrams are read with recvmmsg from
 * every socket epoll reports readable, once per tick. Each payload carries a run nonce,
 * the allocation index, a global sequence number and the send time, so a datagram counts
 * as delivered only once, at the right socket, with the right channel; latency uses kernel
 * receive timestamps (SO_TIMESTAMPNS).
 *
 * Build: gcc -O2 -Wall -Wextra -o turn_loadgen turn_loadgen.c -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAGIC_COOKIE 0x2112A442u
#define FP_XOR 0x5354554Eu
#define MAX_CLIENTS 30000
#define MAX_NONCE 256
#define MAX_REALM 128
#define REQ_MAX 640
#define RX_BATCH 64
#define RX_SLOT 2048
#define MAX_GSO 64
#define MAX_EVENTS 1024
#define MAX_PACKETS 400000000ull
#define MAX_LAT_SAMPLES 2000000u
#define PAYLOAD_MIN 24
#define PAYLOAD_MAX 1200
#define CHANNEL_BASE 0x4000
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

/* STUN methods and message types */
#define M_BINDING 0x001
#define M_ALLOCATE 0x003
#define M_REFRESH 0x004
#define M_CREATE_PERMISSION 0x008
#define M_CHANNEL_BIND 0x009
#define CLS_SUCCESS 0x0100
#define CLS_ERROR 0x0110
/* attributes */
#define A_USERNAME 0x0006
#define A_MESSAGE_INTEGRITY 0x0008
#define A_ERROR_CODE 0x0009
#define A_CHANNEL_NUMBER 0x000C
#define A_LIFETIME 0x000D
#define A_XOR_PEER_ADDRESS 0x0012
#define A_REALM 0x0014
#define A_NONCE 0x0015
#define A_XOR_RELAYED_ADDRESS 0x0016
#define A_REQUESTED_TRANSPORT 0x0019
#define A_XOR_MAPPED_ADDRESS 0x0020
#define A_FINGERPRINT 0x8028

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(double *user, double *sys) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
    *sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    return *user + *sys;
}

static void die(const char *what) {
    fprintf(stderr, "turn_loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void fail(const char *what) {
    fprintf(stderr, "turn_loadgen: %s\n", what);
    exit(2);
}

static void sleep_until_ns(uint64_t abs_ns) {
    struct timespec ts = {(time_t)(abs_ns / 1000000000ull), (long)(abs_ns % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR && !g_stop) {
    }
}

/* ---- byte helpers ---- */

static void put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint16_t get16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static uint32_t get32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* ---- CRC32 (IEEE, reflected) for FINGERPRINT ---- */

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* ---- STUN encoding ---- */

struct msg {
    uint8_t b[REQ_MAX];
    size_t n;
};

static void msg_start(struct msg *m, uint16_t type, const uint8_t txid[12]) {
    put16(m->b, type);
    put16(m->b + 2, 0);
    put32(m->b + 4, MAGIC_COOKIE);
    memcpy(m->b + 8, txid, 12);
    m->n = 20;
}

static void msg_attr(struct msg *m, uint16_t type, const void *value, size_t len) {
    size_t padded = (len + 3) & ~(size_t)3;
    if (m->n + 4 + padded > sizeof m->b)
        fail("STUN message too long");
    put16(m->b + m->n, type);
    put16(m->b + m->n + 2, (uint16_t)len);
    memcpy(m->b + m->n + 4, value, len);
    memset(m->b + m->n + 4 + len, 0, padded - len);
    m->n += 4 + padded;
    put16(m->b + 2, (uint16_t)(m->n - 20));
}

static void msg_u32(struct msg *m, uint16_t type, uint32_t v) {
    uint8_t b[4];
    put32(b, v);
    msg_attr(m, type, b, 4);
}

static void msg_xor_addr(struct msg *m, uint16_t type, const struct sockaddr_in *a) {
    uint8_t v[8];
    v[0] = 0;
    v[1] = 0x01;
    put16(v + 2, ntohs(a->sin_port) ^ (uint16_t)(MAGIC_COOKIE >> 16));
    put32(v + 4, ntohl(a->sin_addr.s_addr) ^ MAGIC_COOKIE);
    msg_attr(m, type, v, 8);
}

/* MESSAGE-INTEGRITY: HMAC-SHA1 over the message with the length field covering it. */
static void msg_integrity(struct msg *m, const uint8_t key[16]) {
    put16(m->b + 2, (uint16_t)(m->n - 20 + 24));
    uint8_t mac[EVP_MAX_MD_SIZE];
    unsigned maclen = 0;
    if (!HMAC(EVP_sha1(), key, 16, m->b, m->n, mac, &maclen) || maclen != 20)
        fail("HMAC-SHA1 failed");
    msg_attr(m, A_MESSAGE_INTEGRITY, mac, 20);
}

static void msg_fingerprint(struct msg *m) {
    put16(m->b + 2, (uint16_t)(m->n - 20 + 8));
    uint32_t crc = crc32(m->b, m->n) ^ FP_XOR;
    msg_u32(m, A_FINGERPRINT, crc);
}

/* ---- STUN decoding (just what a TURN client and the fake server need) ---- */

struct parsed {
    uint16_t type;
    const uint8_t *txid;
    int error;            /* ERROR-CODE as class*100+number, 0 if absent */
    const uint8_t *realm;
    size_t realm_len;
    const uint8_t *nonce;
    size_t nonce_len;
    int has_relayed;
    struct sockaddr_in relayed;
    int has_peer;
    struct sockaddr_in peer;
    int has_integrity;
    int channel;          /* CHANNEL-NUMBER or -1 */
    long lifetime;        /* LIFETIME or -1 */
};

static void xor_addr(const uint8_t *v, size_t len, struct sockaddr_in *out, int *ok) {
    if (len < 8 || v[1] != 0x01)
        return;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons(get16(v + 2) ^ (uint16_t)(MAGIC_COOKIE >> 16));
    out->sin_addr.s_addr = htonl(get32(v + 4) ^ MAGIC_COOKIE);
    *ok = 1;
}

/* Returns 0 if p is a well-formed STUN message (header and attribute walk), -1 otherwise. */
static int parse_stun(const uint8_t *p, size_t n, struct parsed *out) {
    memset(out, 0, sizeof *out);
    out->channel = -1;
    out->lifetime = -1;
    if (n < 20 || (p[0] & 0xC0) || get32(p + 4) != MAGIC_COOKIE || (size_t)get16(p + 2) + 20 > n)
        return -1;
    n = (size_t)get16(p + 2) + 20;
    out->type = get16(p);
    out->txid = p + 8;
    size_t off = 20;
    while (off + 4 <= n) {
        uint16_t type = get16(p + off), len = get16(p + off + 2);
        const uint8_t *v = p + off + 4;
        if (off + 4 + len > n)
            return -1;
        switch (type) {
        case A_ERROR_CODE:
            if (len >= 4)
                out->error = (v[2] & 7) * 100 + v[3];
            break;
        case A_REALM:
            out->realm = v;
            out->realm_len = len;
            break;
        case A_NONCE:
            out->nonce = v;
            out->nonce_len = len;
            break;
        case A_XOR_RELAYED_ADDRESS:
            xor_addr(v, len, &out->relayed, &out->has_relayed);
            break;
        case A_XOR_PEER_ADDRESS:
            xor_addr(v, len, &out->peer, &out->has_peer);
            break;
        case A_MESSAGE_INTEGRITY:
            out->has_integrity = 1;
            break;
        case A_CHANNEL_NUMBER:
            if (len >= 2)
                out->channel = get16(v);
            break;
        case A_LIFETIME:
            if (len >= 4)
                out->lifetime = (long)get32(v);
            break;
        default:
            break;
        }
        off += 4 + (((size_t)len + 3) & ~(size_t)3);
    }
    return 0;
}

/* ---- options ---- */

struct opts {
    const char *mode;
    const char *host;
    int port;
    const char *peer_host;
    const char *relay_ip;
    const char *user;
    const char *password;
    int payload;
    int gso;
    long tick_us;
    int window;
    long rto_ms;
    int max_tries;
    double op_timeout;
    double duration;
    int fingerprint;
    int direct;
    int rcvbuf;
    double samples_per_sec;
    long max_burst_ms;
};

static struct sockaddr_in make_addr(const char *host, int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "turn_loadgen: not an IPv4 address: %s\n", host);
        exit(2);
    }
    return a;
}

static int udp_socket(const struct sockaddr_in *bind_to, int rcvbuf) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    if (rcvbuf > 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) < 0)
        die("setsockopt SO_RCVBUF");
    int on = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on) < 0)
        die("setsockopt SO_TIMESTAMPNS");
    if (bind_to && bind(fd, (const struct sockaddr *)bind_to, sizeof *bind_to) < 0)
        die("bind");
    return fd;
}

static void local_addr(int fd, struct sockaddr_in *out) {
    socklen_t sl = sizeof *out;
    if (getsockname(fd, (struct sockaddr *)out, &sl) < 0)
        die("getsockname");
}

/* ---- session state ---- */

enum op { OP_NONE, OP_ALLOC, OP_BIND, OP_RELEASE };

struct client {
    int fd, peer_fd;
    struct sockaddr_in local, relayed, peer;
    uint16_t channel;
    uint32_t delivered; /* valid datagrams received for this allocation in a relay step */
    uint8_t allocated, bound, op, tries, auth_rounds, stale;
    uint8_t txid[12];
    uint64_t op_start, last_tx;
    uint16_t nonce_len, req_len;
    char nonce[MAX_NONCE];
    uint8_t req[REQ_MAX];
};

struct opresult {
    int requested, ok, failed, timeouts;
    uint64_t retransmits, stale_nonces, requests;
    int codes[8], code_counts[8], ncodes;
    uint32_t *lat_us;
    int nlat;
};

struct rxstats {
    uint64_t received, valid, duplicates, misrouted, bad, stray, recv_errors;
};

struct session {
    struct opts o;
    struct sockaddr_in server, peer_bind, client_bind;
    int ep;
    struct client *c;
    int n;          /* clients opened */
    uint32_t run_nonce;
    uint32_t txseq;
    char realm[MAX_REALM];
    size_t realm_len;
    uint8_t key[16];
    int have_key;
    /* relay step */
    uint8_t *seen;
    uint64_t seen_bits;
    uint64_t sent;
    uint64_t sample_every;
    uint32_t *lat_us;
    uint32_t nlat;
    struct rxstats rx;
    uint8_t rxbuf[RX_BATCH][RX_SLOT];
    struct mmsghdr rxmsg[RX_BATCH];
    struct iovec rxiov[RX_BATCH];
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(struct timespec))];
    } rxctl[RX_BATCH];
    uint8_t txbuf[MAX_GSO * (PAYLOAD_MAX + 4)];
};

static void new_txid(struct session *s, int idx, uint8_t out[12]) {
    put32(out, s->run_nonce);
    put32(out + 4, (uint32_t)idx);
    put32(out + 8, ++s->txseq);
}

static void derive_key(struct session *s) {
    char buf[MAX_REALM + 256];
    int n = snprintf(buf, sizeof buf, "%s:%.*s:%s", s->o.user, (int)s->realm_len, s->realm,
                     s->o.password);
    unsigned len = 0;
    if (n < 0 || (size_t)n >= sizeof buf || !EVP_Digest(buf, (size_t)n, s->key, &len, EVP_md5(),
                                                         NULL) || len != 16)
        fail("MD5 key derivation failed");
    s->have_key = 1;
}

static void add_auth(struct session *s, struct client *c, struct msg *m) {
    msg_attr(m, A_USERNAME, s->o.user, strlen(s->o.user));
    msg_attr(m, A_REALM, s->realm, s->realm_len);
    msg_attr(m, A_NONCE, c->nonce, c->nonce_len);
    msg_integrity(m, s->key);
}

/* Build the next request of client idx for its current operation into c->req. */
static void build_request(struct session *s, int idx, int authed) {
    struct client *c = &s->c[idx];
    struct msg m;
    new_txid(s, idx, c->txid);
    switch (c->op) {
    case OP_ALLOC:
        msg_start(&m, M_ALLOCATE, c->txid);
        msg_u32(&m, A_REQUESTED_TRANSPORT, 17u << 24);
        break;
    case OP_BIND: {
        msg_start(&m, M_CHANNEL_BIND, c->txid);
        uint8_t v[4];
        put16(v, c->channel);
        put16(v + 2, 0);
        msg_attr(&m, A_CHANNEL_NUMBER, v, 4);
        msg_xor_addr(&m, A_XOR_PEER_ADDRESS, &c->peer);
        break;
    }
    default:
        msg_start(&m, M_REFRESH, c->txid);
        msg_u32(&m, A_LIFETIME, 0);
        break;
    }
    if (authed)
        add_auth(s, c, &m);
    if (s->o.fingerprint)
        msg_fingerprint(&m);
    memcpy(c->req, m.b, m.n);
    c->req_len = (uint16_t)m.n;
}

static void transmit(struct session *s, struct client *c, struct opresult *r) {
    c->last_tx = now_ns();
    c->tries++;
    r->requests++;
    if (send(c->fd, c->req, c->req_len, 0) < 0 && errno != EAGAIN && errno != ECONNREFUSED)
        fprintf(stderr, "turn_loadgen: send: %s\n", strerror(errno));
    (void)s;
}

static void open_client(struct session *s, int idx) {
    struct client *c = &s->c[idx];
    memset(c, 0, sizeof *c);
    c->fd = udp_socket(&s->client_bind, s->o.rcvbuf);
    c->peer_fd = -1;
    c->channel = (uint16_t)(CHANNEL_BASE + (idx & 0xFFF));
    if (!s->o.direct && connect(c->fd, (struct sockaddr *)&s->server, sizeof s->server) < 0)
        die("connect to server");
    local_addr(c->fd, &c->local);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)idx << 1};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl");
}

static void open_peer(struct session *s, int idx) {
    struct client *c = &s->c[idx];
    c->peer_fd = udp_socket(&s->peer_bind, s->o.rcvbuf);
    local_addr(c->peer_fd, &c->peer);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)idx << 1) | 1};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, c->peer_fd, &ev) < 0)
        die("epoll_ctl");
}

static void note_code(struct opresult *r, int code) {
    for (int i = 0; i < r->ncodes; i++)
        if (r->codes[i] == code) {
            r->code_counts[i]++;
            return;
        }
    if (r->ncodes < 8) {
        r->codes[r->ncodes] = code;
        r->code_counts[r->ncodes++] = 1;
    }
}

/* Finish client idx's operation; returns 1 (it leaves the in-flight set). */
static int finish(struct session *s, int idx, struct opresult *r, int ok, int code) {
    struct client *c = &s->c[idx];
    if (ok) {
        r->ok++;
        uint64_t us = (now_ns() - c->op_start) / 1000;
        r->lat_us[r->nlat++] = (uint32_t)(us > UINT32_MAX ? UINT32_MAX : us);
        if (c->op == OP_ALLOC)
            c->allocated = 1;
        else if (c->op == OP_BIND)
            c->bound = 1;
        else
            c->allocated = c->bound = 0;
    } else {
        r->failed++;
        note_code(r, code);
    }
    c->op = OP_NONE;
    (void)s;
    return 1;
}

static void take_nonce(struct session *s, struct client *c, const struct parsed *p) {
    size_t nl = p->nonce_len < MAX_NONCE ? p->nonce_len : MAX_NONCE;
    memcpy(c->nonce, p->nonce, nl);
    c->nonce_len = (uint16_t)nl;
    if (p->realm && (p->realm_len != s->realm_len || memcmp(p->realm, s->realm, s->realm_len) ||
                     !s->have_key)) {
        s->realm_len = p->realm_len < MAX_REALM ? p->realm_len : MAX_REALM;
        memcpy(s->realm, p->realm, s->realm_len);
        derive_key(s);
    }
}

/* Handle one datagram on client idx during an operation; returns 1 when the op ended. */
static int on_op_response(struct session *s, int idx, const uint8_t *p, size_t n,
                          struct opresult *r) {
    struct client *c = &s->c[idx];
    struct parsed m;
    if (c->op == OP_NONE || parse_stun(p, n, &m) < 0 || memcmp(m.txid, c->txid, 12) != 0)
        return 0;
    int cls = m.type & 0x0110;
    if (cls == CLS_SUCCESS) {
        if (c->op == OP_ALLOC) {
            if (!m.has_relayed)
                return finish(s, idx, r, 0, 1);
            c->relayed = m.relayed;
        }
        return finish(s, idx, r, 1, 0);
    }
    if (cls != CLS_ERROR)
        return 0;
    if ((m.error == 401 || m.error == 438) && m.nonce && m.realm) {
        int limit = m.error == 401 ? 2 : 5;
        uint8_t *rounds = m.error == 401 ? &c->auth_rounds : &c->stale;
        if (*rounds < limit) {
            (*rounds)++;
            if (m.error == 438)
                r->stale_nonces++;
            take_nonce(s, c, &m);
            build_request(s, idx, 1);
            c->tries = 0;
            transmit(s, c, r);
            return 0;
        }
    }
    if (m.error == 437 && c->op == OP_RELEASE)
        return finish(s, idx, r, 1, 0);
    return finish(s, idx, r, 0, m.error ? m.error : 2);
}

static void start_op(struct session *s, int idx, int op, struct opresult *r) {
    struct client *c = &s->c[idx];
    c->op = (uint8_t)op;
    c->tries = c->auth_rounds = c->stale = 0;
    c->op_start = now_ns();
    if (s->o.direct) { /* nothing to ask anyone */
        finish(s, idx, r, 1, 0);
        return;
    }
    /* Allocate always starts unauthenticated (the 401 round trip is part of it). */
    build_request(s, idx, op != OP_ALLOC && c->nonce_len > 0 && s->have_key);
    transmit(s, c, r);
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static uint32_t pct(const uint32_t *v, uint32_t n, double q) {
    if (n == 0)
        return 0;
    uint64_t idx = (uint64_t)(q * (double)(n - 1) + 0.5);
    return v[idx];
}

/* Read whatever is queued on fd; returns the number of datagrams read. */
static int recv_batch(struct session *s, int fd) {
    for (int k = 0; k < RX_BATCH; k++) {
        s->rxmsg[k].msg_hdr.msg_controllen = sizeof s->rxctl[k].buf;
        s->rxmsg[k].msg_hdr.msg_namelen = 0;
    }
    int rc = recvmmsg(fd, s->rxmsg, RX_BATCH, MSG_DONTWAIT, NULL);
    if (rc < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            s->rx.recv_errors++; /* e.g. ECONNREFUSED from an ICMP error */
        return 0;
    }
    return rc;
}

/* Run operation op on the clients in list[0..count) with at most --window in flight. */
static void run_ops(struct session *s, int op, const int *list, int count, struct opresult *r) {
    memset(r, 0, sizeof *r);
    r->requested = count;
    r->lat_us = calloc((size_t)count + 1, sizeof(uint32_t));
    int *inflight = calloc((size_t)s->o.window + 1, sizeof(int));
    if (!r->lat_us || !inflight)
        fail("out of memory");
    int next = 0, nin = 0;
    uint64_t rto = (uint64_t)s->o.rto_ms * 1000000ull;
    uint64_t deadline = now_ns() + (uint64_t)(s->o.op_timeout * 1e9);
    struct epoll_event evs[MAX_EVENTS];
    while ((next < count || nin > 0) && !g_stop) {
        while (next < count && nin < s->o.window) {
            int idx = list[next++];
            start_op(s, idx, op, r);
            if (s->c[idx].op != OP_NONE)
                inflight[nin++] = idx;
        }
        if (nin == 0)
            continue;
        int ne = epoll_wait(s->ep, evs, MAX_EVENTS, 2);
        for (int e = 0; e < ne; e++) {
            int idx = (int)(evs[e].data.u64 >> 1);
            int fd = (evs[e].data.u64 & 1) ? s->c[idx].peer_fd : s->c[idx].fd;
            int got;
            while ((got = recv_batch(s, fd)) > 0) {
                if (!(evs[e].data.u64 & 1))
                    for (int k = 0; k < got; k++)
                        on_op_response(s, idx, s->rxbuf[k], s->rxmsg[k].msg_len, r);
                if (got < RX_BATCH)
                    break;
            }
        }
        uint64_t now = now_ns();
        int expired = now > deadline;
        for (int i = 0; i < nin;) {
            struct client *c = &s->c[inflight[i]];
            if (c->op != OP_NONE && (expired || now - c->last_tx > rto)) {
                if (!expired && c->tries < s->o.max_tries) {
                    r->retransmits++;
                    transmit(s, c, r);
                } else {
                    r->timeouts++;
                    finish(s, inflight[i], r, 0, 0);
                }
            }
            if (c->op == OP_NONE)
                inflight[i] = inflight[--nin];
            else
                i++;
        }
        if (expired)
            for (; next < count; next++) {
                r->timeouts++;
                finish(s, list[next], r, 0, 0);
            }
    }
    free(inflight);
}

static void print_opresult(const char *cmd, const struct opresult *r, double secs) {
    qsort(r->lat_us, (size_t)r->nlat, sizeof(uint32_t), cmp_u32);
    printf("{\"cmd\":\"%s\",\"requested\":%d,\"ok\":%d,\"failed\":%d,\"timeouts\":%d,"
           "\"requests\":%llu,\"retransmits\":%llu,\"stale_nonces\":%llu,\"seconds\":%.4f,"
           "\"per_s\":%.1f,\"lat_us\":{\"p50\":%u,\"p90\":%u,\"p99\":%u,\"max\":%u},"
           "\"error_codes\":{",
           cmd, r->requested, r->ok, r->failed, r->timeouts, (unsigned long long)r->requests,
           (unsigned long long)r->retransmits, (unsigned long long)r->stale_nonces, secs,
           secs > 0 ? r->ok / secs : 0.0, pct(r->lat_us, (uint32_t)r->nlat, 0.5),
           pct(r->lat_us, (uint32_t)r->nlat, 0.9), pct(r->lat_us, (uint32_t)r->nlat, 0.99),
           r->nlat ? r->lat_us[r->nlat - 1] : 0);
    for (int i = 0; i < r->ncodes; i++)
        printf("%s\"%d\":%d", i ? "," : "", r->codes[i], r->code_counts[i]);
    printf("}}\n");
    fflush(stdout);
}

/* In direct mode client i and peer i are connected to each other; no server. */
static void pair_direct(struct session *s, int idx) {
    struct client *c = &s->c[idx];
    c->relayed = c->local; /* what the peer sees as its sender */
    if (connect(c->fd, (struct sockaddr *)&c->peer, sizeof c->peer) < 0)
        die("connect client to peer");
}

static void connect_peer(struct session *s, int idx) {
    struct client *c = &s->c[idx];
    const struct sockaddr_in *to = s->o.direct ? &c->local : &c->relayed;
    if (connect(c->peer_fd, (const struct sockaddr *)to, sizeof *to) < 0)
        die("connect peer");
}

static void cmd_bind(struct session *s, const char *name) {
    int *list = calloc((size_t)s->n + 1, sizeof(int));
    if (!list)
        fail("out of memory");
    int count = 0;
    for (int i = 0; i < s->n; i++)
        if (s->c[i].allocated && !s->c[i].bound) {
            if (s->c[i].peer_fd < 0)
                open_peer(s, i);
            list[count++] = i;
        }
    struct opresult r;
    uint64_t t0 = now_ns();
    run_ops(s, OP_BIND, list, count, &r);
    double secs = (double)(now_ns() - t0) / 1e9;
    for (int k = 0; k < count; k++)
        if (s->c[list[k]].bound) {
            if (s->o.direct)
                pair_direct(s, list[k]);
            connect_peer(s, list[k]);
        }
    print_opresult(name, &r, secs);
    free(r.lat_us);
    free(list);
}

static void cmd_alloc(struct session *s, int count, int bind_too) {
    if (count < 1 || s->n + count > MAX_CLIENTS) {
        printf("{\"cmd\":\"alloc\",\"error\":\"count out of range\"}\n");
        fflush(stdout);
        return;
    }
    int *list = calloc((size_t)count, sizeof(int));
    if (!list)
        fail("out of memory");
    for (int k = 0; k < count; k++) {
        list[k] = s->n;
        open_client(s, s->n++);
    }
    struct opresult r;
    uint64_t t0 = now_ns();
    run_ops(s, OP_ALLOC, list, count, &r);
    double secs = (double)(now_ns() - t0) / 1e9;
    print_opresult("alloc", &r, secs);
    free(r.lat_us);
    free(list);
    if (bind_too)
        cmd_bind(s, "bind");
}

static void cmd_release(struct session *s) {
    int *list = calloc((size_t)s->n + 1, sizeof(int));
    if (!list)
        fail("out of memory");
    int count = 0;
    for (int i = 0; i < s->n; i++)
        if (s->c[i].allocated)
            list[count++] = i;
    struct opresult r;
    uint64_t t0 = now_ns();
    run_ops(s, OP_RELEASE, list, count, &r);
    double secs = (double)(now_ns() - t0) / 1e9;
    for (int i = 0; i < s->n; i++) {
        close(s->c[i].fd);
        if (s->c[i].peer_fd >= 0)
            close(s->c[i].peer_fd);
    }
    s->n = 0;
    print_opresult("release", &r, secs);
    free(r.lat_us);
    free(list);
}

/* ---- relay steps ---- */

/* Payload: run nonce (4), allocation index (4), sequence (8), send time (8), filler. */
static void fill_payload(uint8_t *p, int len, uint32_t nonce, uint32_t idx, uint64_t seq,
                         uint64_t t) {
    memcpy(p, &nonce, 4);
    memcpy(p + 4, &idx, 4);
    memcpy(p + 8, &seq, 8);
    memcpy(p + 16, &t, 8);
    (void)len;
}

/* Send up to n datagrams as one GSO group on allocation idx; returns how many went out. */
static uint64_t send_group(struct session *s, int idx, int c2p, uint64_t n) {
    struct client *c = &s->c[idx];
    int header = c2p ? !s->o.direct : s->o.direct; /* who frames ChannelData */
    size_t seg = (size_t)s->o.payload + (header ? 4 : 0);
    uint64_t t = realtime_ns();
    for (uint64_t k = 0; k < n; k++) {
        uint8_t *p = s->txbuf + k * seg;
        if (header) {
            put16(p, c->channel);
            put16(p + 2, (uint16_t)s->o.payload);
            p += 4;
        }
        fill_payload(p, s->o.payload, s->run_nonce, (uint32_t)idx, s->sent + k, t);
    }
    struct iovec iov = {s->txbuf, n * seg};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(uint16_t))];
    } ctl;
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (n > 1) {
        memset(&ctl, 0, sizeof ctl);
        mh.msg_control = ctl.buf;
        mh.msg_controllen = sizeof ctl.buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_UDP;
        cm->cmsg_type = UDP_SEGMENT;
        cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t gso = (uint16_t)seg;
        memcpy(CMSG_DATA(cm), &gso, sizeof gso);
    }
    if (sendmsg(c2p ? c->fd : c->peer_fd, &mh, 0) < 0)
        return 0;
    s->sent += n;
    return n;
}

static uint64_t rx_time(struct msghdr *mh) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
        }
    return realtime_ns();
}

/* A relayed datagram arrived at client idx (is_peer=0) or peer idx (is_peer=1). */
static void on_relayed(struct session *s, int idx, int is_peer, int expect_peer, const uint8_t *p,
                       size_t n, struct msghdr *mh) {
    s->rx.received++;
    if (is_peer != expect_peer) {
        s->rx.stray++;
        return;
    }
    size_t plen = (size_t)s->o.payload;
    if (!is_peer) { /* ChannelData: channel, length, payload (maybe padded) */
        if (n < 4 + plen || get16(p) != s->c[idx].channel || get16(p + 2) != plen) {
            s->rx.bad++;
            return;
        }
        p += 4;
    } else if (n != plen) {
        s->rx.bad++;
        return;
    }
    uint32_t nonce, aidx;
    uint64_t seq, tx;
    memcpy(&nonce, p, 4);
    memcpy(&aidx, p + 4, 4);
    memcpy(&seq, p + 8, 8);
    memcpy(&tx, p + 16, 8);
    if (nonce != s->run_nonce || seq >= s->sent) {
        s->rx.bad++;
        return;
    }
    if (aidx != (uint32_t)idx) {
        s->rx.misrouted++;
        return;
    }
    uint8_t bit = (uint8_t)(1u << (seq & 7));
    if (s->seen[seq >> 3] & bit) {
        s->rx.duplicates++;
        return;
    }
    s->seen[seq >> 3] |= bit;
    s->rx.valid++;
    s->c[idx].delivered++;
    if (seq % s->sample_every == 0 && s->nlat < MAX_LAT_SAMPLES) {
        uint64_t rx = rx_time(mh);
        uint64_t us = rx > tx ? (rx - tx) / 1000 : 0;
        s->lat_us[s->nlat++] = (uint32_t)(us > UINT32_MAX ? UINT32_MAX : us);
    }
}

static void drain_relay(struct session *s, int expect_peer) {
    struct epoll_event evs[MAX_EVENTS];
    for (int rounds = 0; rounds < 64; rounds++) {
        int ne = epoll_wait(s->ep, evs, MAX_EVENTS, 0);
        for (int e = 0; e < ne; e++) {
            int idx = (int)(evs[e].data.u64 >> 1), is_peer = (int)(evs[e].data.u64 & 1);
            int fd = is_peer ? s->c[idx].peer_fd : s->c[idx].fd;
            for (int k = 0; k < 16; k++) {
                int got = recv_batch(s, fd);
                for (int j = 0; j < got; j++)
                    on_relayed(s, idx, is_peer, expect_peer, s->rxbuf[j], s->rxmsg[j].msg_len,
                               &s->rxmsg[j].msg_hdr);
                if (got < RX_BATCH)
                    break;
            }
        }
        if (ne < MAX_EVENTS)
            return;
    }
}

/* Receive-queue drops on our own sockets, from /proc/net/udp. */
static uint64_t own_drops(const struct session *s) {
    static uint8_t mine[2][65536 / 8];
    memset(mine, 0, sizeof mine);
    for (int i = 0; i < s->n; i++) {
        unsigned p = ntohs(s->c[i].local.sin_port);
        mine[0][p >> 3] |= (uint8_t)(1u << (p & 7));
        if (s->c[i].peer_fd >= 0) {
            p = ntohs(s->c[i].peer.sin_port);
            mine[1][p >> 3] |= (uint8_t)(1u << (p & 7));
        }
    }
    FILE *f = fopen("/proc/net/udp", "r");
    if (!f)
        return 0;
    char line[512];
    uint64_t total = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned ip, port;
        if (sscanf(line, " %*d: %x:%x", &ip, &port) != 2 || port > 65535)
            continue;
        int which = ip == s->client_bind.sin_addr.s_addr ? 0
                    : ip == s->peer_bind.sin_addr.s_addr ? 1
                                                         : -1;
        if (which < 0 || !(mine[which][port >> 3] & (1u << (port & 7))))
            continue;
        char *last = strrchr(line, ' ');
        if (last)
            total += strtoull(last + 1, NULL, 10);
    }
    fclose(f);
    return total;
}

static void cmd_relay(struct session *s, const char *dir, double rate, double secs,
                      long drain_ms) {
    int c2p = strcmp(dir, "c2p") == 0;
    int *act = calloc((size_t)s->n + 1, sizeof(int));
    if (!act)
        fail("out of memory");
    int nact = 0;
    for (int i = 0; i < s->n; i++)
        if (s->c[i].bound)
            act[nact++] = i;
    if ((!c2p && strcmp(dir, "p2c") != 0) || rate <= 0 || rate > 20e6 || secs <= 0 ||
        secs > 600 || drain_ms < 0 || drain_ms > 60000 || nact == 0 ||
        rate * secs >= (double)MAX_PACKETS) {
        printf("{\"cmd\":\"relay\",\"error\":\"bad arguments or no channels\"}\n");
        fflush(stdout);
        free(act);
        return;
    }
    uint64_t total = (uint64_t)(rate * secs);
    s->seen_bits = total + 1;
    s->seen = calloc((size_t)(total / 8 + 1), 1);
    double per = s->o.samples_per_sec > 0 ? rate / s->o.samples_per_sec : 0;
    s->sample_every = per < 1 ? 1 : (uint64_t)per;
    if (total / s->sample_every + 1 > MAX_LAT_SAMPLES)
        s->sample_every = total / MAX_LAT_SAMPLES + 1;
    s->lat_us = calloc(MAX_LAT_SAMPLES, sizeof(uint32_t));
    if (!s->seen || !s->lat_us)
        fail("out of memory");
    s->sent = 0;
    s->nlat = 0;
    for (int i = 0; i < s->n; i++)
        s->c[i].delivered = 0;
    memset(&s->rx, 0, sizeof s->rx);
    if (getrandom(&s->run_nonce, sizeof s->run_nonce, 0) != sizeof s->run_nonce)
        die("getrandom");
    drain_relay(s, c2p); /* discard leftovers of an earlier step */
    memset(&s->rx, 0, sizeof s->rx);
    uint64_t drops0 = own_drops(s);
    double u0, s0, u1, s1;
    cpu_seconds(&u0, &s0);
    uint64_t tick = (uint64_t)s->o.tick_us * 1000ull, dur = (uint64_t)(secs * 1e9);
    uint64_t max_burst = (uint64_t)(rate * (double)s->o.max_burst_ms / 1000.0) + 1;
    uint64_t send_fail = 0;
    int rr = 0, gso = s->o.gso;
    uint64_t t0 = now_ns(), next = 0;
    while (s->sent < total && !g_stop) {
        uint64_t now = now_ns() - t0;
        if (now >= dur)
            break;
        uint64_t target = (uint64_t)(rate * (double)now / 1e9) + 1;
        if (target > total)
            target = total;
        uint64_t need = target > s->sent ? target - s->sent : 0;
        if (need > max_burst)
            need = max_burst;
        int stalls = 0;
        while (need > 0 && stalls < nact) {
            uint64_t want = need < (uint64_t)gso ? need : (uint64_t)gso;
            uint64_t got = send_group(s, act[rr], c2p, want);
            rr = (rr + 1) % nact;
            if (got == 0) {
                send_fail++;
                stalls++;
            } else {
                stalls = 0;
            }
            need -= got;
        }
        drain_relay(s, c2p);
        next += tick;
        if (next < now)
            next = now;
        sleep_until_ns(t0 + (next < dur ? next : dur));
    }
    uint64_t send_end = now_ns() - t0;
    double send_s = (double)send_end / 1e9;
    uint64_t drain_end = send_end + (uint64_t)drain_ms * 1000000ull;
    for (uint64_t t = send_end; t < drain_end && !g_stop; t += tick) {
        drain_relay(s, c2p);
        sleep_until_ns(t0 + t + tick);
    }
    drain_relay(s, c2p);
    double wall_s = (double)(now_ns() - t0) / 1e9;
    cpu_seconds(&u1, &s1);
    uint64_t drops = own_drops(s) - drops0;
    qsort(s->lat_us, s->nlat, sizeof(uint32_t), cmp_u32);
    double loss = s->sent ? 100.0 * (double)(s->sent - s->rx.valid) / (double)s->sent : 0.0;
    uint32_t amin = UINT32_MAX, amax = 0;
    int silent = 0;
    for (int k = 0; k < nact; k++) {
        uint32_t v = s->c[act[k]].delivered;
        amin = v < amin ? v : amin;
        amax = v > amax ? v : amax;
        silent += v == 0;
    }
    printf("{\"cmd\":\"relay\",\"direction\":\"%s\",\"offered_pps\":%.0f,\"allocations\":%d,"
           "\"payload\":%d,\"gso\":%d,\"send_elapsed_s\":%.4f,\"wall_s\":%.4f,"
           "\"planned\":%llu,\"sent\":%llu,\"achieved_send_pps\":%.1f,\"send_fail\":%llu,"
           "\"received\":%llu,\"valid\":%llu,\"delivered_pps\":%.1f,\"duplicates\":%llu,"
           "\"misrouted\":%llu,\"bad\":%llu,\"stray\":%llu,\"recv_errors\":%llu,"
           "\"own_rx_drops\":%llu,\"loss_pct\":%.4f,",
           dir, rate, nact, s->o.payload, gso, send_s, wall_s, (unsigned long long)total,
           (unsigned long long)s->sent, send_s > 0 ? (double)s->sent / send_s : 0.0,
           (unsigned long long)send_fail, (unsigned long long)s->rx.received,
           (unsigned long long)s->rx.valid, send_s > 0 ? (double)s->rx.valid / send_s : 0.0,
           (unsigned long long)s->rx.duplicates, (unsigned long long)s->rx.misrouted,
           (unsigned long long)s->rx.bad, (unsigned long long)s->rx.stray,
           (unsigned long long)s->rx.recv_errors, (unsigned long long)drops, loss);
    printf("\"per_allocation\":{\"min\":%u,\"max\":%u,\"silent\":%d},", amin, amax, silent);
    printf("\"latency_us\":{\"samples\":%u,\"p50\":%u,\"p90\":%u,\"p99\":%u,\"max\":%u},",
           s->nlat, pct(s->lat_us, s->nlat, 0.5), pct(s->lat_us, s->nlat, 0.9),
           pct(s->lat_us, s->nlat, 0.99), s->nlat ? s->lat_us[s->nlat - 1] : 0);
    printf("\"cpu\":{\"user_s\":%.3f,\"sys_s\":%.3f,\"pct_of_one_core\":%.1f}}\n", u1 - u0,
           s1 - s0, wall_s > 0 ? 100.0 * ((u1 - u0) + (s1 - s0)) / wall_s : 0.0);
    fflush(stdout);
    free(s->seen);
    free(s->lat_us);
    s->seen = NULL;
    s->lat_us = NULL;
    free(act);
}

static int run_session(const struct opts *o) {
    static struct session s; /* large: keep off the stack */
    s.o = *o;
    s.server = make_addr(o->host, o->port);
    s.client_bind = make_addr(o->host, 0);
    s.peer_bind = make_addr(o->peer_host, 0);
    s.c = calloc(MAX_CLIENTS, sizeof(struct client));
    s.ep = epoll_create1(EPOLL_CLOEXEC);
    if (!s.c || s.ep < 0)
        die("session init");
    if (getrandom(&s.run_nonce, sizeof s.run_nonce, 0) != sizeof s.run_nonce)
        die("getrandom");
    for (int i = 0; i < RX_BATCH; i++) {
        s.rxiov[i].iov_base = s.rxbuf[i];
        s.rxiov[i].iov_len = RX_SLOT;
        s.rxmsg[i].msg_hdr.msg_iov = &s.rxiov[i];
        s.rxmsg[i].msg_hdr.msg_iovlen = 1;
        s.rxmsg[i].msg_hdr.msg_control = s.rxctl[i].buf;
    }
    fprintf(stderr, "READY\n");
    char line[256];
    while (!g_stop && fgets(line, sizeof line, stdin)) {
        char cmd[32] = "", a[32] = "";
        double b = 0, c = 0;
        long d = 0;
        int nf = sscanf(line, "%31s %31s %lf %lf %ld", cmd, a, &b, &c, &d);
        if (nf < 1)
            continue;
        if (strcmp(cmd, "quit") == 0)
            break;
        if (strcmp(cmd, "alloc") == 0 && nf >= 2) {
            char extra[32] = "";
            sscanf(line, "%*s %*s %31s", extra);
            cmd_alloc(&s, atoi(a), strcmp(extra, "bind") == 0);
        } else if (strcmp(cmd, "bind") == 0) {
            cmd_bind(&s, "bind");
        } else if (strcmp(cmd, "release") == 0) {
            cmd_release(&s);
        } else if (strcmp(cmd, "relay") == 0 && nf == 5) {
            cmd_relay(&s, a, b, c, d);
        } else {
            printf("{\"cmd\":\"?\",\"error\":\"unknown command\"}\n");
            fflush(stdout);
        }
    }
    return 0;
}

/* ---- fake: a trivial TURN relay for calibration ---- */

#define FAKE_SLOTS (1 << 16)

struct fsess {
    uint64_t key; /* ip << 16 | port of the client, 0 = empty */
    int relay_fd;
    struct sockaddr_in client, relayed, peer;
    int channel;
};

struct fake {
    struct opts o;
    int fd, ep;
    struct fsess *t;
    uint8_t in[RX_BATCH][RX_SLOT];
    struct sockaddr_in from[RX_BATCH];
    struct mmsghdr rm[RX_BATCH], tm[RX_BATCH];
    struct iovec ri[RX_BATCH], ti[RX_BATCH];
    uint8_t out[RX_BATCH][RX_SLOT];
    uint64_t relayed_c2p, relayed_p2c, allocations;
};

static uint64_t addr_key(const struct sockaddr_in *a) {
    return ((uint64_t)ntohl(a->sin_addr.s_addr) << 16) | ntohs(a->sin_port);
}

static struct fsess *fake_find(struct fake *f, uint64_t key, int create) {
    uint64_t h = (key * 0x9E3779B97F4A7C15ull) >> 48;
    for (int probe = 0; probe < FAKE_SLOTS; probe++) {
        struct fsess *e = &f->t[(h + (uint64_t)probe) & (FAKE_SLOTS - 1)];
        if (e->key == key)
            return e;
        if (e->key == 0) {
            if (!create)
                return NULL;
            memset(e, 0, sizeof *e);
            e->key = key;
            e->relay_fd = -1;
            e->channel = -1;
            return e;
        }
    }
    return NULL;
}

static void fake_reply(struct fake *f, const struct sockaddr_in *to, struct msg *m) {
    if (sendto(f->fd, m->b, m->n, 0, (const struct sockaddr *)to, sizeof *to) < 0 &&
        errno != EAGAIN)
        fprintf(stderr, "turn_loadgen fake: sendto: %s\n", strerror(errno));
}

static void fake_stun(struct fake *f, const uint8_t *p, size_t n, const struct sockaddr_in *from) {
    struct parsed q;
    if (parse_stun(p, n, &q) < 0 || (q.type & 0x0110) != 0)
        return; /* only requests */
    int method = q.type & 0x3EEF;
    struct msg m;
    if (method == M_BINDING) {
        msg_start(&m, (uint16_t)(M_BINDING | CLS_SUCCESS), q.txid);
        msg_xor_addr(&m, A_XOR_MAPPED_ADDRESS, from);
        fake_reply(f, from, &m);
        return;
    }
    if (!q.has_integrity) {
        msg_start(&m, (uint16_t)(method | CLS_ERROR), q.txid);
        uint8_t v[4] = {0, 0, 4, 1};
        msg_attr(&m, A_ERROR_CODE, v, 4);
        msg_attr(&m, A_REALM, "bench", 5);
        msg_attr(&m, A_NONCE, "fake0123456789ab", 16);
        fake_reply(f, from, &m);
        return;
    }
    struct fsess *e = fake_find(f, addr_key(from), method == M_ALLOCATE);
    if (!e) {
        msg_start(&m, (uint16_t)(method | CLS_ERROR), q.txid);
        uint8_t v[4] = {0, 0, method == M_ALLOCATE ? 5 : 4, method == M_ALLOCATE ? 8 : 37};
        msg_attr(&m, A_ERROR_CODE, v, 4);
        fake_reply(f, from, &m);
        return;
    }
    msg_start(&m, (uint16_t)(method | CLS_SUCCESS), q.txid);
    if (method == M_ALLOCATE) {
        if (e->relay_fd < 0) {
            struct sockaddr_in ra = make_addr(f->o.relay_ip, 0);
            e->relay_fd = udp_socket(&ra, 0);
            local_addr(e->relay_fd, &e->relayed);
            e->client = *from;
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = e};
            if (epoll_ctl(f->ep, EPOLL_CTL_ADD, e->relay_fd, &ev) < 0)
                die("epoll_ctl");
            f->allocations++;
        }
        msg_xor_addr(&m, A_XOR_RELAYED_ADDRESS, &e->relayed);
        msg_u32(&m, A_LIFETIME, 600);
        msg_xor_addr(&m, A_XOR_MAPPED_ADDRESS, from);
    } else if (method == M_CHANNEL_BIND && q.has_peer && q.channel >= 0) {
        e->channel = q.channel;
        e->peer = q.peer;
    } else if (method == M_REFRESH && q.lifetime == 0) {
        if (e->relay_fd >= 0)
            close(e->relay_fd);
        e->relay_fd = -1;
        e->channel = -1;
        msg_u32(&m, A_LIFETIME, 0);
    }
    fake_reply(f, from, &m);
}

static void fake_listener(struct fake *f) {
    for (int rounds = 0; rounds < 8; rounds++) {
        for (int i = 0; i < RX_BATCH; i++)
            f->rm[i].msg_hdr.msg_namelen = sizeof f->from[i];
        int rc = recvmmsg(f->fd, f->rm, RX_BATCH, MSG_DONTWAIT, NULL);
        if (rc <= 0)
            return;
        for (int k = 0; k < rc; k++) {
            const uint8_t *p = f->in[k];
            size_t n = f->rm[k].msg_len;
            if (n >= 4 && p[0] >= 0x40 && p[0] < 0x80) {
                struct fsess *e = fake_find(f, addr_key(&f->from[k]), 0);
                size_t len = get16(p + 2);
                if (e && e->relay_fd >= 0 && e->channel == get16(p) && len + 4 <= n) {
                    if (sendto(e->relay_fd, p + 4, len, 0, (struct sockaddr *)&e->peer,
                               sizeof e->peer) >= 0)
                        f->relayed_c2p++;
                }
            } else {
                fake_stun(f, p, n, &f->from[k]);
            }
        }
        if (rc < RX_BATCH)
            return;
    }
}

static void fake_relay(struct fake *f, struct fsess *e) {
    for (int rounds = 0; rounds < 8 && e->relay_fd >= 0; rounds++) {
        for (int i = 0; i < RX_BATCH; i++) {
            f->rm[i].msg_hdr.msg_namelen = sizeof f->from[i];
            f->ri[i].iov_base = f->in[i] + 4; /* leave room for the ChannelData header */
            f->ri[i].iov_len = RX_SLOT - 4;
        }
        int rc = recvmmsg(e->relay_fd, f->rm, RX_BATCH, MSG_DONTWAIT, NULL);
        int m = 0;
        for (int k = 0; k < rc; k++) {
            if (e->channel < 0 || addr_key(&f->from[k]) != addr_key(&e->peer))
                continue;
            put16(f->in[k], (uint16_t)e->channel);
            put16(f->in[k] + 2, (uint16_t)f->rm[k].msg_len);
            f->ti[m].iov_base = f->in[k];
            f->ti[m].iov_len = f->rm[k].msg_len + 4;
            f->tm[m].msg_hdr.msg_name = &e->client;
            f->tm[m].msg_hdr.msg_namelen = sizeof e->client;
            m++;
        }
        if (m > 0) {
            int sent = sendmmsg(f->fd, f->tm, (unsigned)m, 0);
            if (sent > 0)
                f->relayed_p2c += (uint64_t)sent;
        }
        for (int i = 0; i < RX_BATCH; i++) {
            f->ri[i].iov_base = f->in[i];
            f->ri[i].iov_len = RX_SLOT;
        }
        if (rc < RX_BATCH)
            return;
    }
}

static int run_fake(const struct opts *o) {
    static struct fake f;
    f.o = *o;
    f.t = calloc(FAKE_SLOTS, sizeof(struct fsess));
    if (!f.t)
        fail("out of memory");
    struct sockaddr_in a = make_addr(o->host, o->port);
    f.fd = udp_socket(&a, 8 << 20);
    struct sockaddr_in me;
    local_addr(f.fd, &me);
    f.ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (f.ep < 0 || epoll_ctl(f.ep, EPOLL_CTL_ADD, f.fd, &ev) < 0)
        die("epoll");
    for (int i = 0; i < RX_BATCH; i++) {
        f.ri[i].iov_base = f.in[i];
        f.ri[i].iov_len = RX_SLOT;
        f.rm[i].msg_hdr.msg_iov = &f.ri[i];
        f.rm[i].msg_hdr.msg_iovlen = 1;
        f.rm[i].msg_hdr.msg_name = &f.from[i];
        f.tm[i].msg_hdr.msg_iov = &f.ti[i];
        f.tm[i].msg_hdr.msg_iovlen = 1;
    }
    fprintf(stderr, "READY %s %d\n", o->host, ntohs(me.sin_port));
    uint64_t end = now_ns() + (uint64_t)(o->duration * 1e9);
    struct epoll_event evs[MAX_EVENTS];
    while (!g_stop && now_ns() < end) {
        int ne = epoll_wait(f.ep, evs, MAX_EVENTS, 100);
        for (int e = 0; e < ne; e++) {
            if (evs[e].data.ptr == NULL)
                fake_listener(&f);
            else
                fake_relay(&f, (struct fsess *)evs[e].data.ptr);
        }
    }
    printf("{\"mode\":\"fake\",\"allocations\":%llu,\"relayed_c2p\":%llu,\"relayed_p2c\":%llu}\n",
           (unsigned long long)f.allocations, (unsigned long long)f.relayed_c2p,
           (unsigned long long)f.relayed_p2c);
    fflush(stdout);
    return 0;
}

/* ---- CLI ---- */

static void usage(void) {
    fprintf(stderr,
            "usage: turn_loadgen session --host H --port P [--peer-host IP] [--user U]\n"
            "         [--password PW] [--payload B] [--gso N] [--tick-us US] [--window N]\n"
            "         [--rto-ms MS] [--max-tries N] [--op-timeout S] [--fingerprint]\n"
            "         [--direct] [--rcvbuf B] [--samples-per-sec N] [--max-burst-ms MS]\n"
            "         (then commands on stdin: alloc N [bind] | bind | relay c2p|p2c PPS SECS\n"
            "          DRAIN_MS | release | quit)\n"
            "       turn_loadgen fake --host H --port P [--relay-ip IP] --duration S\n");
    exit(2);
}

static void parse(int argc, char **argv, struct opts *o) {
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},       {"port", required_argument, 0, 'p'},
        {"peer-host", required_argument, 0, 'e'},  {"relay-ip", required_argument, 0, 'R'},
        {"user", required_argument, 0, 'u'},       {"password", required_argument, 0, 'w'},
        {"payload", required_argument, 0, 'l'},    {"gso", required_argument, 0, 'g'},
        {"tick-us", required_argument, 0, 't'},    {"window", required_argument, 0, 'W'},
        {"rto-ms", required_argument, 0, 'r'},     {"max-tries", required_argument, 0, 'm'},
        {"op-timeout", required_argument, 0, 'T'}, {"duration", required_argument, 0, 'd'},
        {"fingerprint", no_argument, 0, 'f'},      {"direct", no_argument, 0, 'D'},
        {"rcvbuf", required_argument, 0, 'b'},     {"samples-per-sec", required_argument, 0, 'S'},
        {"max-burst-ms", required_argument, 0, 'B'}, {0, 0, 0, 0}};
    if (argc < 2)
        usage();
    o->mode = argv[1];
    optind = 2;
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'h': o->host = optarg; break;
        case 'p': o->port = atoi(optarg); break;
        case 'e': o->peer_host = optarg; break;
        case 'R': o->relay_ip = optarg; break;
        case 'u': o->user = optarg; break;
        case 'w': o->password = optarg; break;
        case 'l': o->payload = atoi(optarg); break;
        case 'g': o->gso = atoi(optarg); break;
        case 't': o->tick_us = atol(optarg); break;
        case 'W': o->window = atoi(optarg); break;
        case 'r': o->rto_ms = atol(optarg); break;
        case 'm': o->max_tries = atoi(optarg); break;
        case 'T': o->op_timeout = atof(optarg); break;
        case 'd': o->duration = atof(optarg); break;
        case 'f': o->fingerprint = 1; break;
        case 'D': o->direct = 1; break;
        case 'b': o->rcvbuf = atoi(optarg); break;
        case 'S': o->samples_per_sec = atof(optarg); break;
        case 'B': o->max_burst_ms = atol(optarg); break;
        default: usage();
        }
    }
}

static void validate(const struct opts *o) {
    if (o->port < 0 || o->port > 65535)
        fail("--port must be in [0, 65535]");
    if (strcmp(o->mode, "fake") == 0) {
        if (o->duration <= 0 || o->duration > 7200)
            fail("--duration must be in (0, 7200]");
        return;
    }
    if (o->port == 0 && !o->direct)
        fail("--port is required");
    if (o->payload < PAYLOAD_MIN || o->payload > PAYLOAD_MAX)
        fail("--payload must be in [24, 1200]");
    if (o->gso < 1 || o->gso > MAX_GSO)
        fail("--gso must be in [1, 64]");
    if (o->tick_us < 50 || o->tick_us > 100000)
        fail("--tick-us must be in [50, 100000]");
    if (o->window < 1 || o->window > 10000)
        fail("--window must be in [1, 10000]");
    if (o->rto_ms < 10 || o->rto_ms > 10000 || o->max_tries < 1 || o->max_tries > 20)
        fail("--rto-ms must be in [10, 10000], --max-tries in [1, 20]");
    if (o->op_timeout <= 0 || o->op_timeout > 3600)
        fail("--op-timeout must be in (0, 3600]");
    if (o->max_burst_ms < 1)
        fail("--max-burst-ms must be >= 1");
}

int main(int argc, char **argv) {
    struct opts o = {.host = "127.0.0.1", .port = 0, .peer_host = "127.0.0.2",
                     .relay_ip = "127.0.0.1", .user = "alice", .password = "secret",
                     .payload = 100, .gso = 16, .tick_us = 1000, .window = 128, .rto_ms = 500,
                     .max_tries = 7, .op_timeout = 120, .duration = 60, .rcvbuf = 1 << 20,
                     .samples_per_sec = 5000, .max_burst_ms = 10};
    parse(argc, argv, &o);
    validate(&o);
    crc_init();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (strcmp(o.mode, "session") == 0)
        return run_session(&o);
    if (strcmp(o.mode, "fake") == 0)
        return run_fake(&o);
    usage();
    return 2;
}

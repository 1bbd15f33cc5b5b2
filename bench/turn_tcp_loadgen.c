/*
 * turn_tcp_loadgen: TURN-over-TCP relay load generator (and a trivial C TURN-over-TCP relay).
 *
 * Modes:
 *   session  Command-driven TURN client over TCP (IPv4), UDP relays. Reads one command per
 *            line on stdin and answers each with one JSON line on stdout:
 *              alloc N        open N TCP connections (source addresses taken round-robin
 *                             from --client-hosts) and allocate on each (Allocate, 401,
 *                             authenticated Allocate; REQUESTED-TRANSPORT UDP)
 *              bind           ChannelBind every allocation without a channel to its own UDP
 *                             peer socket on --peer-host (the peer socket is then connected
 *                             to the relayed address)
 *              relay DIR PPS SECS DRAIN_MS
 *                             ChannelData load; DIR c2p = client -(TCP)-> server -(UDP)->
 *                             peer, p2c = peer -(UDP)-> server -(TCP, ChannelData)-> client.
 *                             PPS 0 = as fast as the in-flight window allows (saturation)
 *              release        close every connection (over TCP that ends the allocation)
 *              quit
 *            Long-term credentials: key = MD5(user:realm:password), MESSAGE-INTEGRITY =
 *            HMAC-SHA1 (OpenSSL libcrypto), optional FINGERPRINT. Responses are matched by
 *            transaction ID; their integrity is not checked (loopback only). No
 *            retransmissions (RFC 8489 section 6.2.2: reliable transport).
 *   fake     A trivial TURN relay over TCP (no authentication: any request with
 *            MESSAGE-INTEGRITY succeeds), to calibrate the generator: --threads threads, each
 *            with its own SO_REUSEPORT listener and epoll; ChannelData from a connection goes
 *            out with one sendmmsg per read, peer datagrams with one write per recvmmsg.
 *
 * Relay load: the sender keeps at most --inflight messages sent but neither delivered nor
 * given up on (p2c only: older than --loss-timeout-ms, as UDP into the relay may drop them),
 * and at most PPS * elapsed in total (open loop when the window is not the limit). c2p: each visit to a connection writes one burst of
 * --burst ChannelData frames (each padded to a multiple of 4 bytes, RFC 8656 section 12.5)
 * with one write(); a short write keeps the rest for later and the connection is skipped
 * until it is flushed, so TCP back-pressure slows the sender instead of queueing without
 * bound. p2c: each visit sends one UDP GSO group of --burst datagrams from the peer socket.
 * Receivers (UDP peer sockets with recvmmsg, TCP connections with read() and a stream
 * parser) are read whenever epoll reports them readable. Each payload carries a run nonce,
 * the allocation index, a global sequence number and the send time; a message counts as
 * delivered once, at the right socket, with the right channel.
 *
 * Build: gcc -O2 -Wall -Wextra -o turn_tcp_loadgen turn_tcp_loadgen.c -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <pthread.h>
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
#define MAX_CONNS 10000
#define MAX_HOSTS 64
#define MAX_NONCE 256
#define MAX_REALM 128
#define REQ_MAX 640
#define RX_CAP 16384 /* per TCP connection: more than one maximal frame */
#define RX_BATCH 64
#define RX_SLOT 2048
#define MAX_BURST 64
#define MAX_EVENTS 1024
#define MAX_PACKETS 100000000ull
#define SATURATION_CAP_PPS 2000000.0 /* message budget of a PPS 0 step */
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

#define M_BINDING 0x001
#define M_ALLOCATE 0x003
#define M_REFRESH 0x004
#define M_CHANNEL_BIND 0x009
#define CLS_SUCCESS 0x0100
#define CLS_ERROR 0x0110
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

static double cpu_seconds(double *user, double *sys) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
    *sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    return *user + *sys;
}

static void die(const char *what) {
    fprintf(stderr, "turn_tcp_loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void fail(const char *what) {
    fprintf(stderr, "turn_tcp_loadgen: %s\n", what);
    exit(2);
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

static size_t pad4(size_t n) { return (n + 3) & ~(size_t)3; }

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
    size_t padded = pad4(len);
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
    msg_u32(m, A_FINGERPRINT, crc32(m->b, m->n) ^ FP_XOR);
}

/* ---- STUN decoding (what a TURN client and the fake server need) ---- */

struct parsed {
    uint16_t type;
    const uint8_t *txid;
    int error; /* ERROR-CODE as class*100+number, 0 if absent */
    const uint8_t *realm;
    size_t realm_len;
    const uint8_t *nonce;
    size_t nonce_len;
    int has_relayed;
    struct sockaddr_in relayed;
    int has_peer;
    struct sockaddr_in peer;
    int has_integrity;
    int channel; /* CHANNEL-NUMBER or -1 */
    long lifetime;
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
        off += 4 + pad4(len);
    }
    return 0;
}

/* Length of the first complete frame in a TCP byte stream: 0 = incomplete, -1 = garbage.
 * STUN: 20 + length; ChannelData: 4 + length padded to 4 (RFC 8656 section 12.5). */
static long frame_len(const uint8_t *p, size_t n) {
    if (n < 4)
        return 0;
    size_t need;
    if (p[0] >= 0x40 && p[0] < 0x80)
        need = 4 + pad4(get16(p + 2));
    else if ((p[0] & 0xC0) == 0) {
        if (n < 20)
            return 0;
        if (get32(p + 4) != MAGIC_COOKIE || (get16(p + 2) & 3))
            return -1;
        need = 20 + (size_t)get16(p + 2);
    } else
        return -1;
    if (need > RX_CAP)
        return -1;
    return n >= need ? (long)need : 0;
}

/* ---- options ---- */

struct opts {
    const char *mode;
    const char *host;
    int port;
    const char *client_hosts;
    const char *peer_host;
    const char *relay_ip;
    const char *user;
    const char *password;
    int payload;
    int burst;
    long tick_us;
    int window;
    int inflight;
    long loss_timeout_ms;
    double op_timeout;
    double duration;
    int fingerprint;
    int rcvbuf;
    double samples_per_sec;
    int threads;
};

static struct sockaddr_in make_addr(const char *host, int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "turn_tcp_loadgen: not an IPv4 address: %s\n", host);
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
    if (bind_to && bind(fd, (const struct sockaddr *)bind_to, sizeof *bind_to) < 0)
        die("bind");
    return fd;
}

static void local_addr(int fd, struct sockaddr_in *out) {
    socklen_t sl = sizeof *out;
    if (getsockname(fd, (struct sockaddr *)out, &sl) < 0)
        die("getsockname");
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        die("fcntl O_NONBLOCK");
}

/* Write all of buf to a non-blocking socket, waiting (poll) at most timeout_ms in total. */
static int write_all(int fd, const uint8_t *buf, size_t n, int timeout_ms) {
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
    while (n > 0) {
        ssize_t w = send(fd, buf, n, MSG_NOSIGNAL);
        if (w > 0) {
            buf += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
        uint64_t now = now_ns();
        if (now >= deadline)
            return -1;
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        poll(&pfd, 1, (int)((deadline - now) / 1000000ull) + 1);
    }
    return 0;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static uint32_t pct(const uint32_t *v, uint32_t n, double q) {
    if (n == 0)
        return 0;
    return v[(uint64_t)(q * (double)(n - 1) + 0.5)];
}

/* ---- session state ---- */

enum op { OP_NONE, OP_ALLOC, OP_BIND };

struct conn {
    int fd, peer_fd;
    struct sockaddr_in local, relayed, peer;
    uint16_t channel;
    uint8_t allocated, bound, dead, op, auth_rounds, stale, pending_listed;
    uint8_t txid[12];
    uint64_t op_start;
    uint16_t nonce_len;
    char nonce[MAX_NONCE];
    uint32_t delivered; /* valid messages for this allocation in a relay step */
    uint32_t rxlen;
    uint8_t *rx;
    uint8_t *tx; /* unsent tail of the last burst (c2p) */
    uint32_t txoff, txlen;
};

struct opresult {
    int requested, ok, failed, timeouts;
    uint64_t requests, stale_nonces;
    int codes[8], code_counts[8], ncodes;
    uint32_t *lat_us;
    int nlat;
};

struct rxstats {
    uint64_t received, valid, late, duplicates, misrouted, bad, stale, stray, recv_errors;
};

struct session {
    struct opts o;
    struct sockaddr_in server, peer_bind;
    struct sockaddr_in hosts[MAX_HOSTS];
    int nhosts;
    int ep;
    struct conn *c;
    int n;
    uint32_t run_nonce;
    uint32_t txseq;
    char realm[MAX_REALM];
    size_t realm_len;
    uint8_t key[16];
    int have_key;
    /* relay step */
    int expect_peer; /* 1: c2p (deliveries at peer sockets), 0: p2c */
    uint8_t *seen;
    uint64_t cap;  /* messages this step may send */
    uint64_t sent; /* messages built (c2p) or handed to the kernel (p2c) */
    uint64_t low;  /* every seq below is delivered or given up on */
    uint64_t expired;
    uint64_t *tick_first; /* first seq of each millisecond of the step */
    uint64_t nticks, cur_tick, low_tick;
    uint64_t sample_every;
    uint32_t *lat_us;
    uint32_t nlat;
    uint64_t t0_real;
    struct rxstats rx;
    int *pending; /* connections with unsent bytes */
    int npending;
    uint8_t rxbuf[RX_BATCH][RX_SLOT];
    struct mmsghdr rxmsg[RX_BATCH];
    struct iovec rxiov[RX_BATCH];
    uint8_t txbuf[MAX_BURST * (PAYLOAD_MAX + 8)];
};

static uint64_t realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

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
    if (n < 0 || (size_t)n >= sizeof buf ||
        !EVP_Digest(buf, (size_t)n, s->key, &len, EVP_md5(), NULL) || len != 16)
        fail("MD5 key derivation failed");
    s->have_key = 1;
}

static void parse_hosts(struct session *s, const char *list) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", list);
    for (char *tok = strtok(buf, ","); tok && s->nhosts < MAX_HOSTS; tok = strtok(NULL, ","))
        s->hosts[s->nhosts++] = make_addr(tok, 0);
    if (s->nhosts == 0)
        fail("--client-hosts is empty");
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

static void finish(struct session *s, int idx, struct opresult *r, int ok, int code) {
    struct conn *c = &s->c[idx];
    if (ok) {
        r->ok++;
        uint64_t us = (now_ns() - c->op_start) / 1000;
        r->lat_us[r->nlat++] = (uint32_t)(us > UINT32_MAX ? UINT32_MAX : us);
        if (c->op == OP_ALLOC)
            c->allocated = 1;
        else
            c->bound = 1;
    } else {
        r->failed++;
        note_code(r, code);
    }
    c->op = OP_NONE;
}

/* Build and write the current request of connection idx. */
static void send_request(struct session *s, int idx, int authed, struct opresult *r) {
    struct conn *c = &s->c[idx];
    struct msg m;
    new_txid(s, idx, c->txid);
    if (c->op == OP_ALLOC) {
        msg_start(&m, M_ALLOCATE, c->txid);
        msg_u32(&m, A_REQUESTED_TRANSPORT, 17u << 24);
    } else {
        msg_start(&m, M_CHANNEL_BIND, c->txid);
        uint8_t v[4];
        put16(v, c->channel);
        put16(v + 2, 0);
        msg_attr(&m, A_CHANNEL_NUMBER, v, 4);
        msg_xor_addr(&m, A_XOR_PEER_ADDRESS, &c->peer);
    }
    if (authed) {
        msg_attr(&m, A_USERNAME, s->o.user, strlen(s->o.user));
        msg_attr(&m, A_REALM, s->realm, s->realm_len);
        msg_attr(&m, A_NONCE, c->nonce, c->nonce_len);
        msg_integrity(&m, s->key);
    }
    if (s->o.fingerprint)
        msg_fingerprint(&m);
    r->requests++;
    if (write_all(c->fd, m.b, m.n, 1000) < 0)
        finish(s, idx, r, 0, 3);
}

static void take_nonce(struct session *s, struct conn *c, const struct parsed *p) {
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

/* A STUN frame arrived on connection idx while an operation may be running. */
static void on_stun(struct session *s, int idx, const uint8_t *p, size_t n, struct opresult *r) {
    struct conn *c = &s->c[idx];
    struct parsed m;
    if (r == NULL || c->op == OP_NONE || parse_stun(p, n, &m) < 0 ||
        memcmp(m.txid, c->txid, 12) != 0)
        return;
    int cls = m.type & 0x0110;
    if (cls == CLS_SUCCESS) {
        if (c->op == OP_ALLOC) {
            if (!m.has_relayed) {
                finish(s, idx, r, 0, 1);
                return;
            }
            c->relayed = m.relayed;
        }
        finish(s, idx, r, 1, 0);
        return;
    }
    if (cls != CLS_ERROR)
        return;
    if ((m.error == 401 || m.error == 438) && m.nonce && m.realm) {
        uint8_t *rounds = m.error == 401 ? &c->auth_rounds : &c->stale;
        if (*rounds < (m.error == 401 ? 2 : 5)) {
            (*rounds)++;
            if (m.error == 438)
                r->stale_nonces++;
            take_nonce(s, c, &m);
            send_request(s, idx, 1, r);
            return;
        }
    }
    finish(s, idx, r, 0, m.error ? m.error : 2);
}

static void on_channel_data(struct session *s, int idx, const uint8_t *p, size_t n);

/* Read what connection idx has; hand complete frames on. Returns -1 if it closed. */
static int conn_read(struct session *s, int idx, struct opresult *r) {
    struct conn *c = &s->c[idx];
    for (int rounds = 0; rounds < 16 && !c->dead; rounds++) {
        ssize_t got = recv(c->fd, c->rx + c->rxlen, RX_CAP - c->rxlen, MSG_DONTWAIT);
        if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
            c->dead = 1;
            epoll_ctl(s->ep, EPOLL_CTL_DEL, c->fd, NULL);
            return -1;
        }
        if (got < 0)
            return 0;
        c->rxlen += (uint32_t)got;
        size_t off = 0;
        for (;;) {
            long fl = frame_len(c->rx + off, c->rxlen - off);
            if (fl < 0) {
                s->rx.bad++; /* lost framing: nothing more on this connection is readable */
                c->dead = 1;
                epoll_ctl(s->ep, EPOLL_CTL_DEL, c->fd, NULL);
                return -1;
            }
            if (fl == 0)
                break;
            const uint8_t *f = c->rx + off;
            if (f[0] >= 0x40 && f[0] < 0x80)
                on_channel_data(s, idx, f, (size_t)fl);
            else
                on_stun(s, idx, f, (size_t)fl, r);
            off += (size_t)fl;
        }
        if (off > 0) {
            memmove(c->rx, c->rx + off, c->rxlen - off);
            c->rxlen -= (uint32_t)off;
        }
        if ((size_t)got < RX_CAP / 2)
            return 0;
    }
    return 0;
}

static int recv_batch(struct session *s, int fd) {
    for (int k = 0; k < RX_BATCH; k++)
        s->rxmsg[k].msg_hdr.msg_namelen = 0;
    int rc = recvmmsg(fd, s->rxmsg, RX_BATCH, MSG_DONTWAIT, NULL);
    if (rc < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            s->rx.recv_errors++;
        return 0;
    }
    return rc;
}

static void on_payload(struct session *s, int idx, int at_peer, const uint8_t *p);

/* Read every readable socket epoll reports within timeout_ms. */
static int poll_once(struct session *s, int timeout_ms, struct opresult *r) {
    struct epoll_event evs[MAX_EVENTS];
    int ne = epoll_wait(s->ep, evs, MAX_EVENTS, timeout_ms);
    for (int e = 0; e < ne; e++) {
        int idx = (int)(evs[e].data.u64 >> 1);
        if (evs[e].data.u64 & 1) { /* a UDP peer socket */
            for (int k = 0; k < 16; k++) {
                int got = recv_batch(s, s->c[idx].peer_fd);
                for (int j = 0; j < got; j++) {
                    s->rx.received++;
                    if (s->rxmsg[j].msg_len != (unsigned)s->o.payload)
                        s->rx.bad++;
                    else
                        on_payload(s, idx, 1, s->rxbuf[j]);
                }
                if (got < RX_BATCH)
                    break;
            }
        } else {
            conn_read(s, idx, r);
        }
    }
    return ne;
}

/* Run operation op on the connections in list[0..count) with at most --window in flight. */
static void run_ops(struct session *s, int op, const int *list, int count, struct opresult *r) {
    memset(r, 0, sizeof *r);
    r->requested = count;
    r->lat_us = calloc((size_t)count + 1, sizeof(uint32_t));
    int *inflight = calloc((size_t)s->o.window + 1, sizeof(int));
    if (!r->lat_us || !inflight)
        fail("out of memory");
    int next = 0, nin = 0;
    uint64_t deadline = now_ns() + (uint64_t)(s->o.op_timeout * 1e9);
    while ((next < count || nin > 0) && !g_stop) {
        while (next < count && nin < s->o.window) {
            int idx = list[next++];
            struct conn *c = &s->c[idx];
            c->op = (uint8_t)op;
            c->auth_rounds = c->stale = 0;
            c->op_start = now_ns();
            /* Allocate starts unauthenticated (the 401 round trip is part of it). */
            send_request(s, idx, op != OP_ALLOC && c->nonce_len > 0 && s->have_key, r);
            if (c->op != OP_NONE)
                inflight[nin++] = idx;
        }
        poll_once(s, 2, r);
        int expired = now_ns() > deadline;
        for (int i = 0; i < nin;) {
            struct conn *c = &s->c[inflight[i]];
            if (c->op != OP_NONE && (expired || c->dead)) {
                if (c->dead)
                    finish(s, inflight[i], r, 0, 4);
                else {
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
                r->failed++;
            }
    }
    free(inflight);
}

static void print_opresult(const char *cmd, const struct opresult *r, double secs) {
    qsort(r->lat_us, (size_t)r->nlat, sizeof(uint32_t), cmp_u32);
    printf("{\"cmd\":\"%s\",\"requested\":%d,\"ok\":%d,\"failed\":%d,\"timeouts\":%d,"
           "\"requests\":%llu,\"stale_nonces\":%llu,\"seconds\":%.4f,\"per_s\":%.1f,"
           "\"lat_us\":{\"p50\":%u,\"p90\":%u,\"p99\":%u,\"max\":%u},\"error_codes\":{",
           cmd, r->requested, r->ok, r->failed, r->timeouts, (unsigned long long)r->requests,
           (unsigned long long)r->stale_nonces, secs, secs > 0 ? r->ok / secs : 0.0,
           pct(r->lat_us, (uint32_t)r->nlat, 0.5), pct(r->lat_us, (uint32_t)r->nlat, 0.9),
           pct(r->lat_us, (uint32_t)r->nlat, 0.99), r->nlat ? r->lat_us[r->nlat - 1] : 0);
    for (int i = 0; i < r->ncodes; i++)
        printf("%s\"%d\":%d", i ? "," : "", r->codes[i], r->code_counts[i]);
    printf("}}\n");
    fflush(stdout);
}

static int open_conn(struct session *s, int idx) {
    struct conn *c = &s->c[idx];
    memset(c, 0, sizeof *c);
    c->peer_fd = -1;
    c->channel = (uint16_t)(CHANNEL_BASE + (idx & 0xFFF));
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        die("socket");
    int on = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    struct timeval tv = {5, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (bind(c->fd, (struct sockaddr *)&s->hosts[idx % s->nhosts], sizeof s->hosts[0]) < 0)
        die("bind client");
    if (connect(c->fd, (struct sockaddr *)&s->server, sizeof s->server) < 0) {
        close(c->fd);
        c->fd = -1;
        c->dead = 1;
        return -1;
    }
    set_nonblock(c->fd);
    local_addr(c->fd, &c->local);
    c->rx = malloc(RX_CAP);
    if (!c->rx)
        fail("out of memory");
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)idx << 1};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl");
    return 0;
}

static void open_peer(struct session *s, int idx) {
    struct conn *c = &s->c[idx];
    c->peer_fd = udp_socket(&s->peer_bind, s->o.rcvbuf);
    local_addr(c->peer_fd, &c->peer);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)idx << 1) | 1};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, c->peer_fd, &ev) < 0)
        die("epoll_ctl");
}

static void cmd_alloc(struct session *s, int count) {
    if (count < 1 || s->n + count > MAX_CONNS) {
        printf("{\"cmd\":\"alloc\",\"error\":\"count out of range\"}\n");
        fflush(stdout);
        return;
    }
    int *list = calloc((size_t)count, sizeof(int));
    if (!list)
        fail("out of memory");
    int nlist = 0, refused = 0;
    uint64_t t0 = now_ns();
    for (int k = 0; k < count; k++) {
        if (open_conn(s, s->n) == 0)
            list[nlist++] = s->n;
        else
            refused++;
        s->n++;
    }
    struct opresult r;
    run_ops(s, OP_ALLOC, list, nlist, &r);
    r.requested += refused;
    r.failed += refused;
    if (refused)
        note_code(&r, 5);
    print_opresult("alloc", &r, (double)(now_ns() - t0) / 1e9);
    free(r.lat_us);
    free(list);
}

static void cmd_bind(struct session *s) {
    int *list = calloc((size_t)s->n + 1, sizeof(int));
    if (!list)
        fail("out of memory");
    int count = 0;
    for (int i = 0; i < s->n; i++)
        if (s->c[i].allocated && !s->c[i].bound && !s->c[i].dead) {
            if (s->c[i].peer_fd < 0)
                open_peer(s, i);
            list[count++] = i;
        }
    struct opresult r;
    uint64_t t0 = now_ns();
    run_ops(s, OP_BIND, list, count, &r);
    double secs = (double)(now_ns() - t0) / 1e9;
    for (int k = 0; k < count; k++) {
        struct conn *c = &s->c[list[k]];
        if (c->bound && connect(c->peer_fd, (struct sockaddr *)&c->relayed, sizeof c->relayed) < 0)
            die("connect peer");
    }
    print_opresult("bind", &r, secs);
    free(r.lat_us);
    free(list);
}

static void cmd_release(struct session *s) {
    int closed = 0;
    for (int i = 0; i < s->n; i++) {
        struct conn *c = &s->c[i];
        if (c->fd >= 0) {
            close(c->fd);
            closed += c->allocated && !c->dead;
        }
        if (c->peer_fd >= 0)
            close(c->peer_fd);
        free(c->rx);
        free(c->tx);
        memset(c, 0, sizeof *c);
    }
    s->n = 0;
    printf("{\"cmd\":\"release\",\"closed\":%d}\n", closed);
    fflush(stdout);
}

/* ---- relay steps ---- */

static void on_payload(struct session *s, int idx, int at_peer, const uint8_t *p) {
    if (at_peer != s->expect_peer || s->seen == NULL) {
        s->rx.stray++;
        return;
    }
    uint32_t nonce, aidx;
    uint64_t seq, tx;
    memcpy(&nonce, p, 4);
    memcpy(&aidx, p + 4, 4);
    memcpy(&seq, p + 8, 8);
    memcpy(&tx, p + 16, 8);
    if (nonce != s->run_nonce) {
        s->rx.stale++; /* from an earlier step */
        return;
    }
    if (seq >= s->sent) {
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
    if (seq < s->low) { /* given up on already: it arrived after --loss-timeout-ms */
        s->rx.late++;
        s->expired--;
    }
    s->c[idx].delivered++;
    if (seq % s->sample_every == 0 && s->nlat < MAX_LAT_SAMPLES) {
        uint64_t rx = realtime_ns();
        uint64_t us = rx > tx ? (rx - tx) / 1000 : 0;
        s->lat_us[s->nlat++] = (uint32_t)(us > UINT32_MAX ? UINT32_MAX : us);
    }
}

static void on_channel_data(struct session *s, int idx, const uint8_t *p, size_t n) {
    s->rx.received++;
    if (s->seen == NULL) {
        s->rx.stray++;
        return;
    }
    size_t len = get16(p + 2);
    if (get16(p) != s->c[idx].channel || len != (size_t)s->o.payload || n != 4 + pad4(len)) {
        s->rx.bad++;
        return;
    }
    on_payload(s, idx, 0, p + 4);
}

/* Fill one payload: run nonce, allocation index, sequence, send time (wall clock). */
static void fill_payload(uint8_t *p, uint32_t nonce, uint32_t idx, uint64_t seq, uint64_t t) {
    memcpy(p, &nonce, 4);
    memcpy(p + 4, &idx, 4);
    memcpy(p + 8, &seq, 8);
    memcpy(p + 16, &t, 8);
}

static void list_pending(struct session *s, int idx) {
    if (!s->c[idx].pending_listed) {
        s->c[idx].pending_listed = 1;
        s->pending[s->npending++] = idx;
    }
}

/* Write what is left of connection idx's burst; returns 1 if it is all out. */
static int flush_conn(struct session *s, int idx, uint64_t *blocked) {
    struct conn *c = &s->c[idx];
    while (c->txoff < c->txlen) {
        ssize_t w = send(c->fd, c->tx + c->txoff, c->txlen - c->txoff, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w <= 0) {
            if (w < 0 && errno != EAGAIN && errno != EINTR) {
                c->dead = 1;
                c->txoff = c->txlen = 0;
                return 1;
            }
            (*blocked)++;
            return 0;
        }
        c->txoff += (uint32_t)w;
    }
    c->txoff = c->txlen = 0;
    return 1;
}

static void flush_pending(struct session *s, uint64_t *blocked) {
    for (int i = 0; i < s->npending;) {
        int idx = s->pending[i];
        if (flush_conn(s, idx, blocked)) {
            s->c[idx].pending_listed = 0;
            s->pending[i] = s->pending[--s->npending];
        } else {
            i++;
        }
    }
}

/* c2p: one burst of k ChannelData frames on connection idx. */
static void send_c2p(struct session *s, int idx, uint64_t k, uint64_t *blocked) {
    struct conn *c = &s->c[idx];
    size_t seg = 4 + pad4((size_t)s->o.payload);
    uint64_t t = realtime_ns();
    for (uint64_t j = 0; j < k; j++) {
        uint8_t *p = c->tx + j * seg;
        put16(p, c->channel);
        put16(p + 2, (uint16_t)s->o.payload);
        fill_payload(p + 4, s->run_nonce, (uint32_t)idx, s->sent + j, t);
    }
    c->txoff = 0;
    c->txlen = (uint32_t)(k * seg);
    s->sent += k;
    if (!flush_conn(s, idx, blocked))
        list_pending(s, idx);
}

/* p2c: one UDP GSO group of k datagrams from peer socket idx; returns how many went out. */
static uint64_t send_p2c(struct session *s, int idx, uint64_t k) {
    struct conn *c = &s->c[idx];
    size_t seg = (size_t)s->o.payload;
    uint64_t t = realtime_ns();
    for (uint64_t j = 0; j < k; j++)
        fill_payload(s->txbuf + j * seg, s->run_nonce, (uint32_t)idx, s->sent + j, t);
    struct iovec iov = {s->txbuf, k * seg};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(uint16_t))];
    } ctl;
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (k > 1) {
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
    if (sendmsg(c->peer_fd, &mh, 0) < 0)
        return 0;
    s->sent += k;
    return k;
}

/* Advance the "resolved" pointer: delivered messages, and ones older than the loss timeout. */
static void advance_low(struct session *s) {
    uint64_t timeout_ticks = (uint64_t)s->o.loss_timeout_ms;
    while (s->low < s->sent) {
        while (s->low_tick < s->cur_tick && s->tick_first[s->low_tick + 1] <= s->low)
            s->low_tick++;
        if (s->seen[s->low >> 3] & (1u << (s->low & 7))) {
            s->low++;
            continue;
        }
        /* c2p arrives over TCP: slow, never lost on the way in, so never given up on (a
         * timeout would let the queue in the socket buffers grow past the window). */
        if (s->expect_peer || s->cur_tick - s->low_tick <= timeout_ticks)
            return;
        s->expired++;
        s->low++;
    }
}

/* Note the millisecond tick of the step (for the send time of each sequence number). */
static void set_tick(struct session *s, uint64_t elapsed_ns) {
    uint64_t t = elapsed_ns / 1000000ull;
    if (t >= s->nticks)
        t = s->nticks - 1;
    while (s->cur_tick < t)
        s->tick_first[++s->cur_tick] = s->sent;
}

static void cmd_relay(struct session *s, const char *dir, double rate, double secs,
                      long drain_ms) {
    int c2p = strcmp(dir, "c2p") == 0;
    int *act = calloc((size_t)s->n + 1, sizeof(int));
    s->pending = calloc((size_t)s->n + 1, sizeof(int));
    if (!act || !s->pending)
        fail("out of memory");
    int nact = 0;
    for (int i = 0; i < s->n; i++)
        if (s->c[i].bound && !s->c[i].dead)
            act[nact++] = i;
    double budget_rate = rate > 0 ? rate : SATURATION_CAP_PPS;
    if ((!c2p && strcmp(dir, "p2c") != 0) || rate < 0 || rate > 20e6 || secs <= 0 ||
        secs > 120 || drain_ms < 0 || drain_ms > 60000 || nact == 0 ||
        budget_rate * secs >= (double)MAX_PACKETS) {
        printf("{\"cmd\":\"relay\",\"error\":\"bad arguments or no channels\"}\n");
        fflush(stdout);
        free(act);
        free(s->pending);
        s->pending = NULL;
        return;
    }
    size_t seg = 4 + pad4((size_t)s->o.payload);
    for (int k = 0; k < nact; k++) {
        struct conn *c = &s->c[act[k]];
        if (!c->tx && !(c->tx = malloc((size_t)s->o.burst * seg)))
            fail("out of memory");
        c->delivered = 0;
        c->txoff = c->txlen = 0;
        c->pending_listed = 0;
    }
    s->npending = 0;
    s->cap = (uint64_t)(budget_rate * secs);
    s->seen = calloc((size_t)(s->cap / 8 + 1), 1);
    s->nticks = (uint64_t)((secs * 1000.0) + (double)drain_ms) + 2;
    s->tick_first = calloc((size_t)s->nticks + 1, sizeof(uint64_t));
    double per = s->o.samples_per_sec > 0 ? budget_rate / s->o.samples_per_sec : 0;
    s->sample_every = per < 1 ? 1 : (uint64_t)per;
    s->lat_us = calloc(MAX_LAT_SAMPLES, sizeof(uint32_t));
    if (!s->seen || !s->tick_first || !s->lat_us)
        fail("out of memory");
    s->sent = s->low = s->expired = 0;
    s->cur_tick = s->low_tick = 0;
    s->nlat = 0;
    s->expect_peer = c2p;
    if (getrandom(&s->run_nonce, sizeof s->run_nonce, 0) != sizeof s->run_nonce)
        die("getrandom");
    while (poll_once(s, 0, NULL) > 0) { /* leftovers of an earlier step */
    }
    memset(&s->rx, 0, sizeof s->rx);
    double u0, s0, u1, s1;
    cpu_seconds(&u0, &s0);
    uint64_t tick = (uint64_t)s->o.tick_us * 1000ull, dur = (uint64_t)(secs * 1e9);
    uint64_t blocked = 0, send_fail = 0, window_waits = 0, valid_in_send = 0;
    uint64_t window = (uint64_t)s->o.inflight, burst = (uint64_t)s->o.burst;
    int rr = 0;
    uint64_t t0 = now_ns();
    for (;;) {
        uint64_t now = now_ns() - t0;
        if (now >= dur || g_stop || s->sent >= s->cap)
            break;
        set_tick(s, now);
        advance_low(s);
        flush_pending(s, &blocked);
        uint64_t target = rate > 0 ? (uint64_t)(rate * (double)now / 1e9) + 1 : s->cap;
        if (target > s->cap)
            target = s->cap;
        uint64_t need = target > s->sent ? target - s->sent : 0;
        uint64_t inflight = s->sent - s->rx.valid - s->expired;
        uint64_t room = inflight < window ? window - inflight : 0;
        if (need > room) {
            need = room;
            window_waits++;
        }
        int visits = 0, progress = 0;
        while (need > 0 && visits < nact) {
            int idx = act[rr];
            rr = (rr + 1) % nact;
            visits++;
            uint64_t k = need < burst ? need : burst;
            if (c2p) {
                if (s->c[idx].txlen > 0 || s->c[idx].dead)
                    continue; /* still writing its last burst */
                send_c2p(s, idx, k, &blocked);
            } else if (send_p2c(s, idx, k) == 0) {
                send_fail++;
                continue;
            }
            need -= k;
            progress = 1;
        }
        /* Wait for deliveries (they reopen the window), for TCP back-pressure to ease, or
         * for the next tick of the rate; never spin (the server needs the CPU). */
        int wait_ms = 0;
        if (need > 0 && !progress) {
            wait_ms = 1;
        } else if (need == 0) {
            uint64_t next = now + tick;
            uint64_t left = next > dur ? dur - now : tick;
            wait_ms = (int)(left / 1000000ull);
            if (wait_ms == 0 && rate > 0)
                wait_ms = 1;
        }
        poll_once(s, wait_ms, NULL);
    }
    uint64_t send_end = now_ns() - t0;
    valid_in_send = s->rx.valid;
    double send_s = (double)send_end / 1e9;
    uint64_t drain_end = send_end + (uint64_t)drain_ms * 1000000ull;
    for (;;) {
        uint64_t now = now_ns() - t0;
        if (now >= drain_end || g_stop)
            break;
        set_tick(s, now);
        flush_pending(s, &blocked);
        if (s->npending == 0 && s->rx.valid >= s->sent)
            break; /* everything arrived */
        poll_once(s, 1, NULL);
    }
    while (poll_once(s, 0, NULL) > 0) {
    }
    set_tick(s, now_ns() - t0);
    advance_low(s);
    double wall_s = (double)(now_ns() - t0) / 1e9;
    cpu_seconds(&u1, &s1);
    uint64_t unsent = 0;
    for (int i = 0; i < s->npending; i++) { /* bytes never written: drop those messages */
        struct conn *c = &s->c[s->pending[i]];
        unsent += (c->txlen - c->txoff) / seg;
    }
    qsort(s->lat_us, s->nlat, sizeof(uint32_t), cmp_u32);
    double loss = s->sent ? 100.0 * (double)(s->sent - s->rx.valid) / (double)s->sent : 0.0;
    uint32_t amin = UINT32_MAX, amax = 0;
    int silent = 0, dead = 0;
    for (int k = 0; k < nact; k++) {
        uint32_t v = s->c[act[k]].delivered;
        amin = v < amin ? v : amin;
        amax = v > amax ? v : amax;
        silent += v == 0;
        dead += s->c[act[k]].dead;
    }
    printf("{\"cmd\":\"relay\",\"direction\":\"%s\",\"offered_pps\":%.0f,\"allocations\":%d,"
           "\"payload\":%d,\"burst\":%d,\"inflight_window\":%d,\"send_elapsed_s\":%.4f,"
           "\"wall_s\":%.4f,\"sent\":%llu,\"achieved_send_pps\":%.1f,\"valid\":%llu,"
           "\"valid_in_send\":%llu,\"delivered_pps\":%.1f,\"loss_pct\":%.4f,\"expired\":%llu,"
           "\"late\":%llu,\"unsent\":%llu,\"received\":%llu,\"duplicates\":%llu,"
           "\"misrouted\":%llu,\"bad\":%llu,\"stale\":%llu,\"stray\":%llu,\"recv_errors\":%llu,"
           "\"write_blocked\":%llu,\"send_fail\":%llu,\"window_waits\":%llu,"
           "\"dead_connections\":%d,",
           dir, rate, nact, s->o.payload, s->o.burst, s->o.inflight, send_s, wall_s,
           (unsigned long long)s->sent, send_s > 0 ? (double)s->sent / send_s : 0.0,
           (unsigned long long)s->rx.valid, (unsigned long long)valid_in_send,
           send_s > 0 ? (double)valid_in_send / send_s : 0.0, loss,
           (unsigned long long)s->expired, (unsigned long long)s->rx.late,
           (unsigned long long)unsent, (unsigned long long)s->rx.received,
           (unsigned long long)s->rx.duplicates, (unsigned long long)s->rx.misrouted,
           (unsigned long long)s->rx.bad, (unsigned long long)s->rx.stale,
           (unsigned long long)s->rx.stray, (unsigned long long)s->rx.recv_errors,
           (unsigned long long)blocked, (unsigned long long)send_fail,
           (unsigned long long)window_waits, dead);
    printf("\"per_allocation\":{\"min\":%u,\"max\":%u,\"silent\":%d},", amin, amax, silent);
    printf("\"latency_us\":{\"samples\":%u,\"p50\":%u,\"p90\":%u,\"p99\":%u,\"max\":%u},",
           s->nlat, pct(s->lat_us, s->nlat, 0.5), pct(s->lat_us, s->nlat, 0.9),
           pct(s->lat_us, s->nlat, 0.99), s->nlat ? s->lat_us[s->nlat - 1] : 0);
    printf("\"cpu\":{\"user_s\":%.3f,\"sys_s\":%.3f,\"pct_of_one_core\":%.1f}}\n", u1 - u0,
           s1 - s0, wall_s > 0 ? 100.0 * ((u1 - u0) + (s1 - s0)) / wall_s : 0.0);
    fflush(stdout);
    /* Unsent tails would corrupt the next step's framing: finish them (bounded). */
    for (int i = 0; i < s->npending; i++) {
        struct conn *c = &s->c[s->pending[i]];
        if (write_all(c->fd, c->tx + c->txoff, c->txlen - c->txoff, 2000) < 0)
            c->dead = 1;
        c->txoff = c->txlen = 0;
        c->pending_listed = 0;
    }
    s->npending = 0;
    free(s->seen);
    free(s->lat_us);
    free(s->tick_first);
    free(s->pending);
    s->seen = NULL;
    s->lat_us = NULL;
    s->tick_first = NULL;
    s->pending = NULL;
    free(act);
}

static int run_session(const struct opts *o) {
    static struct session s; /* large: keep off the stack */
    s.o = *o;
    s.server = make_addr(o->host, o->port);
    s.peer_bind = make_addr(o->peer_host, 0);
    parse_hosts(&s, o->client_hosts);
    s.c = calloc(MAX_CONNS, sizeof(struct conn));
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
        if (strcmp(cmd, "alloc") == 0 && nf >= 2)
            cmd_alloc(&s, atoi(a));
        else if (strcmp(cmd, "bind") == 0)
            cmd_bind(&s);
        else if (strcmp(cmd, "release") == 0)
            cmd_release(&s);
        else if (strcmp(cmd, "relay") == 0 && nf == 5)
            cmd_relay(&s, a, b, c, d);
        else {
            printf("{\"cmd\":\"?\",\"error\":\"unknown command\"}\n");
            fflush(stdout);
        }
    }
    return 0;
}

/* ---- fake: a trivial TURN-over-TCP relay for calibration ---- */

#define FAKE_MAX 10000

struct fconn {
    int fd, relay_fd, channel, used;
    struct sockaddr_in relayed, peer;
    uint32_t rxlen;
    uint8_t *rx;
};

/* One relay thread: its own listening socket (SO_REUSEPORT group), epoll and connections. */
struct fake {
    struct opts o;
    int lfd, ep;
    struct fconn *c;
    uint8_t in[RX_BATCH][RX_SLOT];
    struct sockaddr_in from[RX_BATCH];
    struct mmsghdr rm[RX_BATCH], tm[RX_BATCH];
    struct iovec ri[RX_BATCH], ti[RX_BATCH];
    uint8_t out[RX_BATCH * (RX_SLOT + 8)];
    uint64_t relayed_c2p, relayed_p2c, allocations, dropped;
};

static void fake_reply(struct fconn *c, struct msg *m) {
    if (write_all(c->fd, m->b, m->n, 100) < 0)
        fprintf(stderr, "turn_tcp_loadgen fake: reply not written\n");
}

static void fake_stun(struct fake *f, int idx, const uint8_t *p, size_t n) {
    struct fconn *c = &f->c[idx];
    struct parsed q;
    if (parse_stun(p, n, &q) < 0 || (q.type & 0x0110) != 0)
        return;
    int method = q.type & 0x3EEF;
    struct msg m;
    struct sockaddr_in peer;
    socklen_t sl = sizeof peer;
    getpeername(c->fd, (struct sockaddr *)&peer, &sl);
    if (method == M_BINDING) {
        msg_start(&m, (uint16_t)(M_BINDING | CLS_SUCCESS), q.txid);
        msg_xor_addr(&m, A_XOR_MAPPED_ADDRESS, &peer);
        fake_reply(c, &m);
        return;
    }
    if (!q.has_integrity) {
        msg_start(&m, (uint16_t)(method | CLS_ERROR), q.txid);
        uint8_t v[4] = {0, 0, 4, 1};
        msg_attr(&m, A_ERROR_CODE, v, 4);
        msg_attr(&m, A_REALM, "bench", 5);
        msg_attr(&m, A_NONCE, "fake0123456789ab", 16);
        fake_reply(c, &m);
        return;
    }
    msg_start(&m, (uint16_t)(method | CLS_SUCCESS), q.txid);
    if (method == M_ALLOCATE) {
        if (c->relay_fd < 0) {
            struct sockaddr_in ra = make_addr(f->o.relay_ip, 0);
            c->relay_fd = udp_socket(&ra, 0);
            local_addr(c->relay_fd, &c->relayed);
            struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)idx << 2) | 2};
            if (epoll_ctl(f->ep, EPOLL_CTL_ADD, c->relay_fd, &ev) < 0)
                die("epoll_ctl");
            f->allocations++;
        }
        msg_xor_addr(&m, A_XOR_RELAYED_ADDRESS, &c->relayed);
        msg_u32(&m, A_LIFETIME, 600);
        msg_xor_addr(&m, A_XOR_MAPPED_ADDRESS, &peer);
    } else if (method == M_CHANNEL_BIND && q.has_peer && q.channel >= 0) {
        c->channel = q.channel;
        c->peer = q.peer;
    }
    fake_reply(c, &m);
}

static void fake_close(struct fconn *c) {
    close(c->fd);
    if (c->relay_fd >= 0)
        close(c->relay_fd);
    free(c->rx);
    memset(c, 0, sizeof *c);
}

/* Send the ChannelData payloads gathered in f->tm[0..n) to the connection's peer. */
static void fake_flush_c2p(struct fake *f, struct fconn *c, int n) {
    for (int done = 0; done < n;) {
        int rc = sendmmsg(c->relay_fd, f->tm + done, (unsigned)(n - done), 0);
        if (rc <= 0) {
            f->dropped += (uint64_t)(n - done);
            return;
        }
        f->relayed_c2p += (uint64_t)rc;
        done += rc;
    }
}

static void fake_conn(struct fake *f, int idx) {
    struct fconn *c = &f->c[idx];
    for (int rounds = 0; rounds < 8; rounds++) {
        ssize_t got = recv(c->fd, c->rx + c->rxlen, RX_CAP - c->rxlen, MSG_DONTWAIT);
        if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
            fake_close(c);
            return;
        }
        if (got < 0)
            return;
        c->rxlen += (uint32_t)got;
        size_t off = 0;
        int batched = 0; /* payloads pointing into c->rx, sent before it moves */
        for (;;) {
            long fl = frame_len(c->rx + off, c->rxlen - off);
            if (fl < 0) {
                fake_close(c);
                return;
            }
            if (fl == 0)
                break;
            uint8_t *p = c->rx + off;
            if (p[0] >= 0x40 && p[0] < 0x80) {
                if (c->relay_fd >= 0 && c->channel == get16(p)) {
                    f->ti[batched].iov_base = p + 4;
                    f->ti[batched].iov_len = get16(p + 2);
                    f->tm[batched].msg_hdr.msg_name = &c->peer;
                    f->tm[batched].msg_hdr.msg_namelen = sizeof c->peer;
                    if (++batched == RX_BATCH) {
                        fake_flush_c2p(f, c, batched);
                        batched = 0;
                    }
                }
            } else {
                fake_stun(f, idx, p, (size_t)fl);
            }
            off += (size_t)fl;
        }
        if (batched)
            fake_flush_c2p(f, c, batched);
        memmove(c->rx, c->rx + off, c->rxlen - off);
        c->rxlen -= (uint32_t)off;
        if ((size_t)got < RX_CAP / 2)
            return;
    }
}

static void fake_relay(struct fake *f, int idx) {
    struct fconn *c = &f->c[idx];
    for (int rounds = 0; rounds < 8 && c->relay_fd >= 0; rounds++) {
        for (int i = 0; i < RX_BATCH; i++)
            f->rm[i].msg_hdr.msg_namelen = sizeof f->from[i];
        int rc = recvmmsg(c->relay_fd, f->rm, RX_BATCH, MSG_DONTWAIT, NULL);
        size_t n = 0;
        for (int k = 0; k < rc; k++) {
            size_t len = f->rm[k].msg_len;
            if (c->channel < 0 || f->from[k].sin_port != c->peer.sin_port ||
                f->from[k].sin_addr.s_addr != c->peer.sin_addr.s_addr)
                continue;
            put16(f->out + n, (uint16_t)c->channel);
            put16(f->out + n + 2, (uint16_t)len);
            memcpy(f->out + n + 4, f->in[k], len);
            memset(f->out + n + 4 + len, 0, pad4(len) - len);
            n += 4 + pad4(len);
            f->relayed_p2c++;
        }
        if (n > 0 && write_all(c->fd, f->out, n, 100) < 0)
            f->dropped++;
        if (rc < RX_BATCH)
            return;
    }
}

static void *fake_thread(void *arg) {
    struct fake *f = arg;
    struct epoll_event evs[MAX_EVENTS];
    uint64_t end = now_ns() + (uint64_t)(f->o.duration * 1e9);
    int on = 1;
    while (!g_stop && now_ns() < end) {
        int ne = epoll_wait(f->ep, evs, MAX_EVENTS, 100);
        for (int e = 0; e < ne; e++) {
            uint64_t d = evs[e].data.u64;
            if (d == 0) {
                for (int k = 0; k < 64; k++) {
                    int fd = accept4(f->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0)
                        break;
                    int idx = 1;
                    while (idx < FAKE_MAX && f->c[idx].used)
                        idx++;
                    if (idx >= FAKE_MAX) {
                        close(fd);
                        continue;
                    }
                    struct fconn *c = &f->c[idx];
                    c->used = 1;
                    c->fd = fd;
                    c->relay_fd = -1;
                    c->channel = -1;
                    c->rx = malloc(RX_CAP);
                    if (!c->rx)
                        fail("out of memory");
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
                    struct epoll_event cev = {.events = EPOLLIN,
                                              .data.u64 = ((uint64_t)idx << 2) | 1};
                    if (epoll_ctl(f->ep, EPOLL_CTL_ADD, fd, &cev) < 0)
                        die("epoll_ctl");
                }
            } else if ((d & 3) == 1 && f->c[d >> 2].used) {
                fake_conn(f, (int)(d >> 2));
            } else if ((d & 3) == 2 && f->c[d >> 2].used) {
                fake_relay(f, (int)(d >> 2));
            }
        }
    }
    return NULL;
}

static int run_fake(const struct opts *o) {
    int nthreads = o->threads;
    struct fake *fs = calloc((size_t)nthreads, sizeof(struct fake));
    pthread_t *tids = calloc((size_t)nthreads, sizeof(pthread_t));
    if (!fs || !tids)
        fail("out of memory");
    struct sockaddr_in a = make_addr(o->host, o->port);
    for (int t = 0; t < nthreads; t++) {
        struct fake *f = &fs[t];
        f->o = *o;
        f->c = calloc(FAKE_MAX, sizeof(struct fconn));
        f->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int on = 1;
        if (!f->c || f->lfd < 0)
            die("fake init");
        setsockopt(f->lfd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
        setsockopt(f->lfd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on);
        if (bind(f->lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(f->lfd, 1024) < 0)
            die("fake listen");
        f->ep = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0};
        if (f->ep < 0 || epoll_ctl(f->ep, EPOLL_CTL_ADD, f->lfd, &ev) < 0)
            die("epoll");
        for (int i = 0; i < RX_BATCH; i++) {
            f->ri[i].iov_base = f->in[i];
            f->ri[i].iov_len = RX_SLOT;
            f->rm[i].msg_hdr.msg_iov = &f->ri[i];
            f->rm[i].msg_hdr.msg_iovlen = 1;
            f->rm[i].msg_hdr.msg_name = &f->from[i];
            f->tm[i].msg_hdr.msg_iov = &f->ti[i];
            f->tm[i].msg_hdr.msg_iovlen = 1;
        }
    }
    for (int t = 0; t < nthreads; t++)
        if (pthread_create(&tids[t], NULL, fake_thread, &fs[t]) != 0)
            fail("pthread_create failed");
    fprintf(stderr, "READY %s %d threads %d\n", o->host, o->port, nthreads);
    uint64_t alloc = 0, c2p = 0, p2c = 0, dropped = 0;
    for (int t = 0; t < nthreads; t++) {
        pthread_join(tids[t], NULL);
        alloc += fs[t].allocations;
        c2p += fs[t].relayed_c2p;
        p2c += fs[t].relayed_p2c;
        dropped += fs[t].dropped;
    }
    printf("{\"mode\":\"fake\",\"threads\":%d,\"allocations\":%llu,\"relayed_c2p\":%llu,"
           "\"relayed_p2c\":%llu,\"dropped\":%llu}\n",
           nthreads, (unsigned long long)alloc, (unsigned long long)c2p,
           (unsigned long long)p2c, (unsigned long long)dropped);
    fflush(stdout);
    return 0;
}

/* ---- CLI ---- */

static void usage(void) {
    fprintf(stderr,
            "usage: turn_tcp_loadgen session --host H --port P [--client-hosts IP,IP,..]\n"
            "         [--peer-host IP] [--user U] [--password PW] [--payload B] [--burst N]\n"
            "         [--tick-us US] [--window N] [--inflight N] [--loss-timeout-ms MS]\n"
            "         [--op-timeout S] [--fingerprint] [--rcvbuf B] [--samples-per-sec N]\n"
            "         (then commands on stdin: alloc N | bind | relay c2p|p2c PPS SECS DRAIN_MS\n"
            "          | release | quit; PPS 0 = saturation, bounded by --inflight)\n"
            "       turn_tcp_loadgen fake --host H --port P [--relay-ip IP] [--threads N]\n"
            "         --duration S\n");
    exit(2);
}

static void parse(int argc, char **argv, struct opts *o) {
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},         {"port", required_argument, 0, 'p'},
        {"client-hosts", required_argument, 0, 'C'}, {"peer-host", required_argument, 0, 'e'},
        {"relay-ip", required_argument, 0, 'R'},     {"user", required_argument, 0, 'u'},
        {"password", required_argument, 0, 'w'},     {"payload", required_argument, 0, 'l'},
        {"burst", required_argument, 0, 'g'},        {"tick-us", required_argument, 0, 't'},
        {"window", required_argument, 0, 'W'},       {"inflight", required_argument, 0, 'I'},
        {"loss-timeout-ms", required_argument, 0, 'L'},
        {"op-timeout", required_argument, 0, 'T'},   {"duration", required_argument, 0, 'd'},
        {"fingerprint", no_argument, 0, 'f'},        {"rcvbuf", required_argument, 0, 'b'},
        {"samples-per-sec", required_argument, 0, 'S'}, {"threads", required_argument, 0, 'N'},
        {0, 0, 0, 0}};
    if (argc < 2)
        usage();
    o->mode = argv[1];
    optind = 2;
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'h': o->host = optarg; break;
        case 'p': o->port = atoi(optarg); break;
        case 'C': o->client_hosts = optarg; break;
        case 'e': o->peer_host = optarg; break;
        case 'R': o->relay_ip = optarg; break;
        case 'u': o->user = optarg; break;
        case 'w': o->password = optarg; break;
        case 'l': o->payload = atoi(optarg); break;
        case 'g': o->burst = atoi(optarg); break;
        case 't': o->tick_us = atol(optarg); break;
        case 'W': o->window = atoi(optarg); break;
        case 'I': o->inflight = atoi(optarg); break;
        case 'L': o->loss_timeout_ms = atol(optarg); break;
        case 'T': o->op_timeout = atof(optarg); break;
        case 'd': o->duration = atof(optarg); break;
        case 'f': o->fingerprint = 1; break;
        case 'b': o->rcvbuf = atoi(optarg); break;
        case 'S': o->samples_per_sec = atof(optarg); break;
        case 'N': o->threads = atoi(optarg); break;
        default: usage();
        }
    }
}

static void validate(const struct opts *o) {
    if (o->port <= 0 || o->port > 65535)
        fail("--port must be in [1, 65535]");
    if (strcmp(o->mode, "fake") == 0) {
        if (o->duration <= 0 || o->duration > 7200)
            fail("--duration must be in (0, 7200]");
        if (o->threads < 1 || o->threads > 64)
            fail("--threads must be in [1, 64]");
        return;
    }
    if (o->payload < PAYLOAD_MIN || o->payload > PAYLOAD_MAX)
        fail("--payload must be in [24, 1200]");
    if (o->burst < 1 || o->burst > MAX_BURST)
        fail("--burst must be in [1, 64]");
    if (o->tick_us < 1000 || o->tick_us > 100000)
        fail("--tick-us must be in [1000, 100000]");
    if (o->window < 1 || o->window > 10000 || o->inflight < 1 || o->inflight > 1000000)
        fail("--window must be in [1, 10000], --inflight in [1, 1000000]");
    if (o->loss_timeout_ms < 10 || o->loss_timeout_ms > 10000)
        fail("--loss-timeout-ms must be in [10, 10000]");
    if (o->op_timeout <= 0 || o->op_timeout > 3600)
        fail("--op-timeout must be in (0, 3600]");
}

int main(int argc, char **argv) {
    struct opts o = {.host = "127.0.0.1", .port = 0, .client_hosts = "127.0.0.1",
                     .peer_host = "127.0.0.2", .relay_ip = "127.0.0.1", .user = "alice",
                     .password = "secret", .payload = 100, .burst = 16, .tick_us = 1000,
                     .window = 128, .inflight = 8192, .loss_timeout_ms = 500,
                     .op_timeout = 60, .duration = 60, .rcvbuf = 1 << 20,
                     .samples_per_sec = 5000, .threads = 1};
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

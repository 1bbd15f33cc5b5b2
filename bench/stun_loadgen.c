/*
 * stun_loadgen: open-loop STUN Binding load generator (and trivial sink/reflector).
 *
 * Modes:
 *   send     Offer Binding requests at a fixed rate for a fixed time over UDP from
 *            N connected source sockets, count and validate responses, print one
 *            JSON line on stdout.
 *   sink     Bind HOST:PORT and drain datagrams (recvmmsg) for a fixed time; with
 *            --reflect answer each request with a Binding success response.
 *            Used to measure the generator's own capacity. Prints one JSON line.
 *
 * Pacing: every --tick-us the sender computes how many packets should have been
 * sent since the start (rate * elapsed) and sends the deficit with sendmmsg,
 * spread over the source sockets. Responses are read with recvmmsg in the same
 * thread whenever ppoll reports readable sockets between ticks.
 *
 * Transaction ID layout (96 bits): 4 random bytes per run, then a 64-bit
 * big-endian sequence number, so a response is matched in O(1).
 *
 * Build: gcc -O2 -Wall -Wextra -o stun_loadgen stun_loadgen.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAGIC_COOKIE 0x2112A442u
#define FP_XOR 0x5354554Eu
#define REQ_MAX 28   /* header + FINGERPRINT */
#define RESP_MAX 256
#define RX_BATCH 64
#define TX_BATCH 1024  /* packets per send_on() call */
#define MAX_GSO 64
#define MAX_SOCKETS 256
#define MAX_PACKETS 200000000ull
#define MAX_LAT_SAMPLES 2000000u
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

struct opts {
    const char *mode;
    const char *host;
    const char *port;
    double rate;
    double duration;
    int sockets;
    long tick_us;
    long drain_ms;
    int fingerprint;
    double samples_per_sec;
    long max_burst_ms;
    int reflect;
    int rcvbuf;
    int gso;
    const char *src_ports; /* comma list: bind source sockets to these ports */
};

struct rxstats {
    uint64_t received;
    uint64_t valid;
    uint64_t duplicates;
    uint64_t bad_format;
    uint64_t bad_type;
    uint64_t unknown_txid;
    uint64_t bad_mapped;
    uint64_t recv_errors;
};

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static uint64_t realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
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
    fprintf(stderr, "stun_loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void fail(const char *what) {
    fprintf(stderr, "stun_loadgen: %s\n", what);
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

static void put64(uint8_t *p, uint64_t v) {
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}

static uint16_t get16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static uint32_t get32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t get64(const uint8_t *p) { return ((uint64_t)get32(p) << 32) | get32(p + 4); }

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

/* ---- STUN messages ---- */

static size_t build_request(uint8_t *buf, uint32_t nonce, uint64_t seq, int fingerprint) {
    put16(buf, 0x0001);
    put16(buf + 2, fingerprint ? 8 : 0);
    put32(buf + 4, MAGIC_COOKIE);
    put32(buf + 8, nonce);
    put64(buf + 12, seq);
    if (!fingerprint)
        return 20;
    put16(buf + 20, 0x8028);
    put16(buf + 22, 4);
    put32(buf + 24, crc32(buf, 20) ^ FP_XOR);
    return 28;
}

/* Check an XOR-MAPPED-ADDRESS value against the expected (our local) address. */
static int xma_matches(const uint8_t *v, uint16_t len, const uint8_t *hdr,
                       const struct sockaddr_storage *local) {
    if (len < 8)
        return 0;
    uint16_t port = get16(v + 2) ^ (uint16_t)(MAGIC_COOKIE >> 16);
    if (v[1] == 0x01 && local->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)local;
        uint32_t ip = get32(v + 4) ^ MAGIC_COOKIE;
        return port == ntohs(a->sin_port) && ip == ntohl(a->sin_addr.s_addr);
    }
    if (v[1] == 0x02 && local->ss_family == AF_INET6 && len >= 20) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)local;
        uint8_t ip[16];
        for (int i = 0; i < 16; i++)
            ip[i] = v[4 + i] ^ hdr[4 + i];
        return port == ntohs(a->sin6_port) && memcmp(ip, &a->sin6_addr, 16) == 0;
    }
    return 0;
}

/* Returns 1 if the response carries an XOR-MAPPED-ADDRESS equal to `local`. */
static int check_mapped(const uint8_t *p, size_t n, const struct sockaddr_storage *local) {
    size_t off = 20;
    while (off + 4 <= n) {
        uint16_t type = get16(p + off);
        uint16_t len = get16(p + off + 2);
        if (off + 4 + len > n)
            return 0;
        if (type == 0x0020)
            return xma_matches(p + off + 4, len, p, local);
        off += 4 + (((size_t)len + 3) & ~(size_t)3);
    }
    return 0;
}

/* ---- send mode state ---- */

struct sender {
    struct opts o;
    int nsock;
    int fds[MAX_SOCKETS];
    struct sockaddr_storage local[MAX_SOCKETS];
    uint32_t nonce;
    uint64_t total;        /* packets to send in the whole run */
    uint64_t sent;
    uint64_t send_errors;
    uint64_t send_eagain;
    uint8_t *seen;         /* bitmap, one bit per sequence number */
    uint64_t sample_every;
    uint64_t *sample_tx;   /* CLOCK_REALTIME send time (ns) of every sample_every-th packet */
    uint32_t *lat_us;
    uint32_t nlat;
    uint64_t t0;
    size_t req_len;
    int gso;               /* datagrams per UDP_SEGMENT super-packet (1 = no GSO) */
    struct rxstats rx;
    uint8_t txbuf[TX_BATCH * REQ_MAX];
    struct mmsghdr txmsg[TX_BATCH];
    struct iovec txiov[TX_BATCH];
    uint8_t rxbuf[RX_BATCH][RESP_MAX];
    struct mmsghdr rxmsg[RX_BATCH];
    struct iovec rxiov[RX_BATCH];
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(struct timespec))];
    } rxctl[RX_BATCH];
    uint64_t own_drops;    /* receive-queue drops on our sockets (/proc/net/udp) */
};

static int enable_gso(struct sender *s, int want);

/* Parse "p1,p2,..." into ports[]; returns the count. */
static int parse_ports(const char *list, uint16_t *ports, int max) {
    int n = 0;
    const char *p = list;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > 65535 || n >= max || (*end && *end != ','))
            fail("bad --src-ports list");
        ports[n++] = (uint16_t)v;
        p = *end == ',' ? end + 1 : end;
    }
    return n;
}

/* Bind fd to the target's address family and host with the given source port. */
static void bind_source(int fd, const struct addrinfo *ai, uint16_t port) {
    struct sockaddr_storage ss;
    memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
    if (ss.ss_family == AF_INET)
        ((struct sockaddr_in *)&ss)->sin_port = htons(port);
    else
        ((struct sockaddr_in6 *)&ss)->sin6_port = htons(port);
    if (bind(fd, (struct sockaddr *)&ss, ai->ai_addrlen) < 0)
        die("bind source port");
}

static int open_socket(const struct addrinfo *ai, int rcvbuf) {
    int fd = socket(ai->ai_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    if (rcvbuf > 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) < 0)
        die("setsockopt SO_RCVBUF");
    return fd;
}

static struct addrinfo *resolve(const char *host, const char *port, int passive) {
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_DGRAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0 || res == NULL) {
        fprintf(stderr, "stun_loadgen: bad address %s:%s: %s\n", host, port, gai_strerror(rc));
        exit(2);
    }
    return res;
}

static void sender_init(struct sender *s) {
    struct addrinfo *ai = resolve(s->o.host, s->o.port, 0);
    uint16_t ports[MAX_SOCKETS];
    int nports = s->o.src_ports ? parse_ports(s->o.src_ports, ports, MAX_SOCKETS) : 0;
    s->nsock = nports ? nports : s->o.sockets;
    for (int i = 0; i < s->nsock; i++) {
        s->fds[i] = open_socket(ai, s->o.rcvbuf);
        if (nports)
            bind_source(s->fds[i], ai, ports[i]);
        if (connect(s->fds[i], ai->ai_addr, ai->ai_addrlen) < 0)
            die("connect");
        socklen_t sl = sizeof s->local[i];
        if (getsockname(s->fds[i], (struct sockaddr *)&s->local[i], &sl) < 0)
            die("getsockname");
        int on = 1; /* kernel receive timestamps for latency */
        if (setsockopt(s->fds[i], SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on) < 0)
            die("setsockopt SO_TIMESTAMPNS");
    }
    freeaddrinfo(ai);
    s->req_len = s->o.fingerprint ? 28 : 20;
    s->gso = enable_gso(s, s->o.gso);
    if (getrandom(&s->nonce, sizeof s->nonce, 0) != sizeof s->nonce)
        die("getrandom");
    double want = s->o.rate * s->o.duration;
    if (want >= (double)MAX_PACKETS)
        fail("rate * duration too large");
    s->total = (uint64_t)want;
    s->seen = calloc((size_t)(s->total / 8 + 1), 1);
    double per = s->o.samples_per_sec > 0 ? s->o.rate / s->o.samples_per_sec : 0;
    s->sample_every = per < 1 ? 1 : (uint64_t)per;
    if (s->total / s->sample_every + 1 > MAX_LAT_SAMPLES)
        s->sample_every = s->total / MAX_LAT_SAMPLES + 1;
    s->sample_tx = calloc((size_t)(s->total / s->sample_every + 1), sizeof(uint64_t));
    s->lat_us = calloc((size_t)(s->total / s->sample_every + 1), sizeof(uint32_t));
    if (!s->seen || !s->sample_tx || !s->lat_us)
        fail("out of memory");
    for (int i = 0; i < TX_BATCH; i++) {
        s->txmsg[i].msg_hdr.msg_iov = &s->txiov[i];
        s->txmsg[i].msg_hdr.msg_iovlen = 1;
    }
    for (int i = 0; i < RX_BATCH; i++) {
        s->rxiov[i].iov_base = s->rxbuf[i];
        s->rxiov[i].iov_len = RESP_MAX;
        s->rxmsg[i].msg_hdr.msg_iov = &s->rxiov[i];
        s->rxmsg[i].msg_hdr.msg_iovlen = 1;
        s->rxmsg[i].msg_hdr.msg_control = s->rxctl[i].buf;
    }
}

/* Turn on UDP GSO (one send = many equal-size datagrams); falls back to 1. */
static int enable_gso(struct sender *s, int want) {
    if (want <= 1)
        return 1;
    int seg = (int)s->req_len;
    for (int i = 0; i < s->nsock; i++)
        if (setsockopt(s->fds[i], IPPROTO_UDP, UDP_SEGMENT, &seg, sizeof seg) < 0) {
            fprintf(stderr, "stun_loadgen: UDP_SEGMENT unavailable (%s), no GSO\n",
                    strerror(errno));
            return 1;
        }
    return want > MAX_GSO ? MAX_GSO : want;
}

/* Send up to n packets on socket i (sendmmsg of GSO groups); returns how many went out. */
static uint64_t send_on(struct sender *s, int i, uint64_t n) {
    if (n > TX_BATCH)
        n = TX_BATCH;
    uint64_t t = realtime_ns();
    for (uint64_t k = 0; k < n; k++) {
        uint64_t seq = s->sent + k;
        build_request(s->txbuf + k * s->req_len, s->nonce, seq, s->o.fingerprint);
        if (seq % s->sample_every == 0)
            s->sample_tx[seq / s->sample_every] = t;
    }
    unsigned nmsg = 0;
    for (uint64_t k = 0; k < n; k += (uint64_t)s->gso, nmsg++) {
        uint64_t cnt = n - k < (uint64_t)s->gso ? n - k : (uint64_t)s->gso;
        s->txiov[nmsg].iov_base = s->txbuf + k * s->req_len;
        s->txiov[nmsg].iov_len = cnt * s->req_len;
    }
    int rc = sendmmsg(s->fds[i], s->txmsg, nmsg, 0);
    if (rc < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
            s->send_eagain++;
        else
            s->send_errors++;
        return 0;
    }
    uint64_t done = 0;
    for (int m = 0; m < rc; m++)
        done += s->txiov[m].iov_len / s->req_len;
    s->sent += done;
    return done;
}

/* Send `need` packets spread over the sockets round-robin from *rr, at least one GSO
 * group per socket visit, so every socket gets an equal share over a few ticks. */
static void send_burst(struct sender *s, uint64_t need, int *rr) {
    uint64_t per = (need + (uint64_t)s->nsock - 1) / (uint64_t)s->nsock;
    if (per < (uint64_t)s->gso)
        per = (uint64_t)s->gso;
    int stalls = 0;
    while (need > 0 && stalls < s->nsock) {
        uint64_t want = per < need ? per : need;
        uint64_t got = send_on(s, *rr, want);
        *rr = (*rr + 1) % s->nsock;
        need -= got;
        stalls = got == 0 ? stalls + 1 : 0;
    }
}

/* Kernel receive time (CLOCK_REALTIME ns) from SCM_TIMESTAMPNS, else the time now. */
static uint64_t rx_time(struct msghdr *mh) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
        }
    }
    return realtime_ns();
}

static void handle_response(struct sender *s, int i, const uint8_t *p, size_t n,
                            struct msghdr *mh) {
    s->rx.received++;
    if (n < 20 || get32(p + 4) != MAGIC_COOKIE || (size_t)get16(p + 2) + 20 != n || (n & 3)) {
        s->rx.bad_format++;
        return;
    }
    if (get16(p) != 0x0101) {
        s->rx.bad_type++;
        return;
    }
    uint64_t seq = get64(p + 12);
    if (get32(p + 8) != s->nonce || seq >= s->sent) {
        s->rx.unknown_txid++;
        return;
    }
    uint8_t bit = (uint8_t)(1u << (seq & 7));
    if (s->seen[seq >> 3] & bit) {
        s->rx.duplicates++;
        return;
    }
    if (!check_mapped(p, n, &s->local[i])) {
        s->rx.bad_mapped++;
        return;
    }
    s->seen[seq >> 3] |= bit;
    s->rx.valid++;
    if (seq % s->sample_every == 0 && s->nlat < MAX_LAT_SAMPLES) {
        uint64_t tx = s->sample_tx[seq / s->sample_every], rx = rx_time(mh);
        uint64_t rtt_us = rx > tx ? (rx - tx) / 1000 : 0;
        s->lat_us[s->nlat++] = (uint32_t)(rtt_us > UINT32_MAX ? UINT32_MAX : rtt_us);
    }
}

/* Read everything queued on socket i (non-blocking). */
static void drain_socket(struct sender *s, int i) {
    for (int rounds = 0; rounds < 64; rounds++) {
        for (int k = 0; k < RX_BATCH; k++)
            s->rxmsg[k].msg_hdr.msg_controllen = sizeof s->rxctl[k].buf;
        int rc = recvmmsg(s->fds[i], s->rxmsg, RX_BATCH, MSG_DONTWAIT, NULL);
        if (rc < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                s->rx.recv_errors++; /* e.g. ECONNREFUSED from ICMP */
            return;
        }
        for (int k = 0; k < rc; k++)
            handle_response(s, i, s->rxbuf[k], s->rxmsg[k].msg_len, &s->rxmsg[k].msg_hdr);
        if (rc < RX_BATCH)
            return;
    }
}

static void drain_all(struct sender *s) {
    for (int i = 0; i < s->nsock; i++)
        drain_socket(s, i);
}

/* Sleep until `deadline` (ns since t0) on CLOCK_MONOTONIC. */
static void sleep_until(const struct sender *s, uint64_t deadline) {
    uint64_t abs_ns = s->t0 + deadline;
    struct timespec ts = {(time_t)(abs_ns / 1000000000ull), (long)(abs_ns % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR && !g_stop) {
    }
}

/* Sum the "drops" column of /proc/net/udp{,6} rows whose local port is one of ours. */
static uint64_t read_own_drops(const struct sender *s) {
    int v6 = s->local[0].ss_family == AF_INET6;
    FILE *f = fopen(v6 ? "/proc/net/udp6" : "/proc/net/udp", "r");
    if (!f)
        return 0;
    char line[512];
    uint64_t total = 0;
    while (fgets(line, sizeof line, f)) {
        char *colon = strchr(strchr(line, ':') ? strchr(line, ':') + 1 : line, ':');
        char *last = strrchr(line, ' ');
        if (!colon || !last)
            continue;
        unsigned port = (unsigned)strtoul(colon + 1, NULL, 16);
        for (int i = 0; i < s->nsock; i++) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)&s->local[i];
            const struct sockaddr_in6 *b = (const struct sockaddr_in6 *)&s->local[i];
            if (port == ntohs(v6 ? b->sin6_port : a->sin_port))
                total += strtoull(last + 1, NULL, 10);
        }
    }
    fclose(f);
    return total;
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

static void print_send_json(struct sender *s, double send_s, double cpu_u, double cpu_s,
                            double wall_s) {
    qsort(s->lat_us, s->nlat, sizeof(uint32_t), cmp_u32);
    double loss = s->sent ? 100.0 * (double)(s->sent - s->rx.valid) / (double)s->sent : 0.0;
    printf("{\"mode\":\"send\",\"target\":\"%s:%s\",\"offered_pps\":%.0f,\"duration_s\":%.3f,"
           "\"send_elapsed_s\":%.4f,\"wall_s\":%.4f,\"sockets\":%d,\"gso\":%d,\"fingerprint\":%s,"
           "\"planned\":%llu,\"sent\":%llu,\"achieved_send_pps\":%.1f,"
           "\"send_errors\":%llu,\"send_eagain\":%llu,\"received\":%llu,\"valid\":%llu,"
           "\"answered_pps\":%.1f,\"duplicates\":%llu,\"bad_format\":%llu,\"bad_type\":%llu,"
           "\"unknown_txid\":%llu,\"bad_mapped\":%llu,\"recv_errors\":%llu,\"own_rx_drops\":%llu,"
           "\"loss_pct\":%.4f,",
           s->o.host, s->o.port, s->o.rate, s->o.duration, send_s, wall_s, s->nsock, s->gso,
           s->o.fingerprint ? "true" : "false", (unsigned long long)s->total,
           (unsigned long long)s->sent, send_s > 0 ? (double)s->sent / send_s : 0.0,
           (unsigned long long)s->send_errors, (unsigned long long)s->send_eagain,
           (unsigned long long)s->rx.received, (unsigned long long)s->rx.valid,
           send_s > 0 ? (double)s->rx.valid / send_s : 0.0, (unsigned long long)s->rx.duplicates,
           (unsigned long long)s->rx.bad_format, (unsigned long long)s->rx.bad_type,
           (unsigned long long)s->rx.unknown_txid, (unsigned long long)s->rx.bad_mapped,
           (unsigned long long)s->rx.recv_errors, (unsigned long long)s->own_drops, loss);
    printf("\"latency_us\":{\"samples\":%u,\"p50\":%u,\"p90\":%u,\"p99\":%u,\"p999\":%u,"
           "\"max\":%u},",
           s->nlat, pct(s->lat_us, s->nlat, 0.5), pct(s->lat_us, s->nlat, 0.9),
           pct(s->lat_us, s->nlat, 0.99), pct(s->lat_us, s->nlat, 0.999),
           s->nlat ? s->lat_us[s->nlat - 1] : 0);
    printf("\"cpu\":{\"user_s\":%.3f,\"sys_s\":%.3f,\"pct_of_one_core\":%.1f}}\n", cpu_u, cpu_s,
           wall_s > 0 ? 100.0 * (cpu_u + cpu_s) / wall_s : 0.0);
    fflush(stdout);
}

static int run_send(const struct opts *o) {
    static struct sender s; /* large: keep off the stack */
    s.o = *o;
    sender_init(&s);
    double u0, s0, u1, s1;
    cpu_seconds(&u0, &s0);
    uint64_t tick = (uint64_t)o->tick_us * 1000ull;
    uint64_t dur = (uint64_t)(o->duration * 1e9);
    uint64_t max_burst = (uint64_t)(o->rate * (double)o->max_burst_ms / 1000.0) + 1;
    int rr = 0;
    s.t0 = now_ns();
    uint64_t next = 0;
    while (s.sent < s.total && !g_stop) {
        uint64_t now = now_ns() - s.t0;
        if (now >= dur)
            break;
        uint64_t target = (uint64_t)(o->rate * (double)now / 1e9) + 1;
        if (target > s.total)
            target = s.total;
        if (target > s.sent) {
            uint64_t need = target - s.sent;
            send_burst(&s, need < max_burst ? need : max_burst, &rr);
        }
        drain_all(&s);
        next += tick;
        if (next < now)
            next = now;
        sleep_until(&s, next < dur ? next : dur);
    }
    uint64_t send_end = now_ns() - s.t0;
    double send_s = (double)send_end / 1e9;
    uint64_t drain_end = send_end + (uint64_t)o->drain_ms * 1000000ull;
    for (uint64_t t = send_end; t < drain_end && !g_stop; t += tick) {
        drain_all(&s);
        sleep_until(&s, t + tick);
    }
    drain_all(&s);
    s.own_drops = read_own_drops(&s);
    double wall_s = (double)(now_ns() - s.t0) / 1e9;
    cpu_seconds(&u1, &s1);
    print_send_json(&s, send_s, u1 - u0, s1 - s0, wall_s);
    return 0;
}

/* ---- sink / reflector ---- */

static size_t build_response(uint8_t *out, const uint8_t *req, const struct sockaddr_storage *from) {
    memcpy(out, req, 20);
    put16(out, 0x0101);
    uint8_t *a = out + 20;
    put16(a, 0x0020);
    a[4] = 0;
    if (from->ss_family == AF_INET) {
        const struct sockaddr_in *sa = (const struct sockaddr_in *)from;
        put16(a + 2, 8);
        a[5] = 0x01;
        put16(a + 6, ntohs(sa->sin_port) ^ (uint16_t)(MAGIC_COOKIE >> 16));
        put32(a + 8, ntohl(sa->sin_addr.s_addr) ^ MAGIC_COOKIE);
        put16(out + 2, 12);
        return 32;
    }
    const struct sockaddr_in6 *sa = (const struct sockaddr_in6 *)from;
    put16(a + 2, 20);
    a[5] = 0x02;
    put16(a + 6, ntohs(sa->sin6_port) ^ (uint16_t)(MAGIC_COOKIE >> 16));
    const uint8_t *ip = (const uint8_t *)&sa->sin6_addr;
    for (int i = 0; i < 16; i++)
        a[8 + i] = ip[i] ^ req[4 + i];
    put16(out + 2, 24);
    return 44;
}

static int is_binding_request(const uint8_t *p, size_t n) {
    return n >= 20 && get16(p) == 0x0001 && get32(p + 4) == MAGIC_COOKIE;
}

static int run_sink(const struct opts *o) {
    static uint8_t in[RX_BATCH][RESP_MAX], out[RX_BATCH][RESP_MAX];
    static struct sockaddr_storage from[RX_BATCH];
    static struct mmsghdr rm[RX_BATCH], tm[RX_BATCH];
    static struct iovec ri[RX_BATCH], ti[RX_BATCH];
    struct addrinfo *ai = resolve(o->host, o->port, 1);
    int fd = open_socket(ai, o->rcvbuf);
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0)
        die("bind");
    freeaddrinfo(ai);
    struct sockaddr_storage me;
    socklen_t ml = sizeof me;
    getsockname(fd, (struct sockaddr *)&me, &ml);
    char hbuf[64], pbuf[16];
    getnameinfo((struct sockaddr *)&me, ml, hbuf, sizeof hbuf, pbuf, sizeof pbuf,
                NI_NUMERICHOST | NI_NUMERICSERV);
    fprintf(stderr, "READY %s %s\n", hbuf, pbuf);
    for (int i = 0; i < RX_BATCH; i++) {
        ri[i].iov_base = in[i];
        ri[i].iov_len = RESP_MAX;
        rm[i].msg_hdr.msg_iov = &ri[i];
        rm[i].msg_hdr.msg_iovlen = 1;
        rm[i].msg_hdr.msg_name = &from[i];
        ti[i].iov_base = out[i];
        tm[i].msg_hdr.msg_iov = &ti[i];
        tm[i].msg_hdr.msg_iovlen = 1;
    }
    uint64_t received = 0, answered = 0, send_fail = 0;
    double u0, s0, u1, s1;
    cpu_seconds(&u0, &s0);
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(o->duration * 1e9);
    struct pollfd pfd = {fd, POLLIN, 0};
    while (!g_stop && now_ns() < end) {
        if (poll(&pfd, 1, 100) <= 0)
            continue;
        for (int i = 0; i < RX_BATCH; i++)
            rm[i].msg_hdr.msg_namelen = sizeof from[i];
        int rc = recvmmsg(fd, rm, RX_BATCH, MSG_DONTWAIT, NULL);
        if (rc <= 0)
            continue;
        received += (uint64_t)rc;
        if (!o->reflect)
            continue;
        int m = 0;
        for (int k = 0; k < rc; k++) {
            if (!is_binding_request(in[k], rm[k].msg_len))
                continue;
            ti[m].iov_len = build_response(out[m], in[k], &from[k]);
            tm[m].msg_hdr.msg_name = &from[k];
            tm[m].msg_hdr.msg_namelen = rm[k].msg_hdr.msg_namelen;
            m++;
        }
        int sent = m ? sendmmsg(fd, tm, (unsigned)m, 0) : 0;
        answered += sent > 0 ? (uint64_t)sent : 0;
        send_fail += (uint64_t)(m - (sent > 0 ? sent : 0));
    }
    double wall = (double)(now_ns() - t0) / 1e9;
    cpu_seconds(&u1, &s1);
    printf("{\"mode\":\"%s\",\"received\":%llu,\"answered\":%llu,\"send_fail\":%llu,"
           "\"wall_s\":%.3f,\"cpu\":{\"user_s\":%.3f,\"sys_s\":%.3f}}\n",
           o->reflect ? "reflect" : "sink", (unsigned long long)received,
           (unsigned long long)answered, (unsigned long long)send_fail, wall, u1 - u0, s1 - s0);
    fflush(stdout);
    return 0;
}

/* ---- CLI ---- */

static void usage(void) {
    fprintf(stderr,
            "usage: stun_loadgen send --host H --port P --rate PPS --duration S [--sockets N]\n"
            "         [--tick-us US] [--drain-ms MS] [--fingerprint] [--samples-per-sec N]\n"
            "         [--max-burst-ms MS] [--rcvbuf BYTES] [--gso SEGS]\n"
            "         [--src-ports P1,P2,...]\n"
            "       stun_loadgen sink --host H --port P --duration S [--reflect] [--rcvbuf B]\n");
    exit(2);
}

static void parse(int argc, char **argv, struct opts *o) {
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},      {"port", required_argument, 0, 'p'},
        {"rate", required_argument, 0, 'r'},      {"duration", required_argument, 0, 'd'},
        {"sockets", required_argument, 0, 's'},   {"tick-us", required_argument, 0, 't'},
        {"drain-ms", required_argument, 0, 'D'},  {"fingerprint", no_argument, 0, 'f'},
        {"samples-per-sec", required_argument, 0, 'S'},
        {"max-burst-ms", required_argument, 0, 'B'}, {"reflect", no_argument, 0, 'R'},
        {"rcvbuf", required_argument, 0, 'b'},    {"gso", required_argument, 0, 'g'},
        {"src-ports", required_argument, 0, 'P'},
        {0, 0, 0, 0}};
    if (argc < 2)
        usage();
    o->mode = argv[1];
    int c;
    optind = 2;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'h': o->host = optarg; break;
        case 'p': o->port = optarg; break;
        case 'r': o->rate = atof(optarg); break;
        case 'd': o->duration = atof(optarg); break;
        case 's': o->sockets = atoi(optarg); break;
        case 't': o->tick_us = atol(optarg); break;
        case 'D': o->drain_ms = atol(optarg); break;
        case 'f': o->fingerprint = 1; break;
        case 'S': o->samples_per_sec = atof(optarg); break;
        case 'B': o->max_burst_ms = atol(optarg); break;
        case 'R': o->reflect = 1; break;
        case 'b': o->rcvbuf = atoi(optarg); break;
        case 'g': o->gso = atoi(optarg); break;
        case 'P': o->src_ports = optarg; break;
        default: usage();
        }
    }
}

static void validate(const struct opts *o) {
    if (o->duration <= 0 || o->duration > 3600)
        fail("--duration must be in (0, 3600]");
    if (strcmp(o->mode, "send") != 0)
        return;
    if (o->rate <= 0 || o->rate > 20e6)
        fail("--rate must be in (0, 2e7]");
    if (o->sockets < 1 || o->sockets > MAX_SOCKETS)
        fail("--sockets must be in [1, 256]");
    if (o->tick_us < 50 || o->tick_us > 100000)
        fail("--tick-us must be in [50, 100000]");
    if (o->drain_ms < 0 || o->drain_ms > 60000)
        fail("--drain-ms must be in [0, 60000]");
    if (o->max_burst_ms < 1)
        fail("--max-burst-ms must be >= 1");
    if (o->gso < 0 || o->gso > MAX_GSO)
        fail("--gso must be in [0, 64]");
}

int main(int argc, char **argv) {
    struct opts o = {.host = "127.0.0.1", .port = "3478", .rate = 10000, .duration = 5,
                     .sockets = 16, .tick_us = 1000, .drain_ms = 500,
                     .samples_per_sec = 2000, .max_burst_ms = 10, .gso = 16,
                     .rcvbuf = 1 << 20};
    parse(argc, argv, &o);
    validate(&o);
    crc_init();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    if (strcmp(o.mode, "send") == 0)
        return run_send(&o);
    if (strcmp(o.mode, "sink") == 0)
        return run_sink(&o);
    usage();
    return 2;
}

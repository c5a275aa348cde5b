/*
 * loadgen: a TLS 1.3 line-echo load generator for the secure-echo benchmarks.
 *
 * Single-threaded, one epoll loop, non-blocking OpenSSL connections to 127.0.0.1 (or another
 * loopback address given with --host).  Three modes:
 *
 *   pingpong   N connections, K lines in flight on each, lines of L bytes (newline included).
 *              Every echo is compared byte for byte with what was sent; a mismatch counts as an
 *              error and closes that connection.  Latency is per line, from the moment the line
 *              was written to the moment its last echoed byte was read (for K=1 this is the
 *              request round trip).
 *   handshake  C connections at a time, each: connect, full TLS 1.3 handshake, one line, echo
 *              checked, close_notify, close.  With --resume the session from the latest ticket
 *              is offered on the next connection (the first one is a full handshake).
 *   idle       opens --warm-conns connections and closes them again (warms the server), then
 *              opens N connections, each echoing one line, and holds them open.
 *
 * Phases and the harness protocol (JSON lines on stdout, one object per line, flushed):
 *
 *   pingpong/handshake: [connect] -> warm-up (--warmup s) -> drain -> {"event":"ready"}
 *       -> measured window (--duration s) -> drain -> {"event":"measured"} -> close
 *       -> {"event":"result", ...}
 *   idle: warm connections -> {"event":"ready"} -> open and hold N -> {"event":"measured"}
 *       -> close all -> {"event":"result", ...}
 *
 * "Drain" stops sending new lines (or starting new connections) and waits until every echo is
 * back, so the window between "ready" and "measured" contains exactly the work that is
 * counted: a harness that samples the server's CPU time at those two lines charges the server
 * for precisely these lines.  With --sync the generator waits for a line on stdin after each of
 * "ready" and "measured" (so the harness can sample, attach strace, read RSS...) and gives up
 * after 120 s without one.  The whole run is bounded by --max-seconds.
 *
 * Build: gcc -O2 -Wall -Wextra -o loadgen loadgen.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

enum mode { MODE_PINGPONG, MODE_HANDSHAKE, MODE_IDLE };
enum phase { PH_SETUP, PH_WARMUP, PH_DRAIN1, PH_MEASURE, PH_DRAIN2, PH_DONE };
enum cstate { CS_FREE, CS_CONNECTING, CS_HANDSHAKING, CS_ACTIVE, CS_HELD };

#define MIN_LINE 32
#define MAX_LINE (1 << 20)
#define READ_BUF (64 * 1024)
#define WRITE_CHUNK (64 * 1024)
#define MAX_EVENTS 256
#define SYNC_TIMEOUT_MS 120000
#define DRAIN_TIMEOUT_NS (10ULL * 1000000000ULL)
#define SETUP_TIMEOUT_NS (60ULL * 1000000000ULL)

static struct {
    enum mode mode;
    const char *host;
    int port;
    const char *ca;
    int conns;       /* pingpong and idle: connections */
    int inflight;    /* pingpong: lines in flight per connection */
    int line_bytes;  /* bytes per line, newline included */
    int concurrency; /* handshake and idle: connections being set up at once */
    int warm_conns;  /* idle: connections opened and closed before "ready" */
    int resume;      /* handshake: offer the latest session */
    double warmup;
    double duration;
    double max_seconds;
    int sync;
    const char *ciphersuites;
    const char *groups;
} opt = {
    .mode = MODE_PINGPONG,
    .host = "127.0.0.1",
    .port = 0,
    .ca = NULL,
    .conns = 1,
    .inflight = 1,
    .line_bytes = 64,
    .concurrency = 16,
    .warm_conns = 0,
    .resume = 0,
    .warmup = 1.0,
    .duration = 5.0,
    .max_seconds = 0,
    .sync = 0,
    .ciphersuites = "TLS_AES_128_GCM_SHA256",
    .groups = "X25519",
};

typedef struct conn {
    int fd;
    SSL *ssl;
    enum cstate st;
    uint32_t events;       /* the epoll mask registered now */
    uint64_t serial;       /* distinct for every connection ever made: seeds the line content */
    uint64_t t_start;      /* when connect() was called */
    int recording;         /* handshake/idle: started inside the measured window */
    unsigned char *out;    /* bytes queued for SSL_write */
    size_t olen, ooff, ocap;
    uint64_t tx, rx;       /* lines written, lines fully echoed */
    size_t rxoff;          /* bytes of line rx already matched */
    unsigned char *expect; /* line rx as it must come back */
    uint64_t *ts;          /* send time of the lines in flight, ring of K */
} conn_t;

static struct {
    uint64_t connect_failed, handshake_failed, mismatch, unexpected_close, io_error,
        lines_lost, drain_timeout;
} err;

static SSL_CTX *ctx;
static int epfd = -1;
static conn_t *conns;
static int nslots;
static enum phase phase = PH_SETUP;
static int sending;          /* new lines / connections may be started */
static int recording;        /* completions count towards the result */
static uint64_t next_serial;
static int active;           /* connections not yet finished (handshake/idle) */
static int held;             /* idle: connections opened and held */
static int started_in_phase; /* handshake/idle: connections started in this phase */
static int target_in_phase;  /* idle: connections to start in this phase (0: no limit) */
static int *free_slots;      /* handshake/idle: stack of unused connection slots */
static int nfree;
static int established;      /* pingpong: connections with a finished handshake */
static int opened;           /* idle: connections held when the measured phase ended */
static uint64_t lines, handshakes, resumed;
static uint64_t *lat;
static size_t lat_n, lat_cap;
static SSL_SESSION *session;
static unsigned char pattern[MAX_LINE + 64];
static unsigned char rbuf[READ_BUF];
static char tls_version[32], tls_cipher[64], tls_group[64];
static uint64_t t_begin, deadline_ns;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s\n", what);
    printf("{\"event\":\"error\",\"message\":\"%s\"}\n", what);
    fflush(stdout);
    exit(2);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (q == NULL) die("out of memory");
    return q;
}

static void record_latency(uint64_t ns) {
    if (lat_n == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 65536;
        lat = xrealloc(lat, lat_cap * sizeof *lat);
    }
    lat[lat_n++] = ns;
}

/* Line `seq` of connection `serial`: a header naming both, a filler, a newline. */
static void gen_line(uint64_t serial, uint64_t seq, unsigned char *buf) {
    int len = opt.line_bytes;
    char head[40];
    int h = snprintf(head, sizeof head, "%08llx %016llx ", (unsigned long long)(serial & 0xffffffffULL),
                     (unsigned long long)seq);
    memcpy(buf, head, (size_t)h);
    memcpy(buf + h, pattern + ((seq * 7 + serial) % 26), (size_t)(len - 1 - h));
    buf[len - 1] = '\n';
}

static void set_events(conn_t *c, uint32_t events) {
    if (c->events == events) return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) != 0) die("epoll_ctl MOD failed");
    c->events = events;
}

static void release(conn_t *c, int send_close_notify) {
    if (c->ssl != NULL) {
        if (send_close_notify) SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
    }
    if (c->fd >= 0) close(c->fd);
    free(c->out);
    free(c->expect);
    free(c->ts);
    int was_held = c->st == CS_HELD;
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->st = CS_FREE;
    if (opt.mode != MODE_PINGPONG) {
        free_slots[nfree++] = (int)(c - conns);
        if (was_held) held--;
        else active--;
    }
}

static void fail_conn(conn_t *c, uint64_t *counter) {
    (*counter)++;
    if (opt.mode == MODE_PINGPONG && c->st == CS_ACTIVE) err.lines_lost += c->tx - c->rx;
    release(c, 0);
}

static void queue_line(conn_t *c) {
    size_t need = c->olen + (size_t)opt.line_bytes;
    if (need > c->ocap) {
        if (c->ooff > 0) { /* compact: SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER allows moving */
            memmove(c->out, c->out + c->ooff, c->olen - c->ooff);
            c->olen -= c->ooff;
            c->ooff = 0;
            need = c->olen + (size_t)opt.line_bytes;
        }
        if (need > c->ocap) {
            c->ocap = need * 2;
            c->out = xrealloc(c->out, c->ocap);
        }
    }
    gen_line(c->serial, c->tx, c->out + c->olen);
    c->olen += (size_t)opt.line_bytes;
    c->ts[c->tx % (uint64_t)opt.inflight] = now_ns();
    c->tx++;
}

/* Write what is queued; returns 0, or -1 if the connection failed (and was released). */
static int flush_out(conn_t *c) {
    while (c->ooff < c->olen) {
        size_t n = c->olen - c->ooff;
        if (n > WRITE_CHUNK) n = WRITE_CHUNK;
        ERR_clear_error();
        int w = SSL_write(c->ssl, c->out + c->ooff, (int)n);
        if (w > 0) {
            c->ooff += (size_t)w;
            continue;
        }
        int e = SSL_get_error(c->ssl, w);
        if (e == SSL_ERROR_WANT_WRITE) {
            set_events(c, EPOLLIN | EPOLLOUT);
            return 0;
        }
        if (e == SSL_ERROR_WANT_READ) return 0;
        fail_conn(c, &err.io_error);
        return -1;
    }
    c->ooff = c->olen = 0;
    set_events(c, EPOLLIN);
    return 0;
}

static void note_tls(SSL *ssl) {
    if (tls_version[0] != '\0') return;
    snprintf(tls_version, sizeof tls_version, "%s", SSL_get_version(ssl));
    snprintf(tls_cipher, sizeof tls_cipher, "%s", SSL_get_cipher_name(ssl));
    int nid = SSL_get_negotiated_group(ssl);
    const char *name = SSL_group_to_name(ssl, nid);
    snprintf(tls_group, sizeof tls_group, "%s", name ? name : "unknown");
}

/* handshake/idle: the one line came back. */
static void conn_done(conn_t *c) {
    uint64_t t = now_ns();
    if (opt.mode == MODE_HANDSHAKE) {
        if (c->recording) {
            handshakes++;
            if (SSL_session_reused(c->ssl)) resumed++;
            record_latency(t - c->t_start);
        }
        if (opt.resume) {
            SSL_SESSION *s = SSL_get1_session(c->ssl);
            if (s != NULL && SSL_SESSION_is_resumable(s)) {
                if (session != NULL) SSL_SESSION_free(session);
                session = s;
            } else if (s != NULL) {
                SSL_SESSION_free(s);
            }
        }
        release(c, 1);
        return;
    }
    /* idle: hold the connections of the measured phase, close the warm-up ones */
    if (c->recording) {
        handshakes++;
        record_latency(t - c->t_start);
        c->st = CS_HELD;
        held++;
        active--;
        free(c->out);
        c->out = NULL;
        c->olen = c->ooff = c->ocap = 0;
    } else {
        release(c, 1);
    }
}

/* Match echoed bytes against what was sent. Returns -1 if the connection was released. */
static int on_bytes(conn_t *c, const unsigned char *buf, size_t n) {
    while (n > 0) {
        if (c->rx >= c->tx) {
            fail_conn(c, &err.mismatch); /* bytes nobody asked for */
            return -1;
        }
        if (c->rxoff == 0) gen_line(c->serial, c->rx, c->expect);
        size_t take = (size_t)opt.line_bytes - c->rxoff;
        if (take > n) take = n;
        if (memcmp(buf, c->expect + c->rxoff, take) != 0) {
            fail_conn(c, &err.mismatch);
            return -1;
        }
        c->rxoff += take;
        buf += take;
        n -= take;
        if (c->rxoff == (size_t)opt.line_bytes) {
            c->rxoff = 0;
            uint64_t sent = c->ts[c->rx % (uint64_t)opt.inflight];
            c->rx++;
            if (opt.mode == MODE_PINGPONG) {
                if (recording) {
                    lines++;
                    record_latency(now_ns() - sent);
                }
                if (sending) queue_line(c);
            } else {
                if (n > 0) {
                    fail_conn(c, &err.mismatch);
                    return -1;
                }
                conn_done(c);
                return -1;
            }
        }
    }
    return 0;
}

/* Read until OpenSSL wants more from the socket. Returns -1 if the connection was released. */
static int read_all(conn_t *c) {
    for (;;) {
        ERR_clear_error();
        int r = SSL_read(c->ssl, rbuf, sizeof rbuf);
        if (r > 0) {
            if (on_bytes(c, rbuf, (size_t)r) != 0) return -1;
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ) return 0;
        if (e == SSL_ERROR_WANT_WRITE) {
            set_events(c, EPOLLIN | EPOLLOUT);
            return 0;
        }
        fail_conn(c, e == SSL_ERROR_ZERO_RETURN || e == SSL_ERROR_SYSCALL ? &err.unexpected_close
                                                                          : &err.io_error);
        return -1;
    }
}

static void established_conn(conn_t *c) {
    c->st = CS_ACTIVE;
    note_tls(c->ssl);
    size_t k = (size_t)opt.inflight;
    c->expect = xrealloc(NULL, (size_t)opt.line_bytes);
    c->ts = xrealloc(NULL, k * sizeof *c->ts);
    if (opt.mode == MODE_PINGPONG) {
        established++;
        if (sending)
            for (int i = 0; i < opt.inflight; i++) queue_line(c);
    } else {
        queue_line(c);
    }
    flush_out(c);
}

static void do_handshake(conn_t *c) {
    ERR_clear_error();
    int r = SSL_connect(c->ssl);
    if (r == 1) {
        established_conn(c);
        return;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        set_events(c, EPOLLIN);
    } else if (e == SSL_ERROR_WANT_WRITE) {
        set_events(c, EPOLLIN | EPOLLOUT);
    } else {
        static int reported;
        if (!reported) {
            reported = 1;
            char buf[256];
            ERR_error_string_n(ERR_peek_last_error(), buf, sizeof buf);
            fprintf(stderr, "loadgen: handshake failed: %s (ssl error %d, errno %d)\n", buf, e,
                    errno);
        }
        fail_conn(c, &err.handshake_failed);
    }
}

static void start_conn(conn_t *c) {
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->serial = next_serial++;
    c->t_start = now_ns();
    c->recording = recording;
    if (opt.mode != MODE_PINGPONG) {
        active++;
        started_in_phase++;
    }
    if (err.connect_failed + err.handshake_failed > 1000) die("more than 1000 failed connections");
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fprintf(stderr, "loadgen: socket: %s\n", strerror(errno));
        fail_conn(c, &err.connect_failed);
        return;
    }
    c->fd = fd;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
    inet_pton(AF_INET, opt.host, &sa.sin_addr);
    c->st = CS_CONNECTING;
    c->events = EPOLLOUT;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl ADD failed");
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0 && errno != EINPROGRESS) {
        static int reported;
        if (!reported) {
            reported = 1;
            fprintf(stderr, "loadgen: connect: %s\n", strerror(errno));
        }
        fail_conn(c, &err.connect_failed);
    }
}

static void begin_tls(conn_t *c) {
    int so_error = 0;
    socklen_t len = sizeof so_error;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &so_error, &len);
    if (so_error != 0) {
        static int reported;
        if (!reported) {
            reported = 1;
            fprintf(stderr, "loadgen: connect: %s\n", strerror(so_error));
        }
        fail_conn(c, &err.connect_failed);
        return;
    }
    c->ssl = SSL_new(ctx);
    if (c->ssl == NULL) die("SSL_new failed");
    SSL_set_fd(c->ssl, c->fd);
    if (opt.ca != NULL) X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), opt.host);
    if (opt.mode == MODE_HANDSHAKE && opt.resume && session != NULL) SSL_set_session(c->ssl, session);
    c->st = CS_HANDSHAKING;
    do_handshake(c);
}

static void on_event(conn_t *c, uint32_t ev) {
    switch (c->st) {
    case CS_CONNECTING:
        begin_tls(c);
        break;
    case CS_HANDSHAKING:
        do_handshake(c);
        break;
    case CS_ACTIVE:
        if ((ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) && read_all(c) != 0) return;
        if (c->st == CS_ACTIVE) flush_out(c);
        break;
    case CS_HELD:
        /* An idle connection should hear nothing; EOF means the server dropped it. */
        read_all(c);
        break;
    case CS_FREE:
        break;
    }
}

static int drained(void) {
    if (opt.mode != MODE_PINGPONG) return active == 0;
    for (int i = 0; i < nslots; i++) {
        conn_t *c = &conns[i];
        if (c->st == CS_ACTIVE && (c->tx != c->rx || c->olen != 0)) return 0;
    }
    return 1;
}

/* Wait for one line on stdin (the harness says "go"); exit if it never comes. */
static void sync_point(void) {
    if (!opt.sync) return;
    char buf[64];
    struct pollfd p = {.fd = 0, .events = POLLIN};
    int r = poll(&p, 1, SYNC_TIMEOUT_MS);
    if (r <= 0) die("no go from the harness on stdin");
    ssize_t n = read(0, buf, sizeof buf);
    if (n <= 0) die("stdin closed before go");
}

static double secs(uint64_t ns) { return (double)ns / 1e9; }

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (lat_n == 0) return 0;
    size_t i = (size_t)(p * (double)(lat_n - 1) + 0.5);
    return (double)lat[i] / 1000.0;
}

static uint64_t error_total(void) {
    return err.connect_failed + err.handshake_failed + err.mismatch + err.unexpected_close +
           err.io_error + err.lines_lost + err.drain_timeout;
}

/* handshake/idle: keep `concurrency` connections being set up while the phase wants more. */
static void refill(void) {
    if (opt.mode == MODE_PINGPONG) return;
    while (sending && active < opt.concurrency && nfree > 0 &&
           (target_in_phase == 0 || started_in_phase < target_in_phase))
        start_conn(&conns[free_slots[--nfree]]);
}

/* Run the loop until `done()` or the phase deadline; returns 1 if done() became true. */
static int run_until(int (*done)(void), uint64_t until) {
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        if (done != NULL && done()) return 1;
        uint64_t t = now_ns();
        if (t >= deadline_ns) die("--max-seconds exceeded");
        if (until != 0 && t >= until) return 0;
        uint64_t limit = until != 0 && until < deadline_ns ? until : deadline_ns;
        int timeout = (int)((limit - t) / 1000000ULL) + 1;
        if (timeout > 100) timeout = 100;
        int n = epoll_wait(epfd, evs, MAX_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait failed");
        }
        for (int i = 0; i < n; i++) on_event(evs[i].data.ptr, evs[i].events);
        refill();
    }
}

static int all_established(void) {
    int live = 0;
    for (int i = 0; i < nslots; i++) live += conns[i].st != CS_FREE;
    return established >= live;
}

static int setup_target_reached(void) {
    return active == 0 && started_in_phase >= target_in_phase;
}

/* Start the phase's connections (handshake/idle) or first lines (pingpong). */
static void kick(void) {
    if (opt.mode == MODE_PINGPONG) {
        for (int i = 0; i < nslots; i++) {
            conn_t *c = &conns[i];
            if (c->st != CS_ACTIVE) continue;
            for (int k = 0; k < opt.inflight; k++) queue_line(c);
            flush_out(c);
        }
        return;
    }
    refill();
}

static void drain(void) {
    sending = 0;
    if (!run_until(drained, now_ns() + DRAIN_TIMEOUT_NS)) {
        /* Echoes that never came back: every stuck connection is an error. */
        for (int i = 0; i < nslots; i++) {
            conn_t *c = &conns[i];
            if (c->st == CS_ACTIVE || c->st == CS_HANDSHAKING || c->st == CS_CONNECTING)
                fail_conn(c, &err.drain_timeout);
        }
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --port P [--host 127.0.0.1] [--ca ca.pem] [--mode pingpong|handshake|idle]\n"
            "  [--conns N] [--inflight K] [--line-bytes L] [--concurrency C] [--warm-conns M]\n"
            "  [--resume] [--warmup S] [--duration S] [--max-seconds S] [--sync]\n"
            "  [--ciphersuites LIST] [--groups LIST]\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},        {"port", required_argument, 0, 'p'},
        {"ca", required_argument, 0, 'a'},          {"mode", required_argument, 0, 'm'},
        {"conns", required_argument, 0, 'n'},       {"inflight", required_argument, 0, 'k'},
        {"line-bytes", required_argument, 0, 'l'},  {"concurrency", required_argument, 0, 'c'},
        {"warm-conns", required_argument, 0, 'W'},  {"resume", no_argument, 0, 'r'},
        {"warmup", required_argument, 0, 'w'},      {"duration", required_argument, 0, 'd'},
        {"max-seconds", required_argument, 0, 'x'}, {"sync", no_argument, 0, 's'},
        {"ciphersuites", required_argument, 0, 'C'}, {"groups", required_argument, 0, 'G'},
        {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'a': opt.ca = optarg; break;
        case 'm':
            if (strcmp(optarg, "pingpong") == 0) opt.mode = MODE_PINGPONG;
            else if (strcmp(optarg, "handshake") == 0) opt.mode = MODE_HANDSHAKE;
            else if (strcmp(optarg, "idle") == 0) opt.mode = MODE_IDLE;
            else usage();
            break;
        case 'n': opt.conns = atoi(optarg); break;
        case 'k': opt.inflight = atoi(optarg); break;
        case 'l': opt.line_bytes = atoi(optarg); break;
        case 'c': opt.concurrency = atoi(optarg); break;
        case 'W': opt.warm_conns = atoi(optarg); break;
        case 'r': opt.resume = 1; break;
        case 'w': opt.warmup = atof(optarg); break;
        case 'd': opt.duration = atof(optarg); break;
        case 'x': opt.max_seconds = atof(optarg); break;
        case 's': opt.sync = 1; break;
        case 'C': opt.ciphersuites = optarg; break;
        case 'G': opt.groups = optarg; break;
        default: usage();
        }
    }
    struct in_addr a;
    if (opt.port <= 0 || opt.port > 65535 || inet_pton(AF_INET, opt.host, &a) != 1) usage();
    /* loopback only: this tool is for benchmarks on this machine */
    if ((ntohl(a.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadgen: --host must be a loopback address (127.0.0.0/8)\n");
        exit(2);
    }
    if (opt.conns < 1 || opt.inflight < 1 || opt.concurrency < 1 || opt.warm_conns < 0) usage();
    if (opt.line_bytes < MIN_LINE || opt.line_bytes > MAX_LINE) usage();
    if (opt.mode != MODE_PINGPONG) opt.inflight = 1;
    if (opt.max_seconds <= 0) opt.max_seconds = opt.warmup + opt.duration + 120;
}

static SSL_CTX *make_ctx(void) {
    SSL_CTX *c = SSL_CTX_new(TLS_client_method());
    if (c == NULL) die("SSL_CTX_new failed");
    SSL_CTX_set_min_proto_version(c, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(c, TLS1_3_VERSION);
    if (SSL_CTX_set_ciphersuites(c, opt.ciphersuites) != 1) die("bad --ciphersuites");
    if (SSL_CTX_set1_groups_list(c, opt.groups) != 1) die("bad --groups");
    SSL_CTX_set_mode(c, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (opt.mode == MODE_IDLE) SSL_CTX_set_mode(c, SSL_MODE_RELEASE_BUFFERS);
    if (opt.ca != NULL) {
        if (SSL_CTX_load_verify_locations(c, opt.ca, NULL) != 1) die("cannot load --ca");
        SSL_CTX_set_verify(c, SSL_VERIFY_PEER, NULL);
    }
    if (opt.mode == MODE_HANDSHAKE && opt.resume)
        SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    else
        SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
    return c;
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    for (size_t i = 0; i < sizeof pattern; i++) pattern[i] = (unsigned char)('a' + i % 26);
    ctx = make_ctx();
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1 failed");

    switch (opt.mode) {
    case MODE_PINGPONG: nslots = opt.conns; break;
    case MODE_HANDSHAKE: nslots = opt.concurrency; break;
    case MODE_IDLE: nslots = opt.conns > opt.warm_conns ? opt.conns : opt.warm_conns; break;
    }
    conns = calloc((size_t)nslots, sizeof *conns);
    if (conns == NULL) die("out of memory");
    free_slots = calloc((size_t)nslots, sizeof *free_slots);
    if (free_slots == NULL) die("out of memory");
    for (int i = nslots - 1; i >= 0; i--) {
        conns[i].fd = -1;
        free_slots[nfree++] = i;
    }

    t_begin = now_ns();
    deadline_ns = t_begin + (uint64_t)(opt.max_seconds * 1e9);
    uint64_t w0 = 0, w1 = 0, c0 = 0, c1 = 0;

    if (opt.mode == MODE_IDLE) {
        if (opt.warm_conns > 0) {
            sending = 1;
            target_in_phase = opt.warm_conns;
            started_in_phase = 0;
            kick();
            run_until(setup_target_reached, 0);
        }
        sending = 0;
        printf("{\"event\":\"ready\",\"warm_conns\":%d}\n", opt.warm_conns);
        sync_point();
        phase = PH_MEASURE;
        recording = sending = 1;
        target_in_phase = opt.conns;
        started_in_phase = 0;
        w0 = now_ns();
        c0 = cpu_ns();
        kick();
        run_until(setup_target_reached, 0);
        w1 = now_ns();
        c1 = cpu_ns();
        recording = sending = 0;
        opened = held;
        printf("{\"event\":\"measured\",\"opened\":%d,\"wall_s\":%.6f}\n", opened, secs(w1 - w0));
        sync_point();
        for (int i = 0; i < nslots; i++)
            if (conns[i].st != CS_FREE) release(&conns[i], 1);
    } else {
        if (opt.mode == MODE_PINGPONG) {
            for (int i = 0; i < nslots; i++) start_conn(&conns[i]);
            if (!run_until(all_established, t_begin + SETUP_TIMEOUT_NS)) die("set-up timed out");
        }
        phase = PH_WARMUP;
        sending = 1;
        kick();
        run_until(NULL, now_ns() + (uint64_t)(opt.warmup * 1e9));
        phase = PH_DRAIN1;
        drain();
        printf("{\"event\":\"ready\"}\n");
        sync_point();
        phase = PH_MEASURE;
        recording = sending = 1;
        w0 = now_ns();
        c0 = cpu_ns();
        kick();
        run_until(NULL, w0 + (uint64_t)(opt.duration * 1e9));
        phase = PH_DRAIN2;
        drain();
        w1 = now_ns();
        c1 = cpu_ns();
        recording = 0;
        printf("{\"event\":\"measured\",\"lines\":%llu,\"handshakes\":%llu,\"wall_s\":%.6f}\n",
               (unsigned long long)lines, (unsigned long long)handshakes, secs(w1 - w0));
        sync_point();
        for (int i = 0; i < nslots; i++)
            if (conns[i].st != CS_FREE) release(&conns[i], 1);
    }
    phase = PH_DONE;

    qsort(lat, lat_n, sizeof *lat, cmp_u64);
    double wall = secs(w1 - w0), cpu = secs(c1 - c0);
    static const char *modes[] = {"pingpong", "handshake", "idle"};
    printf("{\"event\":\"result\",\"mode\":\"%s\",\"conns\":%d,\"inflight\":%d,\"line_bytes\":%d,"
           "\"concurrency\":%d,\"resume\":%s,\"wall_s\":%.6f,\"gen_cpu_s\":%.6f,"
           "\"gen_cpu_util\":%.4f,\"lines\":%llu,\"lines_per_s\":%.1f,\"handshakes\":%llu,"
           "\"handshakes_per_s\":%.1f,\"resumed\":%llu,\"opened\":%d,"
           "\"latency_us\":{\"n\":%zu,\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,\"max\":%.2f},"
           "\"errors\":{\"connect_failed\":%llu,\"handshake_failed\":%llu,\"mismatch\":%llu,"
           "\"unexpected_close\":%llu,\"io_error\":%llu,\"lines_lost\":%llu,"
           "\"drain_timeout\":%llu},\"error_total\":%llu,"
           "\"tls\":{\"version\":\"%s\",\"cipher\":\"%s\",\"group\":\"%s\"},"
           "\"openssl\":\"%s\"}\n",
           modes[opt.mode], opt.conns, opt.inflight, opt.line_bytes, opt.concurrency,
           opt.resume ? "true" : "false", wall, cpu, wall > 0 ? cpu / wall : 0.0,
           (unsigned long long)lines, wall > 0 ? (double)lines / wall : 0.0,
           (unsigned long long)handshakes, wall > 0 ? (double)handshakes / wall : 0.0,
           (unsigned long long)resumed, opened, lat_n, pct(0.50), pct(0.90), pct(0.99),
           lat_n ? (double)lat[lat_n - 1] / 1000.0 : 0.0,
           (unsigned long long)err.connect_failed, (unsigned long long)err.handshake_failed,
           (unsigned long long)err.mismatch, (unsigned long long)err.unexpected_close,
           (unsigned long long)err.io_error, (unsigned long long)err.lines_lost,
           (unsigned long long)err.drain_timeout, (unsigned long long)error_total(), tls_version,
           tls_cipher, tls_group, OpenSSL_version(OPENSSL_VERSION));
    if (session != NULL) SSL_SESSION_free(session);
    SSL_CTX_free(ctx);
    free(lat);
    free(conns);
    free(free_slots);
    close(epfd);
    return 0;
}

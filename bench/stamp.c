/* The benchmark's child process: records CLOCK_REALTIME in nanoseconds, so that the figures measure the
 * wrapper (consul-locker or `consul lock`), not an interpreter's start-up. Compiled by bench.py at run time.
 *
 *   stamp OUT              write the time this process started to OUT, exit 0
 *   hold READY FIFO OUT    create READY, block until someone opens FIFO for writing, write the time to OUT, exit 0
 *   term READY OUT         install a SIGTERM handler, create READY, wait; the handler writes the time to OUT and
 *                          exits 0 (so the time is that of the handler running, not of a start-up)
 *
 * Times are written as decimal nanoseconds followed by a newline, in one write(2).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int out_fd = -1;

static unsigned long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

/* async-signal-safe: no stdio */
static void write_ns(int fd, unsigned long long ns) {
    char digits[24], buf[25];
    int n = 0, len = 0;
    do {
        digits[n++] = (char)('0' + ns % 10);
        ns /= 10;
    } while (ns);
    while (n) buf[len++] = digits[--n];
    buf[len++] = '\n';
    if (write(fd, buf, len) != len) _exit(112);
}

static int open_out(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror(path);
        exit(111);
    }
    return fd;
}

static void on_term(int sig) {
    (void)sig;
    write_ns(out_fd, now_ns());
    _exit(0);
}

int main(int argc, char **argv) {
    unsigned long long started = now_ns();
    if (argc == 3 && strcmp(argv[1], "stamp") == 0) {
        write_ns(open_out(argv[2]), started);
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "hold") == 0) {
        out_fd = open_out(argv[4]);
        close(open_out(argv[2]));
        int fifo = open(argv[3], O_RDONLY | O_CLOEXEC); /* blocks until the benchmark opens it for writing */
        if (fifo < 0) {
            perror(argv[3]);
            return 111;
        }
        write_ns(out_fd, now_ns());
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "term") == 0) {
        out_fd = open_out(argv[3]);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_term;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGTERM, &sa, NULL) != 0) {
            perror("sigaction");
            return 111;
        }
        close(open_out(argv[2]));
        for (;;) pause();
    }
    fprintf(stderr, "usage: %s stamp OUT | hold READY FIFO OUT | term READY OUT\n", argv[0]);
    return 2;
}

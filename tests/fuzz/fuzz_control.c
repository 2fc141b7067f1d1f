/* fuzz_control: libFuzzer harness for the JSON control channel (DESIGN §11),
 * from the client side. The daemon's line handler (daemon/control.c,
 * moe_control_on_line) needs a running server and libuv loop; the parser
 * reachable without one is moed's control client (protocol/control_client.c):
 * line framing, buffer growth and compaction, JSON parsing, and the sorting
 * of replies, stale replies and pushed events. Its line reader is static, so
 * the harness goes through the public API over a real socket: a listener on
 * a Unix socket in a temp directory plays the server, writes the fuzz input
 * as everything the server ever says, then shuts its write side down so the
 * client ends on EOF instead of a timeout.
 *
 * The first byte picks the path: even = moe_control_call("health") (the
 * reply with id 1 is wanted, events are queued, other ids dropped), then
 * drain events; odd = drain events with moe_control_read_event only.
 * Invariants (abort on violation): results are JSON objects, events carry
 * an "event" key, an OK call's reply has id 1 or none, errors come with a
 * message, and every path frees what it made (LSan).
 *
 * Built and run by `make fuzz` (not part of `make test`). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "../../protocol/moe_control_client.h"

#define FUZZ_TIMEOUT_MS 200
#define FUZZ_MAX_EVENTS 4096

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int listen_fd = -1;
static char dir_path[64] = "/tmp/moe-fuzz-control-XXXXXX";
static char sock_path[128];
static char address[160];

static void cleanup(void) {
    if (listen_fd >= 0) close(listen_fd);
    unlink(sock_path);
    rmdir(dir_path);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    if (mkdtemp(dir_path) == NULL) {
        perror("mkdtemp");
        abort();
    }
    snprintf(sock_path, sizeof sock_path, "%s/control.sock", dir_path);
    snprintf(address, sizeof address, "unix:%s", sock_path);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock_path);
    listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&sa, sizeof sa) != 0 ||
        listen(listen_fd, 4) != 0) {
        perror("control listener");
        abort();
    }
    atexit(cleanup);
    return 0;
}

static void check_error(moe_err_t ret, const char *msg) {
    if (ret == MOE_OK) abort();
    if (msg[0] == '\0') abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int mode = data[0] & 1;
    data++, size--;

    moe_control_client_t *cc = NULL;
    char msg[256] = "";
    if (moe_control_connect(address, &cc, msg, sizeof msg) != MOE_OK) {
        fprintf(stderr, "connect: %s\n", msg);
        abort();
    }
    int server_fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (server_fd < 0) {
        perror("accept");
        abort();
    }
    /* Write what fits in the socket buffer without blocking; libFuzzer's
     * -max_len keeps inputs well below it. */
    fcntl(server_fd, F_SETFL, O_NONBLOCK);
    size_t off = 0;
    while (off < size) {
        ssize_t w = send(server_fd, data + off, size - off, MSG_NOSIGNAL);
        if (w <= 0) break;
        off += (size_t)w;
    }
    shutdown(server_fd, SHUT_WR);

    if (mode == 0) {
        cJSON *reply = NULL;
        msg[0] = '\0';
        moe_err_t ret =
            moe_control_call(cc, "health", NULL, "token", &reply, FUZZ_TIMEOUT_MS, msg, sizeof msg);
        if (ret == MOE_OK) {
            if (!cJSON_IsObject(reply)) abort();
            const cJSON *id = cJSON_GetObjectItemCaseSensitive(reply, "id");
            if (id != NULL && !cJSON_IsNull(id) && !(cJSON_IsNumber(id) && id->valueint == 1))
                abort();
            if (cJSON_GetObjectItemCaseSensitive(reply, "event") != NULL) abort();
        } else {
            if (reply != NULL) abort();
            check_error(ret, msg);
        }
        cJSON_Delete(reply);
    }
    for (int i = 0; i < FUZZ_MAX_EVENTS; i++) {
        cJSON *event = NULL;
        msg[0] = '\0';
        moe_err_t ret = moe_control_read_event(cc, &event, FUZZ_TIMEOUT_MS, msg, sizeof msg);
        if (ret != MOE_OK) {
            if (event != NULL) abort();
            check_error(ret, msg);
            if (ret == MOE_ERR_FORMAT) continue; /* that line is consumed: read on */
            break;
        }
        if (!cJSON_IsObject(event) || cJSON_GetObjectItemCaseSensitive(event, "event") == NULL)
            abort();
        cJSON_Delete(event);
    }
    moe_control_close(cc);
    close(server_fd);
    return 0;
}

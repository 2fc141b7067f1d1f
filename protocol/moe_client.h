/* moe_client (libmoeclient): the C client of the data plane (PROTOCOL.md).
 * Owns one socket to one rank, frames requests with moe_frame, and reads
 * responses through a moe_frame_parser_t so that no header length from the
 * server is trusted beyond a generous limit. Blocking calls (forward, ping)
 * and pipelined ones (send/recv) can be mixed: a blocking call buffers the
 * responses to other ids it meets, and recv returns those first.
 * A client is used by one thread at a time. Used by moectl, tests and
 * anyone embedding moed's data plane in C. */
#ifndef MOE_CLIENT_H
#define MOE_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "../config/moe_err.h"
#include "moe_frame.h"

typedef struct moe_client moe_client_t;

/* Frames larger than this from the server are a protocol error. */
#define MOE_CLIENT_MAX_FRAME_BYTES (1ull << 30)

/* Ids at and above this are chosen by the blocking calls; pipelined callers
 * should use smaller ones so the two never collide. */
#define MOE_CLIENT_AUTO_ID_BASE (1ull << 63)

/* One response. For RESULT `out` holds n_tokens*hidden floats (converted
 * from the response dtype); for ERROR `error_text` holds the server's text
 * (NUL-terminated) and `status` its code; for PONG `payload` holds the echoed
 * bytes. Owned by the caller: release with moe_client_response_free. */
typedef struct {
    uint16_t type; /* MOE_FRAME_RESULT, _ERROR or _PONG */
    uint64_t request_id;
    uint32_t layer;
    uint32_t n_tokens;
    uint32_t hidden;
    uint8_t dtype;
    uint32_t status;
    float *out;
    char *error_text;
    uint8_t *payload;
    size_t payload_len;
} moe_client_response_t;

/* Connects to rank `rank` of a data address: "HOST:PORT" (port PORT+rank;
 * HOST an IPv4/IPv6 literal, "[v6]" or a name) or "unix:PATH" (every "%r"
 * in PATH replaced by rank). Returns MOE_OK and *out, or MOE_ERR_INVAL (bad
 * address) / MOE_ERR_IO (cannot connect) with the reason in msg. */
moe_err_t moe_client_connect(const char *address, int rank, moe_client_t **out, char *msg,
                             size_t msg_size);
/* Closes the socket and frees the client and any buffered responses. NULL ok. */
void moe_client_close(moe_client_t *c);
/* The socket, for poll() by callers that multiplex. */
int moe_client_fd(const moe_client_t *c);

/* One blocking forward: sends x [n_tokens, hidden] as dtype (and, when
 * routed_ids is not NULL, top_k ids and weights per token with the ROUTED
 * flag), waits for its response and writes it as float32 into out.
 * Returns MOE_OK with *status = 0; MOE_ERR_INVAL with *status = the server's
 * code and msg "server: <name>: <text>" for an ERROR frame (the connection
 * stays usable unless the code is bad_frame); MOE_ERR_INVAL with *status = 0
 * for bad arguments; MOE_ERR_IO for transport or protocol failures. */
moe_err_t moe_client_forward(moe_client_t *c, uint32_t layer, const float *x, uint32_t n_tokens,
                             uint32_t hidden, uint8_t dtype, const int32_t *routed_ids,
                             const float *routed_weights, uint16_t top_k, float *out,
                             uint32_t *status, char *msg, size_t msg_size);

/* Pipelining: queues one FORWARD with the caller's request_id and returns
 * once it is written (responses that arrive meanwhile are buffered, so a
 * deep pipeline cannot deadlock). MOE_ERR_INVAL for bad arguments,
 * MOE_ERR_IO on transport failure. */
moe_err_t moe_client_send(moe_client_t *c, uint64_t request_id, uint32_t layer, const float *x,
                          uint32_t n_tokens, uint32_t hidden, uint8_t dtype, const int32_t *ids,
                          const float *weights, uint16_t top_k, char *msg, size_t msg_size);

/* The next response (buffered ones first, in arrival order) into *resp.
 * timeout_ms < 0 waits forever. Returns MOE_OK (ERROR frames included: check
 * resp->type), MOE_ERR_NOT_FOUND when nothing arrived in time (the client
 * stays usable), MOE_ERR_IO on transport or protocol failure. */
moe_err_t moe_client_recv(moe_client_t *c, moe_client_response_t *resp, int timeout_ms, char *msg,
                          size_t msg_size);
/* Frees what a response owns and zeroes it. */
void moe_client_response_free(moe_client_response_t *resp);

/* Sends PING and waits for its PONG (other responses are buffered).
 * MOE_OK, MOE_ERR_NOT_FOUND on timeout, MOE_ERR_IO on failure. */
moe_err_t moe_client_ping(moe_client_t *c, int timeout_ms, char *msg, size_t msg_size);

/* Writes bytes as they are (tests use it for malformed frames). */
moe_err_t moe_client_send_raw(moe_client_t *c, const void *bytes, size_t len, char *msg,
                              size_t msg_size);

/* Resolves a data or control address into a connected, blocking socket
 * (rank offset and %r as in moe_client_connect; rank < 0: none). Shared by
 * the control client. Returns MOE_OK and *fd_out. */
moe_err_t moe_client_dial(const char *address, int rank, int *fd_out, char *msg, size_t msg_size);

#endif

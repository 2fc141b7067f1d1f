/* moe_control_client: the client side of the JSON control channel
 * (PROTOCOL.md, "Control channel"). Owns one connection to rank 0: sends a
 * request as one JSON line, reads newline-delimited replies, and keeps pushed
 * `event` lines (after `subscribe`) aside for moe_control_read_event. Used by
 * moectl and the tests. One thread at a time per connection. */
#ifndef MOE_CONTROL_CLIENT_H
#define MOE_CONTROL_CLIENT_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "../config/moe_err.h"

typedef struct moe_control_client moe_control_client_t;

/* Longest line accepted from the server (stats of big models are long). */
#define MOE_CONTROL_MAX_LINE (64u << 20)

/* Connects to a control address: "unix:PATH" or "HOST:PORT" (no rank
 * offset). MOE_OK and *out, or MOE_ERR_INVAL / MOE_ERR_IO with msg. */
moe_err_t moe_control_connect(const char *address, moe_control_client_t **out, char *msg,
                              size_t msg_size);
void moe_control_close(moe_control_client_t *cc);

/* Sends {"id":N,"cmd":cmd,...args,"token":token} and waits up to timeout_ms
 * (< 0: forever) for the reply with that id. args (an object, may be NULL)
 * is consumed. *result_out receives the whole reply object ({"id","ok",
 * "result"|"error"}), owned by the caller (cJSON_Delete). Returns MOE_OK
 * whenever a reply arrived, ok:false included; MOE_ERR_IO on transport
 * failure, MOE_ERR_NOT_FOUND on timeout, MOE_ERR_FORMAT for a line that is
 * not JSON. */
moe_err_t moe_control_call(moe_control_client_t *cc, const char *cmd, cJSON *args,
                           const char *token, cJSON **result_out, int timeout_ms, char *msg,
                           size_t msg_size);

/* The next pushed event ({"event":...,"result":...}), owned by the caller.
 * MOE_ERR_NOT_FOUND when none arrived within timeout_ms (< 0: forever). */
moe_err_t moe_control_read_event(moe_control_client_t *cc, cJSON **event, int timeout_ms,
                                 char *msg, size_t msg_size);

/* Reads a token file (first line, trailing whitespace stripped) into buf.
 * MOE_OK, or MOE_ERR_IO / MOE_ERR_RANGE with msg. */
moe_err_t moe_control_read_token(const char *path, char *buf, size_t buf_size, char *msg,
                                 size_t msg_size);

#endif

/* moe_task: one function run on a background thread, polled without
 * blocking and joined when its result is needed — the EPLB weight loads
 * of both backends, which must not hold up the step loop (DESIGN §6). */
#ifndef MOE_TASK_H
#define MOE_TASK_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

#include "../config/moe_err.h"

typedef moe_err_t (*moe_task_fn)(void *arg, char *msg, size_t msg_size);

typedef struct {
    pthread_t thread;
    bool started;
    int state; /* MOE_TASK_RUNNING, _DONE or _FAILED; read and written atomically */
    moe_err_t result;
    moe_task_fn fn;
    void *arg;
    char msg[512];
} moe_task_t;

enum { MOE_TASK_RUNNING = 0, MOE_TASK_DONE = 1, MOE_TASK_FAILED = -1 };

#ifdef __cplusplus
extern "C" {
#endif
/* Starts fn(arg) on a new thread. */
moe_err_t moe_task_start(moe_task_t *task, moe_task_fn fn, void *arg, char *msg, size_t msg_size);
/* MOE_TASK_RUNNING, MOE_TASK_DONE or MOE_TASK_FAILED, without waiting. */
int moe_task_poll(moe_task_t *task);
/* Waits for the thread; returns fn's result (its message in msg). */
moe_err_t moe_task_join(moe_task_t *task, char *msg, size_t msg_size);
#ifdef __cplusplus
}
#endif

#endif

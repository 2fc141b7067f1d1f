/* moe_task: see moe_task.h. */
#include "moe_task.h"

#include <stdio.h>
#include <string.h>

static void *run(void *arg) {
    moe_task_t *task = arg;
    task->result = task->fn(task->arg, task->msg, sizeof task->msg);
    __atomic_store_n(&task->state, task->result == MOE_OK ? MOE_TASK_DONE : MOE_TASK_FAILED, __ATOMIC_RELEASE);
    return NULL;
}

moe_err_t moe_task_start(moe_task_t *task, moe_task_fn fn, void *arg, char *msg, size_t msg_size) {
    memset(task, 0, sizeof *task);
    task->fn = fn;
    task->arg = arg;
    __atomic_store_n(&task->state, MOE_TASK_RUNNING, __ATOMIC_RELEASE);
    int rc = pthread_create(&task->thread, NULL, run, task);
    if (rc != 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "cannot start a background thread: %s", strerror(rc));
    task->started = true;
    return MOE_OK;
}

int moe_task_poll(moe_task_t *task) { return __atomic_load_n(&task->state, __ATOMIC_ACQUIRE); }

moe_err_t moe_task_join(moe_task_t *task, char *msg, size_t msg_size) {
    if (!task->started) return moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "no background task to wait for");
    pthread_join(task->thread, NULL);
    task->started = false;
    if (task->result != MOE_OK) snprintf(msg, msg_size, "%s", task->msg);
    return task->result;
}

/* queue: the two hand-offs between the I/O thread and the compute thread
 * (see moe_daemon.h), and the request's lifetime helpers. */
#include <errno.h>
#include <stdlib.h>
#include <time.h>

#include "moe_daemon.h"

double moe_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void moe_request_free(moe_request_t *request) {
    if (request == NULL) return;
    free(request->x);
    free(request->routed_ids);
    free(request->routed_weights);
    free(request);
}

void moe_queue_init(moe_request_queue_t *queue) {
    pthread_mutex_init(&queue->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&queue->cond, &attr);
    pthread_condattr_destroy(&attr);
    queue->head = queue->tail = NULL;
    queue->closed = false;
}

void moe_queue_destroy(moe_request_queue_t *queue) {
    while (queue->head != NULL) {
        moe_request_t *next = queue->head->next;
        moe_request_free(queue->head);
        queue->head = next;
    }
    pthread_mutex_destroy(&queue->lock);
    pthread_cond_destroy(&queue->cond);
}

bool moe_queue_push(moe_request_queue_t *queue, moe_request_t *request) {
    request->next = NULL;
    pthread_mutex_lock(&queue->lock);
    bool open = !queue->closed;
    if (open) {
        if (queue->tail != NULL) queue->tail->next = request;
        else queue->head = request;
        queue->tail = request;
        pthread_cond_signal(&queue->cond);
    }
    pthread_mutex_unlock(&queue->lock);
    return open;
}

void moe_queue_close(moe_request_queue_t *queue) {
    pthread_mutex_lock(&queue->lock);
    queue->closed = true;
    pthread_mutex_unlock(&queue->lock);
}

/* Waits (lock held) until the queue is non-empty or timeout_us passed. */
static void wait_locked(moe_request_queue_t *queue, long timeout_us) {
    if (queue->head == NULL && timeout_us > 0) {
        struct timespec deadline;
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_nsec += (timeout_us % 1000000) * 1000;
        deadline.tv_sec += timeout_us / 1000000 + deadline.tv_nsec / 1000000000;
        deadline.tv_nsec %= 1000000000;
        while (queue->head == NULL)
            if (pthread_cond_timedwait(&queue->cond, &queue->lock, &deadline) == ETIMEDOUT) break;
    }
}

bool moe_queue_wait(moe_request_queue_t *queue, long timeout_us) {
    pthread_mutex_lock(&queue->lock);
    wait_locked(queue, timeout_us);
    bool ready = queue->head != NULL;
    pthread_mutex_unlock(&queue->lock);
    return ready;
}

moe_request_t *moe_queue_take_all(moe_request_queue_t *queue, long timeout_us) {
    pthread_mutex_lock(&queue->lock);
    wait_locked(queue, timeout_us);
    moe_request_t *list = queue->head;
    queue->head = queue->tail = NULL;
    pthread_mutex_unlock(&queue->lock);
    return list;
}

void moe_daemon_post(moe_daemon_t *daemon, moe_event_t *event) {
    event->next = NULL;
    pthread_mutex_lock(&daemon->outbound_lock);
    if (daemon->outbound_tail != NULL) daemon->outbound_tail->next = event;
    else daemon->outbound_head = event;
    daemon->outbound_tail = event;
    pthread_mutex_unlock(&daemon->outbound_lock);
    uv_async_send(&daemon->outbound_async);
}

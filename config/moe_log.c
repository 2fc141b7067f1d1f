/* moe_log: see moe_log.h. */
#include "moe_log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

int moe_log_threshold = MOE_LOG_INFO;
static int log_rank = -1;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void moe_log_set_rank(int rank) { log_rank = rank; }

moe_log_level_t moe_log_set_level(moe_log_level_t level) {
    moe_log_level_t old = (moe_log_level_t)moe_log_threshold;
    moe_log_threshold = (int)level;
    return old;
}

int moe_log_parse_level(const char *name, moe_log_level_t *out) {
    for (int i = 0; i < 4; i++) {
        if (strcmp(name, level_names[i]) == 0) {
            *out = (moe_log_level_t)i;
            return 0;
        }
    }
    return -1;
}

void moe_log_write(moe_log_level_t level, const char *subsystem, const char *fmt, ...) {
    char line[2048];
    struct timespec now;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    int len = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ r%d %-5s %s: ",
                       tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                       tm.tm_sec, now.tv_nsec / 1000000, log_rank,
                       level_names[level < 0 || level > 3 ? 1 : level], subsystem);
    if (len < 0) return;
    va_list ap;
    va_start(ap, fmt);
    int body = vsnprintf(line + len, sizeof line - (size_t)len - 1, fmt, ap);
    va_end(ap);
    if (body < 0) return;
    size_t total = (size_t)len + (size_t)body;
    if (total > sizeof line - 2) total = sizeof line - 2;
    line[total++] = '\n';
    fwrite(line, 1, total, stderr);
}

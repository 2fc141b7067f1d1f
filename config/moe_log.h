/* moe_log: one-line log records "time rank level subsystem: message" on
 * stderr (STYLE 11). The level is checked before formatting. Thread-safe:
 * each record is written with a single fwrite. Any module may call it. */
#ifndef MOE_LOG_H
#define MOE_LOG_H

typedef enum { MOE_LOG_DEBUG = 0, MOE_LOG_INFO, MOE_LOG_WARN, MOE_LOG_ERROR } moe_log_level_t;

extern int moe_log_threshold; /* records below this level are dropped */

/* Sets the rank printed in every record (-1 before MPI is up). */
void moe_log_set_rank(int rank);
/* Sets the threshold; returns the previous one. */
moe_log_level_t moe_log_set_level(moe_log_level_t level);
/* Parses "debug|info|warn|error"; returns 0 on success, -1 otherwise. */
int moe_log_parse_level(const char *name, moe_log_level_t *out);

void moe_log_write(moe_log_level_t level, const char *subsystem, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define moe_log(level, subsystem, ...)                                     \
    do {                                                                   \
        if ((int)(level) >= moe_log_threshold) moe_log_write((level), (subsystem), __VA_ARGS__); \
    } while (0)

#endif

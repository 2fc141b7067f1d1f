/* moectl: internals shared by the CLI's files — moectl.c (options, control
 * commands, stats, watch), moectl_data.c (forward, bench) and moectl_npy.c
 * (.npy files). Not a library: nothing here is linked into libmoe. */
#ifndef MOECTL_H
#define MOECTL_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

/* Exit statuses: the command worked / the server said no / we could not ask. */
#define MOECTL_EXIT_OK 0
#define MOECTL_EXIT_FAILED 1
#define MOECTL_EXIT_USAGE 2

typedef struct {
    char control[256];
    char data[256];
    int rank;
    char token[512];
} moectl_opts_t;

/* One command-line option of a subcommand: "--name VALUE" or a flag. */
typedef struct {
    const char *name;
    int takes_value;
    const char **value; /* set to the value, or to "1" for a flag */
} moectl_arg_t;

/* Parses argv against the table; returns 0, or prints the problem and
 * returns -1. */
int moectl_parse_args(int argc, char **argv, const moectl_arg_t *table, const char *command);
/* Parses a decimal integer option in [min, max]; -1 with a message if bad. */
int moectl_int(const char *text, const char *name, long min, long max, long *out);

/* One control call; prints connection errors. Returns the whole reply (the
 * caller frees) or NULL. args is consumed. */
cJSON *moectl_control_call(const moectl_opts_t *opts, const char *cmd, cJSON *args);
/* model.hidden from the control channel's `config`, or 0 when unreachable. */
int moectl_hidden_from_control(const moectl_opts_t *opts);
/* Parses "f32|bf16|f16" into a wire dtype; 0 when unknown. */
uint8_t moectl_dtype(const char *name);
double moectl_now_ms(void);

int moectl_cmd_forward(const moectl_opts_t *opts, int argc, char **argv);
int moectl_cmd_bench(const moectl_opts_t *opts, int argc, char **argv);

/* .npy (format 1.0/2.0/3.0, C order, 2-D, little-endian <f4 or <f2). Both
 * return 0 or -1 with the reason in msg. *data is malloc'd float32. */
int moectl_npy_read(const char *path, float **data, uint32_t *rows, uint32_t *cols, char *msg,
                    size_t msg_size);
int moectl_npy_write(const char *path, const float *data, uint32_t rows, uint32_t cols, char *msg,
                     size_t msg_size);

#endif

/* config_fields: the one table of moed's config fields (STYLE 6, DESIGN §7).
 *
 * Owns: one row per field (dotted YAML path, type, offset into moe_config_t,
 * default as YAML text, bounds, reloadable flag, help) and the typed
 * operations on a field: set from text or a list, compare, dump to JSON.
 * The YAML loader, the defaults, the JSON dump, the reload diff and the
 * README reference are all driven by this table, so a new field is one row.
 * The index of a row is its bit in moe_config_t.set_mask.
 * Internal to config/: other modules use moe_config.h. */
#ifndef MOE_CONFIG_FIELDS_H
#define MOE_CONFIG_FIELDS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "moe_config.h"

typedef enum {
    MOE_FIELD_INT,      /* int */
    MOE_FIELD_INT64,    /* int64_t */
    MOE_FIELD_UINT64,   /* uint64_t, no bounds (seeds) */
    MOE_FIELD_DOUBLE,   /* double */
    MOE_FIELD_BOOL,     /* bool */
    MOE_FIELD_STRING,   /* char[capacity] */
    MOE_FIELD_ENUM,     /* an enum stored as int, named by names[] */
    MOE_FIELD_INT_LIST, /* int[capacity] with an int count at count_offset */
    MOE_FIELD_LAYERS,   /* model.layers: an int N (ids 0..N-1) or a list of ids */
} moe_field_type_t;

typedef struct {
    const char *path;
    moe_field_type_t type;
    size_t offset;       /* of the value; of the array for lists */
    size_t size;         /* sizeof the member (checked against type by the tests) */
    size_t capacity;     /* strings: buffer bytes; lists: max entries */
    size_t count_offset; /* lists: offset of the int count */
    const char *const *names; /* enums: NULL-terminated value names */
    const char *def;     /* default, as the YAML text that sets it */
    double min, max;     /* numbers: inclusive bounds; lists: bounds of an entry */
    bool reloadable;     /* may change on reload (DESIGN §7) */
    const char *help;
} moe_config_field_t;

extern const moe_config_field_t moe_config_fields[];
extern const int moe_config_field_count;

/* Index of the field with this dotted path, or -1. */
int moe_config_field_index(const char *path);

/* Sets field idx from one YAML scalar. quoted: the scalar was quoted, so it
 * is a string (a quoted "8" is not an int). Returns true, or false with the
 * reason (without the path) in msg. */
bool moe_config_field_set_scalar(int idx, moe_config_t *cfg, const char *text, bool quoted,
                                 char *msg, size_t size);

/* Sets list field idx from values already parsed as integers within the
 * row's entry bounds. Returns true, or false with the reason in msg. */
bool moe_config_field_set_list(int idx, moe_config_t *cfg, const int64_t *values, int count,
                               char *msg, size_t size);

/* Parses a YAML integer scalar within [min, max]; false with msg on failure. */
bool moe_config_parse_int(const char *text, bool quoted, double min, double max, int64_t *out,
                          char *msg, size_t size);

/* True when field idx holds the same value in a and b. */
bool moe_config_field_equal(int idx, const moe_config_t *a, const moe_config_t *b);

/* Field idx's value of cfg as a new cJSON item (NULL on allocation failure). */
cJSON *moe_config_field_to_json(int idx, const moe_config_t *cfg);

/* Short type name for docs ("int", "enum", "list of int"...). */
const char *moe_config_field_type_name(const moe_config_field_t *field);

/* Writes the bounds of a field as text for docs and messages. */
void moe_config_field_bounds_text(const moe_config_field_t *field, char *buf, size_t size);

/* Appends one printf-formatted message to errs (NULL: dropped). Past
 * MOE_CONFIG_MAX_ERRORS - 1 messages the last slot says the rest were cut,
 * so a caller can always tell a complete list from a truncated one. */
void moe_config_errors_add(moe_config_errors_t *errs, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Names of the enum-valued fields' values ("debug", ...), NULL-terminated. */
extern const char *const moe_log_level_names[];

#endif

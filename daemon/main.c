/* moed: the MoE serving daemon's entry point.
 *   moed --check-config FILE        validate; print the effective config as JSON
 *   moed --print-config-reference   the README's table of every config field
 *   moed --version
 * Serving (`moed --config FILE` under mpirun) is the daemon of DESIGN §2-3. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "../config/moe_config.h"

#define MOED_VERSION "0.1.0"

static void usage(FILE *out) {
    fprintf(out,
            "usage: moed --check-config FILE | --print-config-reference | --version\n"
            "  --check-config FILE        validate FILE; print the effective config as JSON and\n"
            "                             exit 0, or print every error and exit 1\n"
            "  --print-config-reference   print the table of config fields (Markdown)\n"
            "  --version                  print the version\n");
}

static int check_config(const char *path) {
    moe_config_t cfg;
    moe_config_errors_t errs;
    if (moe_config_load(path, &cfg, &errs) != MOE_OK) {
        for (int i = 0; i < errs.count; i++) fprintf(stderr, "%s\n", errs.messages[i]);
        fprintf(stderr, "moed: %s: %d error%s\n", path, errs.count, errs.count == 1 ? "" : "s");
        return 1;
    }
    char *json = moe_config_to_json(&cfg);
    if (json == NULL) {
        fprintf(stderr, "moed: out of memory\n");
        return 1;
    }
    printf("%s\n", json);
    free(json);
    return 0;
}

int main(int argc, char **argv) {
    static const struct option options[] = {
        {"check-config", required_argument, NULL, 'k'},
        {"print-config-reference", no_argument, NULL, 'r'},
        {"version", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        switch (opt) {
        case 'k': return check_config(optarg);
        case 'r': moe_config_print_reference(stdout); return 0;
        case 'v': printf("moed %s\n", MOED_VERSION); return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    usage(stderr);
    return 2;
}

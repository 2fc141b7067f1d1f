# moed — one entry point (DESIGN §1, STYLE 13).
#   make            build everything this machine can into build/
#   make test       unit tests (Criterion) + 2-rank MPI tests
#   make asan       AddressSanitizer + UBSan build running the same tests
#   make install PREFIX=/usr/local
#   make deps       install the Debian packages the build needs
#   CUDA=0|1 (default: 1 when nvcc is found), DEBUG=1, CUDA_ARCH=...

PREFIX ?= /usr/local
BUILD  ?= build
CC     ?= gcc
ifeq ($(CC),cc)
CC := gcc
endif

NVCC ?= $(shell command -v nvcc 2>/dev/null || (test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc))
ifeq ($(NVCC),)
CUDA ?= 0
else
CUDA ?= 1
endif
CUDA_ARCH ?= -gencode=arch=compute_90,code=sm_90
# cuda_wgmma.cu and cuda_wgmma_ws.cu hold Hopper-only instructions (wgmma,
# setmaxnreg): they alone are built
# for sm_90a, and on other GPUs their kernels have no image (the engine then
# uses the other GEMMs).
WGMMA_ARCH ?= -gencode=arch=compute_90a,code=sm_90a

MPI_CFLAGS := $(shell mpicc --showme:compile 2>/dev/null)
MPI_LIBS   := $(shell mpicc --showme:link 2>/dev/null)

# The CUDA backend (kernels/cuda/*.cu): cudart static, cuBLAS and NCCL
# shared, found through an rpath to the toolkit (make dist rewrites it).
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
ifeq ($(CUDA),1)
CUDA_SRC   := $(wildcard kernels/cuda/*.cu)
CUDA_OBJ   := $(CUDA_SRC:%.cu=$(BUILD)/obj/%.o)
CUDA_LIBS  := -L$(CUDA_HOME)/lib64 -L$(CUDA_HOME)/lib -lcublas -lnccl -lcudart_static -lstdc++ -ldl -lrt \
              -Wl,-rpath,$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib
CUDA_DEFS  := -DMOE_WITH_CUDA
NVCCFLAGS  ?= -std=c++17 -O2 -g $(CUDA_ARCH) -Xcompiler -Wall,-Wextra,-Werror,-fPIC $(MPI_CFLAGS) -MMD -MP
endif

OPT      := $(if $(DEBUG),-O0 -g,-O2 -g)
CFLAGS   += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror $(OPT) -fopenmp -MMD -MP $(MPI_CFLAGS) $(SAN) $(CUDA_DEFS)
LDFLAGS  += -fopenmp $(SAN)
LDLIBS   += -luv -lyaml -lcjson $(MPI_LIBS) $(CUDA_LIBS) -lm -lpthread

LIB_SRC  := $(wildcard config/*.c) $(wildcard kernels/*.c) $(wildcard kernels/cpu/*.c) \
            $(filter-out protocol/moectl%,$(wildcard protocol/*.c)) \
            $(filter-out daemon/main.c,$(wildcard daemon/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/obj/%.o) $(CUDA_OBJ)
LIB      := $(BUILD)/libmoe.a

DAEMON_OBJ := $(BUILD)/obj/daemon/main.o

BINS := $(BUILD)/bin/moed $(BUILD)/bin/moe-bench $(if $(wildcard protocol/moectl.c),$(BUILD)/bin/moectl)

TEST_SUPPORT_SRC := $(wildcard tests/support/*.c)
TEST_SUPPORT_OBJ := $(TEST_SUPPORT_SRC:%.c=$(BUILD)/obj/%.o)
UNIT_SRC  := $(wildcard tests/test_*.c)
UNIT_BINS := $(UNIT_SRC:tests/%.c=$(BUILD)/tests/%)
MPI_SRC   := $(wildcard tests/mpi_*.c)
MPI_BINS  := $(MPI_SRC:tests/%.c=$(BUILD)/tests/%)
# GPU checks (scripts/gpu-test.sh runs them on a GPU host; not part of make test)
GPU_BINS  := $(if $(filter 1,$(CUDA)),$(patsubst tests/%.c,$(BUILD)/tests/%,$(wildcard tests/cuda_*.c)))

.PHONY: all test asan install deps clean demo dist fuzz
all: $(BINS) $(UNIT_BINS) $(MPI_BINS) $(GPU_BINS)

# V=1 shows the whole command lines.
Q := $(if $(V),,@)

# Objects depend on the flags they were built with: switching CUDA=0/1,
# DEBUG or SAN in the same build folder rebuilds what they change.
FLAGS_STAMP := $(BUILD)/.flags
FLAGS_NOW := $(CC) $(CFLAGS) | $(NVCC) $(NVCCFLAGS) $(WGMMA_ARCH) | $(CUDA)
$(shell mkdir -p $(BUILD) && (test -f $(FLAGS_STAMP) && [ "$$(cat $(FLAGS_STAMP))" = '$(FLAGS_NOW)' ] || printf '%s' '$(FLAGS_NOW)' > $(FLAGS_STAMP)))

$(BUILD)/obj/%.o: %.c $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/%.o: %.cu $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  NVCC    $<")
	$(Q)$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(BUILD)/obj/kernels/cuda/cuda_wgmma.o $(BUILD)/obj/kernels/cuda/cuda_wgmma_ws.o: override CUDA_ARCH = $(WGMMA_ARCH)

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/bin/moed: $(DAEMON_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/bin/moe-bench: $(BUILD)/obj/bench/moe_bench.o $(BUILD)/obj/bench/bench_eplb.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

MOECTL_OBJ := $(patsubst %.c,$(BUILD)/obj/%.o,$(wildcard protocol/moectl*.c))
$(BUILD)/bin/moectl: $(MOECTL_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

# MPI programs run under mpirun from a Criterion test: they must not link
# Criterion, whose sandbox would take them for one of its workers.
$(BUILD)/tests/cuda_%: $(BUILD)/obj/tests/cuda_%.o $(TEST_SUPPORT_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

# moe-bench's EPLB half, tested under mpirun
$(BUILD)/tests/mpi_bench_eplb: $(BUILD)/obj/bench/bench_eplb.o

$(BUILD)/tests/mpi_%: $(BUILD)/obj/tests/mpi_%.o $(TEST_SUPPORT_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/tests/%: $(BUILD)/obj/tests/%.o $(TEST_SUPPORT_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS) -lcriterion

# Test binaries run from the repository root; each is bounded by timeout(1)
# on top of Criterion's per-test timeouts.
# test and demo build in a sub-make, so that `make deps test` on a fresh
# machine reads the MPI flags only after deps installed MPI.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
test:
	$(MAKE) -j$(JOBS) all
	@BUILD=$(BUILD) bash tests/run_tests.sh $(UNIT_BINS)

# MPI programs run with leak detection off (OpenMPI's plugins keep
# allocations until exit); the 1-rank suites cover the same code with it on.
# The README's first command: a 2-rank CPU daemon answering requests.
demo:
	$(MAKE) -j$(JOBS) all
	BUILD=$(BUILD) bash scripts/demo.sh

asan:
	LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp UBSAN_OPTIONS=print_stacktrace=1 \
	$(MAKE) BUILD=build-asan SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" test

install: $(BINS)
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/moed/examples \
	    $(DESTDIR)$(PREFIX)/libexec/moed $(DESTDIR)$(PREFIX)/share/moed/systemd \
	    $(DESTDIR)$(PREFIX)/share/doc/moed
	install -m 0755 $(BINS) $(DESTDIR)$(PREFIX)/bin/
	install -m 0755 systemd/moed-signal-rank0 $(DESTDIR)$(PREFIX)/libexec/moed/
	install -m 0644 config/moed.example.yaml $(DESTDIR)$(PREFIX)/share/moed/
	install -m 0644 config/examples/*.yaml $(DESTDIR)$(PREFIX)/share/moed/examples/
	install -m 0644 systemd/moed.service systemd/moed.env $(DESTDIR)$(PREFIX)/share/moed/systemd/
	install -m 0644 README.md protocol/PROTOCOL.md $(DESTDIR)$(PREFIX)/share/doc/moed/

deps:
	bash scripts/deps.sh

clean:
	rm -rf build build-asan build-fuzz dist

# dist/moed/: binaries, test binaries, the libraries a CUDA host may lack
# (RUNPATH $ORIGIN/../lib), configs and the GPU test scripts (scripts/dist.sh).
dist:
	BUILD=$(BUILD) MAKE="$(MAKE)" JOBS=$(JOBS) bash scripts/dist.sh

# make fuzz: every tests/fuzz/fuzz_*.c as a libFuzzer binary (clang, ASan +
# UBSan) in build-fuzz/, each run FUZZ_SECONDS from a seed corpus in
# build-fuzz/corpus/<name>; crashes land in build-fuzz/crashes/. Not part of
# make test. Reproduce one: build-fuzz/<name> build-fuzz/crashes/<file>.
FUZZ_SECONDS ?= 30
FUZZ_MAX_LEN ?= 16384
FUZZ_CC      ?= clang
FUZZ_BUILD   := build-fuzz
FUZZ_CFLAGS  := -std=c11 -D_GNU_SOURCE -Wall -Wextra -g -O1 -fno-omit-frame-pointer \
                -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined $(MPI_CFLAGS)
FUZZ_LIB_SRC := $(wildcard config/*.c) kernels/safetensors.c \
                $(filter-out protocol/moectl%,$(wildcard protocol/*.c))
FUZZ_NAMES   := $(patsubst tests/fuzz/%.c,%,$(wildcard tests/fuzz/fuzz_*.c))

$(FUZZ_BUILD)/.toolchain:
	@mkdir -p $(FUZZ_BUILD)
	@printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' \
	    > $(FUZZ_BUILD)/probe.c
	@$(FUZZ_CC) -fsanitize=fuzzer,address,undefined $(FUZZ_BUILD)/probe.c -o $(FUZZ_BUILD)/probe 2>/dev/null || { \
	    echo "make fuzz needs clang with libFuzzer ($(FUZZ_CC) -fsanitize=fuzzer failed)."; \
	    echo "  Debian/Ubuntu: sudo apt-get install clang-14 libclang-rt-14-dev   (then FUZZ_CC=clang-14 if clang is absent)"; \
	    exit 1; }
	@touch $@

$(FUZZ_BUILD)/fuzz_%: tests/fuzz/fuzz_%.c $(FUZZ_LIB_SRC) $(wildcard config/*.h kernels/moe_safetensors.h protocol/*.h) | $(FUZZ_BUILD)/.toolchain
	@$(if $(Q),echo "  FUZZCC  $@")
	$(Q)$(FUZZ_CC) $(FUZZ_CFLAGS) $< $(FUZZ_LIB_SRC) -o $@ -lyaml -lcjson -lm

# Seeds: the shipped configs; a small valid safetensors file (F32 [2] and
# F16 [1,2]); control replies and events (first byte: 0 = call, 1 = events).
$(FUZZ_BUILD)/corpus/%/.seeded:
	@mkdir -p $(dir $@)
	$(Q)case $* in \
	fuzz_config) cp config/examples/*.yaml config/moed.example.yaml $(dir $@) ;; \
	fuzz_safetensors) h='{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"h":{"dtype":"F16","shape":[1,2],"data_offsets":[8,12]},"__metadata__":{"format":"pt"}}'; \
	    { printf "$$(printf '\\%03o' $${#h})\0\0\0\0\0\0\0%s" "$$h"; printf '\0\0\200\077\0\0\0\100\0\074\0\100'; } > $(dir $@)tiny.safetensors ;; \
	fuzz_control) printf '\000{"event":"stats","result":{}}\n{"id":7,"ok":true}\n{"id":1,"ok":true,"result":{"status":"ok"}}\n' > $(dir $@)call; \
	    printf '\001{"event":"stats","result":{"steps":1}}\r\n\n{"event":"reload","result":null}\n' > $(dir $@)events ;; \
	esac
	@touch $@

fuzz: $(FUZZ_NAMES:%=$(FUZZ_BUILD)/%) $(FUZZ_NAMES:%=$(FUZZ_BUILD)/corpus/%/.seeded)
	@mkdir -p $(FUZZ_BUILD)/crashes
	@fail=0; for name in $(FUZZ_NAMES); do \
	    echo "== $$name: $(FUZZ_SECONDS) s (log: $(FUZZ_BUILD)/$$name.log)"; \
	    if $(FUZZ_BUILD)/$$name $(FUZZ_BUILD)/corpus/$$name -max_total_time=$(FUZZ_SECONDS) \
	        -max_len=$(FUZZ_MAX_LEN) -timeout=10 -print_final_stats=1 \
	        -artifact_prefix=$(FUZZ_BUILD)/crashes/$$name- > $(FUZZ_BUILD)/$$name.log 2>&1; then \
	        grep -E '^stat::(number_of_executed_units|peak_rss_mb)|cov: ' $(FUZZ_BUILD)/$$name.log | tail -n 3; \
	    else \
	        fail=1; tail -n 40 $(FUZZ_BUILD)/$$name.log; echo "== $$name FAILED"; \
	    fi; \
	done; exit $$fail

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)

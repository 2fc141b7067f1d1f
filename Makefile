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

.PHONY: all test asan install deps clean demo dist
all: $(BINS) $(UNIT_BINS) $(MPI_BINS) $(GPU_BINS)

# V=1 shows the whole command lines.
Q := $(if $(V),,@)

# Objects depend on the flags they were built with: switching CUDA=0/1,
# DEBUG or SAN in the same build folder rebuilds what they change.
FLAGS_STAMP := $(BUILD)/.flags
FLAGS_NOW := $(CC) $(CFLAGS) | $(NVCC) $(NVCCFLAGS) | $(CUDA)
$(shell mkdir -p $(BUILD) && (test -f $(FLAGS_STAMP) && [ "$$(cat $(FLAGS_STAMP))" = '$(FLAGS_NOW)' ] || printf '%s' '$(FLAGS_NOW)' > $(FLAGS_STAMP)))

$(BUILD)/obj/%.o: %.c $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/%.o: %.cu $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  NVCC    $<")
	$(Q)$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/bin/moed: $(DAEMON_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/bin/moe-bench: $(BUILD)/obj/bench/moe_bench.o $(LIB)
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
	rm -rf build build-asan

# dist/moed/: binaries, test binaries, the libraries a CUDA host may lack
# (RUNPATH $ORIGIN/../lib), configs and the GPU test scripts (scripts/dist.sh).
dist:
	BUILD=$(BUILD) MAKE="$(MAKE)" JOBS=$(JOBS) bash scripts/dist.sh

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)

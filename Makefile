# husk: build, guest image, demo, tests, benchmarks. Run as root on Debian
# bookworm; `deps` installs everything else (apt packages, the vhost-user
# daemons from crates.io).

SHELL := /bin/bash
CARGO ?= cargo
PREFIX ?= /usr/local
GUEST := target/guest
AGENT_TARGET := x86_64-unknown-linux-gnu
# Built with the `guest` profile (for size: its pages are guest RAM in every pod).
AGENT_BIN := target/$(AGENT_TARGET)/guest/husk-agent
# Build (kernel, static agent), run (QEMU, containerd) and daemon build deps.
APT_PACKAGES := qemu-system-x86 linux-source-6.1 bc bison flex libelf-dev libssl-dev \
	cpio file gcc g++ libc6-dev make xz-utils pkg-config libseccomp-dev libcap-ng-dev containerd runc busybox-static \
	protobuf-compiler containernetworking-plugins iproute2 iptables
DAEMONS := virtiofsd vhost-device-vsock
# Only the tests need these: Prometheus scrapes `husk monitor`.
TEST_APT_PACKAGES := prometheus

.PHONY: all deps test-deps apt build guest-image vmm-static lab install demo test unit lint fuzz soak bench clean

all: build guest-image

deps:
	@$(MAKE) --no-print-directory apt PACKAGES="$(APT_PACKAGES)"
	@for d in $(DAEMONS); do \
		[ -x $(PREFIX)/bin/$$d ] || $(CARGO) install --locked --root $(PREFIX) $$d; done

test-deps:
	@$(MAKE) --no-print-directory apt PACKAGES="$(TEST_APT_PACKAGES)"

apt:
	@missing=$$(for p in $(PACKAGES); do \
		dpkg-query -W -f '$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "deps: apt-get install $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

build: deps
	$(CARGO) build --release --workspace --bins

# Guest kernel (cached by content hash in /var/cache/husk) and the initramfs
# with the statically linked agent as /init. A second initramfs has the
# agent's `test-hooks` (a hostile guest on request, for the end-to-end
# tests only; never installed). Built first, so the agent binary left in
# target/ is the plain one.
AGENT_BUILD := LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
	RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
	$(CARGO) build --profile guest -p husk-agent --target $(AGENT_TARGET)
guest-image: deps
	bash guest-image/build-kernel.sh $(GUEST)
	$(AGENT_BUILD) --features test-hooks
	bash guest-image/build-initramfs.sh $(AGENT_BIN) $(GUEST)/initramfs-test-hooks.cpio
	$(AGENT_BUILD)
	bash guest-image/build-initramfs.sh $(AGENT_BIN) $(GUEST)/initramfs.cpio

# husk-vmm and husk linked statically, for the nested lab's busybox
# initramfs (same flags as the agent build, release profile).
STATIC_BIN := target/$(AGENT_TARGET)/release
vmm-static: deps
	LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
	RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
		$(CARGO) build --release -p husk-vmm -p husk-runtime --bin husk-vmm --bin husk --target $(AGENT_TARGET)

# Nested lab: husk-vmm under emulated-SVM KVM inside a QEMU/TCG L1 guest.
lab: guest-image vmm-static
	bash lab/run-lab.sh $(STATIC_BIN) $(GUEST)

install: build guest-image
	install -D -m 0755 -t $(PREFIX)/bin target/release/husk target/release/husk-vmm target/release/containerd-shim-husk-v2
	install -D -m 0644 -t $(PREFIX)/share/husk $(GUEST)/vmlinux $(GUEST)/initramfs.cpio $(GUEST)/kernel.config

demo: build guest-image
	./target/release/husk check
	./target/release/husk vm-ping
	bash tests/demo.sh
	./target/release/pod-demo

# The fuzz crate is outside the workspace (nightly, cargo fuzz): checked
# here too, so an API change that breaks a target fails in minutes, not
# after the lab.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	$(CARGO) clippy --release -p husk-agent --all-targets --features test-hooks -- -D warnings
	cd fuzz && $(CARGO) +nightly check --locked --bins

# Unit tests only: no root, no KVM, no guest. The CLI's tests run the
# `husk` binary of the same profile, which `cargo test` does not build.
unit:
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

# Every parser the guest (or containerd's options) feeds, under libFuzzer
# with sanitizers (cargo fuzz, nightly): FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 300
fuzz: deps
	bash fuzz/run.sh $(FUZZ_SECONDS)

# Everything: lint, unit tests, each fuzz target briefly (30 s), and
# end-to-end tests against real guests.
test: test-deps build guest-image lint lab
	bash fuzz/run.sh 30
	$(CARGO) test --release --workspace --no-fail-fast -- --include-ignored

# Long fault cases: a 100 MB console flood (about 7 min under TCG).
soak: build guest-image
	HUSK_FLOOD_MB=100 $(CARGO) test --release -p husk-tests --test hardening -- --include-ignored --test-threads=1 --nocapture a_console_flood

bench: build guest-image
	$(CARGO) bench -p husk-tests

clean:
	$(CARGO) clean

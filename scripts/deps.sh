#!/usr/bin/env bash
# Installs what building and testing Causeway needs beyond the Rust toolchain:
# libclang (bindgen for librocksdb-sys), a C++ compiler, cargo-nextest,
# Node.js and npm (the automerge-repo clients of the interop tests and of
# `causeway bench many-docs-sync`), pkg-config and OpenSSL's headers (samod's
# WebSocket dialer, built by the interop tests, links native-tls), and (as
# root, for the chaos harness) iproute2 and nftables, and Chromium (the
# dashboard's browser test drives it with Playwright).
# As root it installs missing Debian packages with apt-get; otherwise it says
# what to install and stops.
set -euo pipefail

missing=()
# libclang itself (libclang.so or libclang-NN.so), not libclang-cpp, which
# other packages bring and bindgen cannot use.
compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null \
    || compgen -G "/usr/lib/*-linux-gnu/libclang-[0-9]*.so*" >/dev/null \
    || compgen -G "/usr/lib/*-linux-gnu/libclang.so*" >/dev/null \
    || missing+=(libclang-dev)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v pkg-config >/dev/null || missing+=(pkg-config)
[[ -e /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
# The chaos harness (network namespaces, nftables) runs only as root; as
# root, make sure its tools are there.
if [[ $(id -u) -eq 0 ]]; then
    command -v ip >/dev/null || missing+=(iproute2)
    command -v nft >/dev/null || missing+=(nftables)
fi
# The dashboard test's browser (or CAUSEWAY_CHROMIUM names another).
[[ -n ${CAUSEWAY_CHROMIUM:-} || -x /usr/bin/chromium ]] || missing+=(chromium)

if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "deps: installing ${missing[*]} with apt-get" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "deps: missing system packages: ${missing[*]}" >&2
        echo "deps: install them with: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "deps: installing cargo-nextest with cargo" >&2
    cargo install cargo-nextest --locked
fi

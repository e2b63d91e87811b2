#!/usr/bin/env bash
# Installs what building tailscope needs beyond Rust when it is missing: libclang (RocksDB's
# bindings are generated with bindgen) and g++ (RocksDB is C++ compiled from source).
set -euo pipefail
need=()
# libclang itself: libclang-cpp (which a machine may have without it) is not what bindgen loads.
if ! compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null \
  && ! compgen -G "/usr/lib/x86_64-linux-gnu/libclang.so*" >/dev/null \
  && ! compgen -G "/usr/lib/x86_64-linux-gnu/libclang-[0-9]*.so*" >/dev/null; then
  need+=(libclang-dev)
fi
command -v g++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

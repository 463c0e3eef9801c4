#!/usr/bin/env bash
# Download Debian bookworm's CUDA 11.8 toolkit (non-free) with `apt-get download` and
# unpack it with `dpkg -x` into $CUDA_TK, then lay out $CUDA_TK/bin + nvcc.profile so
# candle's build.rs (bindgen_cuda -> nvcc) works with no root install.
# Idempotent: a finished unpack is marked by $CUDA_TK/.complete.
set -euo pipefail
source "$(dirname "$0")/common.sh"
C="$CUDA_TK"
if [[ -f "$C/.complete" ]]; then log "toolkit cached at $C"; exit 0; fi
PKGS=(nvidia-cuda-toolkit nvidia-cuda-dev libnvvm4 libcudart11.0 libnvrtc11.2
      libnvrtc-builtins11.8 libcuda1 libnvidia-ptxjitcompiler1 libcu++-dev libcub-dev
      libthrust-dev)
# libcublas/libcurand are pulled by nvidia-cuda-dev's closure on Debian; fetch the
# runtime libs candle links against explicitly as well.
PKGS+=(libcublas11 libcublaslt11 libcurand10)
APT="$CUDA_CACHE/apt"; DEBS="$CUDA_CACHE/debs"
mkdir -p "$APT/lists/partial" "$DEBS"
LIST="$APT/sources.list"
: > "$LIST"
# The machine's sources (deb822 or one-line), with contrib non-free added for bookworm.
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources; do
  [[ -f "$f" ]] || continue
  if [[ "$f" == *.sources ]]; then
    awk '/^URIs:/{u=$2} /^Suites:/{$1=""; s=$0} /^$/{if(u&&s){n=split(s,a," ");for(i=1;i<=n;i++)print u, a[i]}; u="";s=""} END{if(u&&s){n=split(s,a," ");for(i=1;i<=n;i++)print u, a[i]}}' "$f" |
      while read -r uri suite; do echo "deb [trusted=yes] $uri $suite main contrib non-free non-free-firmware"; done >> "$LIST"
  else
    grep -E '^deb ' "$f" | sed -E 's/ main( |$).*/ main contrib non-free non-free-firmware/' >> "$LIST" || true
  fi
done
if ! grep -q . "$LIST"; then
  echo "deb [trusted=yes] http://deb.debian.org/debian bookworm main contrib non-free non-free-firmware" >> "$LIST"
fi
log "apt sources: $(wc -l < "$LIST") lines in $LIST"
AOPTS=(-o Dir::Etc::sourcelist="$LIST" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$APT/lists"
       -o Dir::Cache="$APT/cache" -o APT::Get::List-Cleanup=0)
mkdir -p "$APT/cache/archives/partial"
apt-get "${AOPTS[@]}" update -qq
cd "$DEBS"
for p in "${PKGS[@]}"; do
  if ls "${p}"_*.deb >/dev/null 2>&1; then continue; fi
  if ! apt-get "${AOPTS[@]}" download -qq "$p"; then
    case "$p" in libcublas11|libcublaslt11|libcurand10) log "optional $p not found, skipped";;
      *) echo "apt-get download $p failed" >&2; exit 1;; esac
  fi
done
log "debs: $(du -sh "$DEBS" | cut -f1)"
rm -rf "$C.tmp"; mkdir -p "$C.tmp"
for d in "$DEBS"/*.deb; do dpkg -x "$d" "$C.tmp"; done
T="$C.tmp"
mkdir -p "$T/bin"
ln -sf "$C/usr/lib/nvidia-cuda-toolkit/bin/nvcc" "$T/bin/nvcc"
ln -sf "$C/usr/lib/nvidia-cuda-toolkit/bin/cicc" "$T/bin/cicc"
for b in ptxas fatbinary nvlink cudafe++ bin2c cuobjdump; do ln -sf "$C/usr/bin/$b" "$T/bin/$b"; done
cat > "$T/bin/nvcc.profile" <<PROF
NVVMIR_LIBRARY_DIR = $C/usr/lib/nvidia-cuda-toolkit/libdevice
PATH += $C/bin:
INCLUDES += "-I$C/usr/include"
LIBRARIES =+ -L$C/usr/lib/x86_64-linux-gnu/stubs -L$C/usr/lib/x86_64-linux-gnu
PROF
rm -rf "$C"; mv "$T" "$C"
touch "$C/.complete"
log "toolkit unpacked: $(du -sh "$C" | cut -f1) at $C"

#!/usr/bin/env bash
# Fill benchmarks/wheels/ (git-ignored) with the wheels benchmarks/gpu_check.sh installs offline on the GPU machine.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # then carry benchmarks/wheels to the device run
#
# The GPU machine has no network; its Python (3.12 on this workplace's 'cuda' image, see
# /work/.library/device/KINDS.md) already holds torch, transformers, peft, accelerate, pyarrow, pandas,
# fsspec, xxhash, huggingface-hub, jinja2, psutil and pyyaml. What it lacks is bitsandbytes, trl and
# datasets, and datasets' small pure-Python needs dill and multiprocess. xxhash and fsspec come along
# too (small) in case an image lacks them; pyarrow (~40 MB) does not. gguf and vaderSentiment (the embedded
# model's reader and reward) are for benchmarks/gpu_smollm.sh.
#
# Versions: those installed in this checkout's environment (what the tests ran with), else the newest.
# Platform: manylinux x86_64, CPython for each version in PY_VERSIONS (default: 3.12, the device image's,
# and this Python's own), --only-binary=:all:, --no-deps (every name is listed here explicitly).
#
# bitsandbytes' wheel carries native libraries for every CUDA, ROCm and XPU release (~70 MB packed);
# the copy saved here keeps only those matching BNB_KEEP (default "cpu cuda13": the CPU library and the
# CUDA 13.x ones, for the image's torch +cu130), which brings it to a few MB. Set BNB_KEEP="cpu cuda12
# cuda13" for an image whose torch is built for CUDA 12, or BNB_KEEP=all to keep the wheel as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-benchmarks/wheels}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
HERE_PY=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PY_VERSIONS=${PY_VERSIONS:-"3.12 $HERE_PY"}
BNB_KEEP=${BNB_KEEP:-"cpu cuda13"}
PACKAGES=${PACKAGES:-"bitsandbytes trl datasets dill multiprocess xxhash fsspec gguf vaderSentiment"}
mkdir -p "$DEST"

# name==version as installed here (so the device runs what the tests here ran with); bare name otherwise.
pins=$("$PY" - $PACKAGES <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        out.append(name)
print(" ".join(out))
EOF
)
echo "packages: $pins"
echo "python versions: $(echo $PY_VERSIONS | tr ' ' '\n' | sort -u | tr '\n' ' ')"

platforms=""
for n in 17 24 27 28 31 34 35; do platforms+=" --platform manylinux_2_${n}_x86_64"; done
platforms+=" --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

# (pip's stderr minus the notes about configured find-links folders that do not exist here)
download() {
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --implementation cp $platforms -d "$DEST" "$@" 2> >(grep -v "is ignored: it is neither a file nor" >&2)
}
for v in $(echo $PY_VERSIONS | tr ' ' '\n' | sort -u); do
    for spec in $pins; do
        download --python-version "$v" "$spec"
    done
done

# Trim bitsandbytes' native libraries to BNB_KEEP (rewriting the wheel's RECORD to match).
if [ "$BNB_KEEP" != all ]; then
    for whl in "$DEST"/bitsandbytes-*.whl; do
        [ -e "$whl" ] || continue
        "$PY" - "$whl" $BNB_KEEP <<'EOF'
import os, re, sys, zipfile
path, keep = sys.argv[1], sys.argv[2:]
lib = re.compile(r"^bitsandbytes/libbitsandbytes_([a-z]+\d*)\.(so|dll|dylib)$")
with zipfile.ZipFile(path) as src:
    names = src.namelist()
    drop = {n for n in names if (m := lib.match(n)) and not any(m.group(1).startswith(k) for k in keep)}
    if not drop:
        sys.exit(0)
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename in drop:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if ln.split(",", 1)[0] not in drop).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
os.replace(tmp, path)
kept = sorted(lib.match(n).group(1) for n in names if lib.match(n) and n not in drop)
print(f"{os.path.basename(path)}: kept native libraries {', '.join(kept)}; dropped {len(drop)}")
EOF
    done
fi

echo
ls -l "$DEST" | awk 'NR > 1 {printf "%10.2f MiB  %s\n", $5 / 1048576, $9}'
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
awk -v t="$total" 'BEGIN {printf "total: %.2f MiB in '"$DEST"' (the device run carries at most 64 MiB with the working tree)\n", t / 1048576}'

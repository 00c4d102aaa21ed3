# Sourced by benchmarks/gpu_check.sh and benchmarks/gpu_smollm.sh (needs PY and WHEELS set): installs, offline and
# without dependency resolution, each package of $WHEELS (filled by benchmarks/fetch_gpu_wheels.sh) whose module
# this Python cannot find: into the Python's own environment, or where that is not writable into
# /tmp/ctrl_offline_site, put on PYTHONPATH. Sets `installable` to the names installed.
missing=$("$PY" - <<'EOF'
import importlib.util
# distribution name: module name
wanted = {"bitsandbytes": "bitsandbytes", "trl": "trl", "datasets": "datasets", "dill": "dill",
          "multiprocess": "multiprocess", "xxhash": "xxhash", "fsspec": "fsspec",
          "gguf": "gguf", "vaderSentiment": "vaderSentiment"}
print(" ".join(dist for dist, module in wanted.items() if importlib.util.find_spec(module) is None))
EOF
)
installable=()
for dist in $missing; do
    if compgen -G "$WHEELS/${dist}-*.whl" >/dev/null; then
        installable+=("$dist")
    else
        echo "install_wheels.sh: $dist is missing and $WHEELS has no wheel of it (run benchmarks/fetch_gpu_wheels.sh" \
             "and carry $WHEELS); the parts that need it will fail and say so"
    fi
done
if [ ${#installable[@]} -gt 0 ]; then
    echo "install_wheels.sh: installing from $WHEELS: ${installable[*]}"
    if ! "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir --find-links "$WHEELS" "${installable[@]}"; then
        echo "install_wheels.sh: could not install into $("$PY" -c 'import sys; print(sys.prefix)'); trying /tmp/ctrl_offline_site"
        "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir --find-links "$WHEELS" \
            --target /tmp/ctrl_offline_site "${installable[@]}" \
            && export PYTHONPATH=/tmp/ctrl_offline_site${PYTHONPATH:+:$PYTHONPATH}
    fi
else
    echo "install_wheels.sh: nothing to install (all of bitsandbytes, trl, datasets and their small needs are present)"
fi

# Sourced by benchmarks/gpu_check.sh and benchmarks/run_gpu_suite.sh, from the repository root with
# $ROOT and $PYTHON set: makes `import shardline` work on a bare GPU machine (no network). If it
# fails, the project is installed from this tree without build isolation and without dependencies
# (pip would otherwise download setuptools), or, where pip cannot install, put on PYTHONPATH through
# a folder of links.
if ! "$PYTHON" -c 'import shardline.worker, shardline.bench' >/dev/null 2>&1; then
  echo "installing shardline from $ROOT (pip install --no-build-isolation --no-deps -e .)"
  "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e "$ROOT" \
    || echo "pip could not install shardline; falling back to PYTHONPATH links" >&2
  if ! "$PYTHON" -c 'import shardline.worker, shardline.bench' >/dev/null 2>&1; then
    # The package maps shardline.<x> onto top-level folders: mirror that with links. `python -m`
    # puts the working directory (whose shardline/ lacks worker/) first on sys.path, so a
    # sitecustomize imports shardline from the links at start-up, before that happens.
    shim=$(mktemp -d)
    mkdir -p "$shim/shardline"
    ln -s "$ROOT"/shardline/* "$shim/shardline/"
    for sub in worker cluster router proto; do ln -s "$ROOT/$sub" "$shim/shardline/$sub"; done
    echo "import shardline  # from $shim (ensure_shardline.sh), ahead of the working directory" > "$shim/sitecustomize.py"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PYTHON" -c 'import shardline.worker, shardline.bench' || { echo "cannot import shardline" >&2; exit 2; }
fi

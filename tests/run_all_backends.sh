#!/usr/bin/env bash
# Runs the test suite once per Keras backend (TensorFlow, JAX, PyTorch) and prints a total.
# Extra arguments go to pytest, e.g. `bash tests/run_all_backends.sh -m slow` or `-k frequency`.
#
# End-to-end runs marked `slow_on("jax", "tensorflow")` run on PyTorch by default and on every backend
# with -m slow.
#
# JAX runs in parallel with TensorFlow then PyTorch: most of its time is XLA compiling small
# functions on one core, so on a 2-core machine the three suites finish in about the time of the
# JAX one alone. Its log is printed when it ends. KERAS_MFM_TESTS_SERIAL=1 runs them one by one.
set -u
cd "$(dirname "$0")/.."
reports=$(mktemp -d)
status=0
# JAX: XLA's persistent compilation cache, fresh for this run (the tests build the same small
# networks many times, in this process and in the train.py subprocesses: about a quarter less time)
export JAX_COMPILATION_CACHE_DIR="$reports/jax-cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1

run_backend() {  # backend -> pytest with a JUnit report
  KERAS_BACKEND=$1 python -m pytest --junitxml="$reports/$1.xml" "${@:2}"
}

if [ "${KERAS_MFM_TESTS_SERIAL:-0}" = "1" ]; then
  for backend in tensorflow jax torch; do
    echo "=== KERAS_BACKEND=$backend"
    run_backend "$backend" "$@" || status=1
  done
else
  echo "=== KERAS_BACKEND=jax (in parallel; its log follows when it ends)"
  run_backend jax "$@" > "$reports/jax.log" 2>&1 &
  jax_pid=$!
  for backend in tensorflow torch; do
    echo "=== KERAS_BACKEND=$backend"
    run_backend "$backend" "$@" || status=1
  done
  wait "$jax_pid" || status=1
  echo "=== KERAS_BACKEND=jax"
  cat "$reports/jax.log"
fi

python - "$reports" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
totals = dict(tests=0, failures=0, errors=0, skipped=0)
for path in sorted(glob.glob(sys.argv[1] + "/*.xml")):
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    for key in totals:
        totals[key] += int(suite.get(key, 0))
failed = totals["failures"] + totals["errors"]
passed = totals["tests"] - failed - totals["skipped"]
print(f"all backends: {passed} passed, {failed} failed, {totals['skipped']} skipped")
PY
rm -rf "$reports"
exit $status

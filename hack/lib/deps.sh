# Sourced by hack/receivers.sh and hack/browser.sh: a Python venv and node_modules in the current
# directory, each redone only when its inputs change (a .hookrelay-stamp file inside it holds a
# hash of those inputs: the pin files plus the interpreter's version). The caller defines
# say() and die().

stamp_of() { # stamp_of FILE... -- STRING...: a hash of the files' contents and the strings
    local files=()
    while [ "$1" != "--" ]; do files+=("$1"); shift; done
    shift
    { cat "${files[@]}"; printf '%s\n' "$@"; } | sha256sum | cut -d' ' -f1
}

# ensure_venv MODULE [PIP ARGS...]: .venv with requirements.txt installed; MODULE must import.
ensure_venv() {
    local module=$1 python="" candidate version want venv
    shift
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            python=$(command -v "$candidate")
            break
        fi
    done
    [ -n "$python" ] || die "no python3 >= 3.10 found"
    version=$("$python" -c 'import sys; print(sys.version.split()[0])')
    venv="$(pwd)/.venv"
    want=$(stamp_of requirements.txt -- "python $version")
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.hookrelay-stamp" 2>/dev/null)" = "$want" ] &&
        "$venv/bin/python" -c "import $module" 2>/dev/null; then
        say "python venv up to date ($venv, python $version)"
        return
    fi
    say "creating python venv $venv with $python ($version)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$@" \
        -r requirements.txt
    echo "$want" >"$venv/.hookrelay-stamp"
    say "installed: $(grep -v '^#' requirements.txt | grep -o '^[A-Za-z0-9_.-]*==[^ ;\\]*' | tr '\n' ' ')"
}

# ensure_node_modules CHECK_FILE: `npm ci` from package-lock.json unless CHECK_FILE is there and
# the stamp matches; prints the installed versions of the package.json dependencies.
ensure_node_modules() {
    local check=$1 node_version want
    command -v node >/dev/null 2>&1 || die "node not found"
    command -v npm >/dev/null 2>&1 || die "npm not found"
    node_version=$(node --version)
    case "$node_version" in
        v1[0-9].* | v[0-9].*) die "node >= 20 needed, found $node_version" ;;
    esac
    want=$(stamp_of package.json package-lock.json -- "node $node_version")
    if [ -e "$check" ] && [ "$(cat node_modules/.hookrelay-stamp 2>/dev/null)" = "$want" ]; then
        say "node_modules up to date ($(pwd)/node_modules, node $node_version)"
        return
    fi
    say "npm ci in $(pwd) (node $node_version)"
    npm ci --no-audit --no-fund --loglevel=error
    echo "$want" >node_modules/.hookrelay-stamp
    say "installed: $(node -p 'Object.keys(require("./package.json").dependencies || {}).map((n) =>
        `${n}@${require(`./node_modules/${n}/package.json`).version}`).join(" ")')"
}

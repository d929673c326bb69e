#!/bin/sh
# Installs the Debian packages listed in bench/debian-packages.txt (third-party
# tools used by tests/benchmarks) idempotently and non-interactively, as root.
# Skips apt-get entirely when every package is already installed. Services that
# the packages would start (postfix, dovecot, prometheus, haproxy, postgresql) are prevented from
# starting during install and stopped afterwards, so ports 25/110/143/9090/5432
# stay free; loadtest/thirdparty.py starts private throw-away instances instead.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
pkgs=$(grep -v '^[[:space:]]*\(#\|$\)' "$here/debian-packages.txt")

missing=""
for p in $pkgs; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$st" = "install ok installed" ] || missing="$missing $p"
done

stop_services() {
    for s in postfix dovecot prometheus prometheus-node-exporter haproxy postgresql; do
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            systemctl disable --now "$s" >/dev/null 2>&1 || true
        elif [ -x "/etc/init.d/$s" ]; then
            "/etc/init.d/$s" stop >/dev/null 2>&1 || true
        fi
    done
    # belt and braces: ask the daemons themselves (no-ops when not running)
    if command -v postfix >/dev/null 2>&1; then postfix stop >/dev/null 2>&1 || true; fi
    if command -v doveadm >/dev/null 2>&1; then doveadm stop >/dev/null 2>&1 || true; fi
}

if [ -z "$missing" ]; then
    echo "install-debian-packages: all present ($(echo $pkgs | wc -w) packages)"
    stop_services
    exit 0
fi

echo "install-debian-packages: installing$missing"
export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo "postfix postfix/mailname string localhost" | debconf-set-selections

# Keep maintainer scripts from starting daemons (remove our policy file after).
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
cleanup() { [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; return 0; }
trap cleanup EXIT

apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing
stop_services
echo "install-debian-packages: done"

#!/usr/bin/env bash
# Start coturn on this node for ray-lipsync (run by cluster.yaml on the head; usable on any
# Linux VM). TURN REST-API credentials: coturn checks use-auth-secret against the secret in
# $TURN_SECRET_FILE, the same secret ray-lipsync's settings get as webrtc.turn_secret.
# Writes the address clients use to $TURN_HOST_FILE (default ~/turn_host).
#   TURN_PORT (3478)  RELAY_MIN/RELAY_MAX (49152/49663: open these UDP ports)  EXTERNAL_IP (auto)
set -euo pipefail

TURN_SECRET_FILE=${TURN_SECRET_FILE:-$HOME/turn_secret}
TURN_HOST_FILE=${TURN_HOST_FILE:-$HOME/turn_host}
TURN_PORT=${TURN_PORT:-3478}
RELAY_MIN=${RELAY_MIN:-49152}
RELAY_MAX=${RELAY_MAX:-49663}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

command -v turnserver >/dev/null || {
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn >/dev/null
}
[ -s "$TURN_SECRET_FILE" ] || (umask 077 && openssl rand -hex 32 >"$TURN_SECRET_FILE")

PRIVATE_IP=$(hostname -I | awk '{print $1}')
if [ -z "${EXTERNAL_IP:-}" ]; then  # AWS instance metadata (IMDSv2); empty elsewhere
  token=$(curl -sf -m 2 -X PUT http://169.254.169.254/latest/api/token \
    -H "X-aws-ec2-metadata-token-ttl-seconds: 60" || true)
  EXTERNAL_IP=$(curl -sf -m 2 -H "X-aws-ec2-metadata-token: $token" \
    http://169.254.169.254/latest/meta-data/public-ipv4 || true)
fi
CONF=${TURN_CONF:-$HOME/turnserver.conf}
(umask 077 && cat >"$CONF" <<CONF
listening-port=$TURN_PORT
min-port=$RELAY_MIN
max-port=$RELAY_MAX
use-auth-secret
static-auth-secret=$(cat "$TURN_SECRET_FILE")
realm=ray-lipsync
fingerprint
no-tls
no-dtls
no-cli
no-multicast-peers
denied-peer-ip=0.0.0.0-0.255.255.255
denied-peer-ip=169.254.0.0-169.254.255.255
pidfile=/tmp/ray-lipsync-turnserver.pid
log-file=/tmp/ray-lipsync-turnserver.log
simple-log
CONF
)
if [ -n "${EXTERNAL_IP:-}" ] && [ "$EXTERNAL_IP" != "$PRIVATE_IP" ]; then
  echo "external-ip=$EXTERNAL_IP/$PRIVATE_IP" >>"$CONF"  # behind the cloud's 1:1 NAT
fi

# the secret stays in the 0600 config file, never on a command line (ps shows those)
[ -f /tmp/ray-lipsync-turnserver.pid ] && kill "$(cat /tmp/ray-lipsync-turnserver.pid)" 2>/dev/null || true
turnserver -c "$CONF" --daemon
echo "${EXTERNAL_IP:-$PRIVATE_IP}" >"$TURN_HOST_FILE"
echo "coturn on ${EXTERNAL_IP:-$PRIVATE_IP}:$TURN_PORT (relay UDP $RELAY_MIN-$RELAY_MAX)"

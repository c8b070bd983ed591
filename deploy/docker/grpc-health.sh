#!/usr/bin/env bash
# The images' HEALTHCHECK: one call of the standard gRPC health service (grpc.health.v1.Health/Check, the
# server as a whole) over plaintext HTTP/2, spoken by bash itself through /dev/tcp, with coreutils' dd and od
# to read the binary frames. A probe costs a shell and a few coreutils processes, where a Python client costs
# 52 MB and 0.22 s of CPU every interval. Exit 0 only for SERVING; NOT_SERVING (a draining server), an error
# status, a refused or silent connection all exit 1.
#   grpc-health.sh [HOST] [PORT]     (default 127.0.0.1 and $CNN_SERVING_PORT, else 8001)
set -euo pipefail
host=${1:-127.0.0.1}
port=${2:-${CNN_SERVING_PORT:-8001}}
path=/grpc.health.v1.Health/Check

exec 3<>"/dev/tcp/$host/$port" || exit 1

hex_len() { printf '\\x%02x' "${#1}"; }  # an HPACK string length (all ours are under 127 bytes: one byte)

# HPACK header block, no Huffman coding, no dynamic table: :method POST (static 3), :scheme http (static 6),
# :path (name static 4), :authority (name static 1), content-type (name static 31), te: trailers (new name).
headers="\\x83\\x86\\x04$(hex_len "$path")$path\\x01$(hex_len "$host")$host"
headers+="\\x0f\\x10\\x10application/grpc\\x00\\x02te\\x08trailers"
block_len=$(printf "$headers" | wc -c)
{
    printf 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'
    printf '\x00\x00\x00\x04\x00\x00\x00\x00\x00'                       # SETTINGS, empty
    printf "\\x00\\x00\\x$(printf %02x "$block_len")\\x01\\x04\\x00\\x00\\x00\\x01"  # HEADERS, END_HEADERS, stream 1
    printf "$headers"
    printf '\x00\x00\x05\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00'   # DATA, END_STREAM: an empty request message
} >&3

read_hex() {  # read_hex N: exactly N bytes of the connection, as lowercase hex
    dd bs="$1" count=1 iflag=fullblock status=none <&3 | od -An -v -tx1 | tr -d ' \n'
}

# Frames until stream 1 answers: its DATA frame holds the response message, a gRPC-framed
# HealthCheckResponse; status SERVING (1) is field 1 as a varint: 08 01.
for _ in $(seq 20); do
    frame=$(read_hex 9)
    [ ${#frame} -eq 18 ] || exit 1  # connection closed
    length=$((16#${frame:0:6})) type=${frame:6:2} flags=$((16#${frame:8:2})) stream=$((16#${frame:10:8} & 0x7fffffff))
    payload=""
    [ "$length" -eq 0 ] || payload=$(read_hex "$length")
    case "$stream:$type" in
        1:00) [ "$payload" = "00000000020801" ] && exit 0 || exit 1 ;;  # the response message
        1:01) [ $((flags & 1)) -eq 0 ] || exit 1 ;;  # headers; with END_STREAM: an error status, no message
        1:03 | 0:07) exit 1 ;;                       # RST_STREAM, GOAWAY
    esac
done
exit 1

#!/bin/busybox sh
# PID 1 of the test guest (packed into the initramfs by setup.sh).
#
# Kernel command line (set by lab.py):
#   mig.wl=idle|fill|dup|dirty   workload (default idle)
#   mig.mb=N        MiB of stable data in the tmpfs /data/stable (fill, dup, dirty)
#   mig.dirty_mb=N  dirty: MiB of pages that are rewritten forever (default 8)
#   mig.chunk=B     dirty: bytes rewritten per 4 KiB page and pass, 1..4096 (default 256)
#
# Serial console (ttyS0) protocol:
#   guest:  INIT t=<uptime> ...                        when init starts
#   guest:  READY sum=<md5> kb=<KiB of stable data> t=<uptime>   once the workload is in place
#   host:   check      -> guest: CHECK sum=<md5> passes=<dirty passes so far>
# sum = md5 of all files in /data/stable concatenated in name order. The dirty
# buffer is outside /data/stable, so sum stays stable while the guest keeps dirtying.
/bin/busybox mkdir -p /proc /sys /dev /data
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o size=100% tmpfs /data
mkdir -p /data/stable /data/dirty

WL=idle MB=0 DIRTY_MB=8 CHUNK=256
for w in $(cat /proc/cmdline); do
  case "$w" in
    mig.wl=*) WL=${w#*=} ;;
    mig.mb=*) MB=${w#*=} ;;
    mig.dirty_mb=*) DIRTY_MB=${w#*=} ;;
    mig.chunk=*) CHUNK=${w#*=} ;;
  esac
done

up() { cut -d' ' -f1 /proc/uptime; }
sum() { cat /data/stable/* | md5sum | cut -d' ' -f1; }
echo "INIT t=$(up) wl=$WL mb=$MB kernel=$(uname -r)"

rand_files() {   # rand_files N: N files of 1 MiB of incompressible data
  i=0
  while [ "$i" -lt "$1" ]; do
    dd if=/dev/urandom of=/data/stable/fill.$i bs=64k count=16 2>/dev/null
    i=$((i + 1))
  done
}

# a random marker in every workload, so even idle guests have a non-trivial sum
dd if=/dev/urandom of=/data/stable/marker bs=4k count=16 2>/dev/null
case "$WL" in
  idle) ;;
  fill) rand_files "$MB" ;;
  dup)
    # memory full of identical (non-zero) pages: one seed, copied
    dd if=/dev/urandom of=/data/stable/dup.0 bs=64k count=16 2>/dev/null
    i=1
    while [ "$i" -lt "$MB" ]; do cp /data/stable/dup.0 /data/stable/dup.$i; i=$((i + 1)); done ;;
  dirty)
    rand_files "$MB"
    SUM=$(sum)      # now, before the dirtying loop competes for the one vCPU
    # One small file per 4 KiB page, so the shell's builtin printf can rewrite
    # the start of every page in place ("1<>" opens without truncating; the
    # first pass creates the files): the same guest pages are dirtied over and
    # over, quickly. Each pass writes the next CHUNK-byte line of a pool drawn
    # from /dev/urandom, so a page changes by a small delta (what xbzrle
    # encodes). The loop uses shell builtins only: no fork per page.
    n=$((DIRTY_MB * 256))
    dd if=/dev/urandom bs="$CHUNK" count=48 2>/dev/null | base64 -w "$CHUNK" > /data/pool
    echo 0 > /data/passes
    ( p=0
      while :; do
        while read -r r; do
          i=0
          while [ "$i" -lt "$n" ]; do printf %s "$r" 1<>/data/dirty/$i; i=$((i + 1)); done
          p=$((p + 1)); echo "$p" > /data/passes
        done < /data/pool
      done ) &
    ;;
  *) echo "ERROR unknown workload $WL" ;;
esac

echo "READY sum=${SUM:-$(sum)} kb=$(du -sk /data/stable | cut -f1) t=$(up)"

stty -echo 2>/dev/null
while :; do
  if read -r cmd; then
    case "$cmd" in
      *check*) echo "CHECK sum=$(sum) passes=$(cat /data/passes 2>/dev/null || echo 0)" ;;
    esac
  else
    sleep 1    # console hung up (e.g. host disconnected): keep PID 1 alive
  fi
done

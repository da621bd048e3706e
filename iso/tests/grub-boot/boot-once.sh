#!/usr/bin/env bash
# Boots docs/grub-ab.cfg for real, once: GRUB from an ISO in QEMU reads and writes the given
# grubenv, then boots a real kernel whose initramfs reports which slot it was told it is.
#
# usage: boot-once.sh WORKDIR ENVFILE
#   WORKDIR  cache for the ISO (rebuilt only when docs/grub-ab.cfg, this script or the
#            kernel change) and scratch space for each run
#   ENVFILE  a 1024-byte grubenv; overwritten with the block as GRUB left it.
#            The serial console log is written to ENVFILE.log.
# Prints one line: booted=A, booted=B or booted=none (the marker never appeared).
# SITECAST_BREAK_SLOT=A|B makes that slot's kernel panic before userspace.
# SITECAST_KERNEL=path picks the kernel (default: the newest /boot/vmlinuz-*).
set -euo pipefail

die() { echo "boot-once: $*" >&2; exit 2; }

[[ $# -eq 2 ]] || die "usage: boot-once.sh WORKDIR ENVFILE"
workdir=$1 envfile=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cfg=$here/../../../docs/grub-ab.cfg
[[ -f $cfg ]] || die "missing $cfg"
[[ -f $envfile && $(stat -c %s "$envfile") -eq 1024 ]] || die "$envfile is not a 1024-byte grubenv"
case ${SITECAST_BREAK_SLOT:-} in ''|A|B) ;; *) die "SITECAST_BREAK_SLOT must be A or B" ;; esac

for tool in qemu-system-x86_64 grub-mkrescue xorriso busybox cpio mke2fs debugfs flock timeout; do
  command -v "$tool" >/dev/null || die "missing $tool (see iso/tests/grub-boot/README.md)"
done
[[ -d /usr/lib/grub/i386-pc ]] || die "missing GRUB's BIOS modules (package grub-pc-bin)"
busybox=$(command -v busybox)
# The initramfs has no libraries, so only a static busybox runs in it.
ldd "$busybox" >/dev/null 2>&1 && die "$busybox is dynamically linked; install busybox-static"
kernel=${SITECAST_KERNEL:-$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n1 || true)}
[[ -n $kernel && -r $kernel ]] || die "no readable kernel (package linux-image-amd64)"

mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd)
tree='' run=''
trap 'rm -rf "$tree" "$run"' EXIT  # scratch dirs, also on errors

# --- The ISO, built once per (cfg, script, kernel). Tests may run in parallel: lock the build.
key=$(cat "$cfg" "${BASH_SOURCE[0]}" <(echo "$kernel") | sha256sum | cut -c1-16)
iso=$workdir/sitecast-grub-$key.iso
exec 9>"$workdir/.build.lock"
flock 9
if [[ ! -f $iso ]]; then
  rm -f "$workdir"/sitecast-grub-*.iso  # stale builds of an older cfg or script
  tree=$(mktemp -d "$workdir/tree.XXXXXX")
  mkdir -p "$tree/boot/grub" "$tree/sitecast" "$tree/initramfs"/{bin,dev,proc}
  cp "$kernel" "$tree/sitecast/vmlinuz"
  cp "$cfg" "$tree/boot/grub/grub-ab.cfg"

  # One initramfs for both slots: it reports the slot from ab.partition and powers off.
  cp "$busybox" "$tree/initramfs/bin/busybox"
  cat >"$tree/initramfs/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
# No /dev/console in the archive (making one needs mknod): mount devtmpfs and use that.
mount -t devtmpfs dev /dev
exec >/dev/console 2>&1
mount -t proc proc /proc
slot=none
for word in $(cat /proc/cmdline); do
  case $word in ab.partition=*) slot=${word#ab.partition=} ;; esac
done
echo "SITECAST-BOOTED slot=$slot"
poweroff -f
EOF
  chmod +x "$tree/initramfs/init"
  (cd "$tree/initramfs" && find . | cpio -o -H newc --quiet | gzip -1) >"$tree/sitecast/initrd.img"
  rm -rf "$tree/initramfs"

  # Harness wrapper: point the A/B script at the env disk and the ISO's kernel, then run it.
  # harness.cfg on the env disk carries per-run knobs, so one ISO serves every run.
  cat >"$tree/boot/grub/grub.cfg" <<'EOF'
insmod ext2
set sitecast_env=(hd0)/grubenv
set sitecast_kernel_A=/sitecast/vmlinuz
set sitecast_kernel_B=/sitecast/vmlinuz
set sitecast_initrd_A=/sitecast/initrd.img
set sitecast_initrd_B=/sitecast/initrd.img
if [ -f (hd0)/harness.cfg ]; then source (hd0)/harness.cfg; fi
source /boot/grub/grub-ab.cfg
EOF
  grub-mkrescue -o "$iso.tmp" "$tree" >"$workdir/grub-mkrescue.log" 2>&1 \
    || die "grub-mkrescue failed; see $workdir/grub-mkrescue.log"
  mv "$iso.tmp" "$iso"
fi
flock -u 9

# --- This run: an ext2 disk holding the env block (GRUB's (hd0)) and the per-run knobs.
run=$(mktemp -d "$workdir/run.XXXXXX")
mkdir "$run/fs"
cp "$envfile" "$run/fs/grubenv"
if [[ -n ${SITECAST_BREAK_SLOT:-} ]]; then
  # No initramfs /init to run and no root device: the kernel panics, and panic=-1 reboots
  # at once, which -no-reboot turns into QEMU exiting.
  echo "set sitecast_args_$SITECAST_BREAK_SLOT=\"rdinit=/nonexistent panic=-1\"" >"$run/fs/harness.cfg"
fi
# 1 KiB blocks: the env block is exactly one block, which GRUB's save_env overwrites in place.
mke2fs -q -F -t ext2 -b 1024 -d "$run/fs" "$run/disk.img" 4M >/dev/null || die "mke2fs failed"

# The serial log goes beside ENVFILE: each caller (and parallel test) has its own.
log=$envfile.log
start=$SECONDS
# No KVM: nested KVM hung on the machines this was written on; TCG takes ~15 s a boot.
rc=0
timeout --kill-after=5 "${SITECAST_BOOT_TIMEOUT:-120}" qemu-system-x86_64 \
  -accel tcg -m 512 -display none -monitor none -no-reboot \
  -serial "file:$log" \
  -drive "file=$run/disk.img,format=raw,if=ide,index=0,media=disk" \
  -drive "file=$iso,format=raw,if=ide,index=2,media=cdrom,readonly=on" \
  -boot order=d </dev/null || rc=$?
[[ $rc -eq 124 || $rc -eq 137 ]] && die "QEMU did not finish in ${SITECAST_BOOT_TIMEOUT:-120} s; serial log: $log"
[[ $rc -eq 0 ]] || die "QEMU failed (exit $rc); serial log: $log"
echo "boot-once: QEMU ran $((SECONDS - start)) s; serial log: $log" >&2

debugfs -R "cat /grubenv" "$run/disk.img" >"$run/grubenv.out" 2>/dev/null \
  || die "could not read /grubenv back from the disk"
[[ $(stat -c %s "$run/grubenv.out") -eq 1024 ]] || die "grubenv read back is not 1024 bytes"
cp "$run/grubenv.out" "$envfile"

slot=$(tr -d '\r' <"$log" | sed -n 's/.*SITECAST-BOOTED slot=\([AB]\).*/\1/p' | tail -n1)
echo "booted=${slot:-none}"

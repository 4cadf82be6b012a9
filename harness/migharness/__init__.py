"""The lab's building blocks, shared by the harness's scripts (lab.py,
capture-multifd.py, wan-bench.py), one job a module:

  common     Fail, log, deadline_loop: what every module needs
  assets     the lab directory: QEMU binaries, kernel, initramfs, run dirs
  proc       running and stopping our own child processes, by PID
  qmp        a QMP client on a unix socket
  console    the guest's serial console
  vm         one QEMU with the lab's guest
  migration  an outgoing migration and what QEMU says of it
  options    migration capabilities and parameters from the command line
  endpoints  the source and destination QEMUs of a live migration
  checks     the checks of a finished live migration
  relay      a TCP relay that counts, captures or corrupts what it forwards
  pki        throwaway credentials for the proxies' TLS link
  proxy      one dedup proxy process (examples/proxy.rs)
  redis      a throwaway redis-server
  capture    the capture-file and capture-live subcommands
  proxied    the migrate subcommand: a live migration through the proxies
  session    a command's run dir and what it started, cleaned up on every exit
  wan/       the WAN benchmark's parts (wan-bench.py)

Python 3 standard library only.
"""

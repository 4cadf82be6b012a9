"""The WAN benchmark's parts (wan-bench.py), one job a module:

  matrix   the links, guests and configurations it measures
  owned    every process and namespace it starts, for the cleanup on any exit
  host     facts of the host a record keeps (load, commit)
  link     the emulated link: namespaces, delay relay, rate limit, probes
  binaries the proxy and catalog builds it runs
  run      one migration over the link, and its record
  report   results.tsv/json, table.md and the plot from results.jsonl
"""

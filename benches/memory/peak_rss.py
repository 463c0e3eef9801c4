"""Run a command and print one JSON line: its peak RSS (the largest resident set of the
child and its descendants, from the kernel's ru_maxrss), wall time and exit code. The
command's stdout goes to --stdout FILE (default: discarded), its stderr is inherited.

    python benches/memory/peak_rss.py [--stdout FILE] -- CMD ARGS...
"""
import json
import resource
import subprocess
import sys
import time

args = sys.argv[1:]
out_path = None
if args[:1] == ["--stdout"]:
    out_path, args = args[1], args[2:]
if args[:1] == ["--"]:
    args = args[1:]
t0 = time.perf_counter()
with open(out_path or "/dev/null", "w") as out:
    rc = subprocess.call(args, stdout=out)
wall = time.perf_counter() - t0
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"peak_rss_mb": round(peak_kb / 1024, 1), "wall_s": round(wall, 2), "rc": rc}))

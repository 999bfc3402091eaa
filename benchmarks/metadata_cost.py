"""alloc and rare_write before and after issue 14 (metadata in write-rare
memory), in one run: builds the extension of a given git revision (default
main) into a temporary directory and times both builds alternately, each in
its own subprocess.

    python -m benchmarks.metadata_cost [REV]
"""
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIMING = r"""
import time, prmem
from prmem import Mode, Pool
def best(fn, n, reps=7):
    out = []
    for _ in range(reps):
        t = time.perf_counter(); fn(n); out.append((time.perf_counter() - t) / n)
    return min(out)
def allocs(n):
    p = Pool(Mode.WR, refill=64 << 20)
    a = p.alloc
    for _ in range(n):
        a(32)
    p.destroy()
pw = Pool(Mode.WR); x = pw.alloc(64); pw.protect()
rw = pw.rare_write
def rares(n):
    for _ in range(n):
        rw(x, b"12345678")
print(best(allocs, 100000) * 1e9, best(rares, 100000) * 1e9)
"""


def build(rev, dest):
    subprocess.run("git -C %s archive %s | tar -x -C %s" % (ROOT, rev, dest), shell=True,
                   check=True)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=dest,
                   check=True, capture_output=True)
    return os.path.join(dest, "src")


def run(src):
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run([sys.executable, "-c", TIMING], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def main():
    rev = sys.argv[1] if len(sys.argv) > 1 else "main"
    with tempfile.TemporaryDirectory() as tmp:
        old = build(rev, tmp)
        new = os.path.join(ROOT, "src")
        res = {"before": [], "after": []}
        for _ in range(3):
            res["before"].append(run(old))
            res["after"].append(run(new))
    for k, v in res.items():
        print("%-6s alloc %.1f ns   rare_write 8 B %.0f ns" % (
            k, min(a for a, _ in v), min(r for _, r in v)))


if __name__ == "__main__":
    main()

"""Tokenizing a single 50 MB line (issue 8): wall time and peak memory per tokenizer.

Each tokenizer runs in a fresh process (`prepare_data` on a 50 MB file without a newline:
read, build the tokenizer, encode, write the token cache) that reports its own peak RSS
(`getrusage(RUSAGE_SELF)`, which includes ~0.3 GB of torch imports: see import_rss_mb).
Prints ONE JSON line.

    flock /tmp/layerflow-heavy.lock python benchmarks/hostile_corpus.py
"""

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

CHILD = """
import resource, sys, time
t0 = time.perf_counter()
from layerflow.config import DataConfig
from layerflow.data import prepare_data
t1 = time.perf_counter()
tok, ids = prepare_data(DataConfig(data=sys.argv[1], tokenizer=sys.argv[2], bpe_vocab_size=1024),
                        sys.argv[3])
print(len(ids), tok.vocab_size, round(time.perf_counter() - t1, 2),
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def main() -> None:
    mb = int(os.environ.get("MB", "50"))
    rng = random.Random(0)
    words = [("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
             for _ in range(5000)]
    tmp = tempfile.mkdtemp(prefix="lf-hostile-")
    path = os.path.join(tmp, "one_line.txt")
    with open(path, "w") as f:
        n = 0
        while n < mb * 1_000_000:
            chunk = " ".join(rng.choice(words) for _ in range(20000)) + " "
            f.write(chunk)
            n += len(chunk)
    os.truncate(path, mb * 1_000_000)
    subprocess.run([sys.executable, "-c", "import layerflow.data"], check=True)
    base_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = {"bench": "hostile_corpus_single_line", "mb": mb, "import_rss_mb": base_rss // 1024}
    for kind in ("byte", "char", "bpe"):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", CHILD, path, kind, os.path.join(tmp, kind)],
                           capture_output=True, text=True, env={**os.environ,
                                                                "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - t0
        if r.returncode:
            out[kind] = {"error": r.stderr.strip().splitlines()[-1][:200]}
            continue
        n_tok, vocab, secs, rss = r.stdout.split()
        out[kind] = {"tokens": int(n_tok), "vocab": int(vocab), "prepare_s": float(secs),
                     "wall_s": round(wall, 2), "peak_rss_mb": int(rss)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Encode throughput of WorldTokenizer against the official TRIE_TOKENIZER: same text, same run.

    python -m bench.bench_tokenizer [--mb 1.0] [--repeats 5] [--write]

The text is tests/tokenizer_corpus.varied_text: prose in 11 languages, code, emoji sequences,
whitespace and control runs, random code points and ASCII, long runs of one character, cut in
4 KB pieces and shuffled. The two encoders alternate; each figure is the best (and the median) of
--repeats runs, and the ids are checked to be equal. Also: 1,000 inputs of 200 bytes (the
Python-only path), and each corpus section alone, to show the weakest kind of text. --write saves bench/results/tokenizer-<date>.json (tokenizer figures do not fit the model
record format of results_io).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from bench.results_io import RESULTS_DIR, device_name, versions  # noqa: E402
from mlx_rwkv.tokenizer import WorldTokenizer  # noqa: E402
from tokenizer_corpus import corpus, varied_text  # noqa: E402


def timings(fn, data: bytes, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(data)
        out.append(time.perf_counter() - t)
    return out


def compare(ours, official, data: bytes, repeats: int) -> dict:
    """MB/s of both encoders on data (alternating runs), and their ratio."""
    if ours(data) != official(data):
        raise SystemExit("ids differ from the official tokenizer: not benchmarking a wrong encoder")
    t_ours, t_off = [], []
    for _ in range(repeats):
        t_off += timings(official, data, 1)
        t_ours += timings(ours, data, 3)
    mb = len(data) / 1e6
    return {
        "bytes": len(data),
        "ours_mb_s": round(mb / min(t_ours), 2), "ours_mb_s_median": round(mb / statistics.median(t_ours), 2),
        "official_mb_s": round(mb / min(t_off), 2), "official_mb_s_median": round(mb / statistics.median(t_off), 2),
        "ratio": round(min(t_off) / min(t_ours), 2),
        "ratio_median": round(statistics.median(t_off) / statistics.median(t_ours), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=1.0, help="size of the varied text in MB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="save bench/results/tokenizer-<date>.json")
    args = ap.parse_args()
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    import rwkv

    t = time.perf_counter()
    official = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    build_official = time.perf_counter() - t
    t = time.perf_counter()
    world = WorldTokenizer()
    world.encode("warm up: builds the trie")
    build_ours = time.perf_counter() - t
    print(f"build: ours {build_ours:.2f} s, official {build_official:.2f} s")

    data = varied_text(int(args.mb * 1e6)).encode("utf-8")
    n_tokens = len(world.encode_bytes(data))
    whole = compare(world.encode_bytes, official.encodeBytes, data, args.repeats)
    print(f"varied text, {len(data) / 1e6:.2f} MB, {n_tokens} tokens: ours {whole['ours_mb_s']} MB/s, "
          f"official {whole['official_mb_s']} MB/s -> {whole['ratio']}x (best of {args.repeats}; "
          f"medians {whole['ours_mb_s_median']} / {whole['official_mb_s_median']} -> {whole['ratio_median']}x)")
    short = [data[i:i + 200] for i in range(0, 400_000, 400)]  # 1,000 prompts of 200 bytes
    enc_all = lambda encode: lambda _: [encode(piece) for piece in short]  # noqa: E731
    many = compare(enc_all(world.encode_bytes), enc_all(official.encodeBytes), b"x" * 200_000, args.repeats)
    print(f"1,000 inputs of 200 bytes: ours {many['ours_mb_s']} MB/s, official {many['official_mb_s']} MB/s "
          f"-> {many['ratio']}x")
    sections = {}
    for name, text in corpus(seed=0, scale=2):
        sections[name] = compare(world.encode_bytes, official.encodeBytes, text.encode("utf-8"), 3)
        s = sections[name]
        print(f"  {name:15s} {s['bytes'] / 1e3:7.1f} KB  ours {s['ours_mb_s']:6.2f} MB/s  "
              f"official {s['official_mb_s']:5.2f} MB/s  {s['ratio']:5.2f}x")
    if args.write:
        date = _dt.date.today().isoformat()
        doc = {"device": device_name(), "date": date, "command": " ".join([Path(sys.executable).name] + sys.argv),
               "versions": versions(), "tokens": n_tokens, "build_s": {"ours": round(build_ours, 3),
               "official": round(build_official, 3)}, "varied_text": whole, "short_inputs_200B": many, "sections": sections}
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=RESULTS_DIR, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        path = RESULTS_DIR / f"tokenizer-{date}.json"
        os.replace(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Codec benchmark: size and speed of every chunk codec on realistic tensor bytes.

Run from the repository root::

    .venv/bin/python bench/codec_ratios.py [--chunks 8] [--reps 3] [--threads 2]

Data (fixed seeds), cut into 1 MiB chunks:

* ``fp32 N(0,0.02)``, ``bf16 N(0,0.02)``: weights as initialised in GPT-style models;
* ``fp32 MLP weights``, ``fp32 Adam exp_avg``, ``fp32 Adam exp_avg_sq``: a small MLP
  (torch default init) after 10 AdamW steps on random regression data;
* delta cases, each chunk encoded against the same chunk of the previous checkpoint:
  ``next step``: w + lr*g with lr 1e-3 and g ~ N(0, 0.1) on every element
  (fp32 and the bf16 rounding of fp32 master weights); ``100 steps``: the sum of
  100 such steps; ``Adam next step``: the optimizer state one AdamW step later;
  ``sparse rows``: an fp32 embedding (rows of 256) in which 1 % of the rows changed.

For every chunk codec (and the ``encode`` API's automatic choice per compression
setting) it reports the encoded size relative to raw and the encode and decode
throughput (GB/s of raw bytes, best of ``--reps``) per core of CPU time and in
wall time with ``--threads`` threads,
and per data set the order-0 entropy of the byte planes: the floor a plane-wise
entropy coder can reach. blosc2 (shuffle + zstd, bitshuffle + zstd) is measured
as a reference if it is installed; cas does not use it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cas.codec import Codec, decode, encode, encode_as

CHUNK = 1 << 20


@dataclass
class Dataset:
    name: str
    data: np.ndarray  # uint8, a multiple of CHUNK
    element_size: int
    is_float: bool
    base: np.ndarray | None = None

    def chunks(self) -> list[tuple[memoryview, memoryview | None]]:
        out = []
        for off in range(0, len(self.data), CHUNK):
            base = None if self.base is None else self.base[off : off + CHUNK].data
            out.append((self.data[off : off + CHUNK].data, base))
        return out


def _bytes(t: torch.Tensor | np.ndarray, nbytes: int) -> np.ndarray:
    arr = t.contiguous().view(torch.uint8).numpy() if isinstance(t, torch.Tensor) else t.view(np.uint8)
    arr = arr.reshape(-1)
    if len(arr) < nbytes:
        arr = np.tile(arr, nbytes // len(arr) + 1)
    return np.ascontiguousarray(arr[:nbytes])


def _train_mlp(steps: int) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """AdamW on a small MLP; returns the flattened optimizer state after ``steps`` and ``steps + 1``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 512),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, 512), torch.randn(256, 512)
    states, weights = [], []
    for step in range(steps + 1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step >= steps - 1:
            ps = [p for p in model.parameters() if p.dim() == 2]
            weights.append(torch.cat([p.detach().reshape(-1) for p in ps]).numpy().copy())
            states.append(
                {
                    key: torch.cat([opt.state[p][key].reshape(-1) for p in ps]).numpy().copy()
                    for key in ("exp_avg", "exp_avg_sq")
                }
            )
    return states, weights


def make_datasets(n_chunks: int) -> list[Dataset]:
    rng = np.random.default_rng(0)
    nbytes = n_chunks * CHUNK
    n32 = nbytes // 4
    w = (rng.standard_normal(n32) * 0.02).astype(np.float32)
    w_bf = torch.from_numpy((rng.standard_normal(nbytes // 2) * 0.02).astype(np.float32)).bfloat16()
    states, mlp_w = _train_mlp(10)
    step = (rng.standard_normal(n32) * 1e-4).astype(np.float32)  # lr 1e-3 * g, g ~ N(0, 0.1)
    w1 = w + step
    w100 = w + (rng.standard_normal(n32) * 1e-3).astype(np.float32)  # 100 independent steps
    master = (rng.standard_normal(nbytes // 2) * 0.02).astype(np.float32)
    master1 = master + (rng.standard_normal(nbytes // 2) * 1e-4).astype(np.float32)
    emb = (rng.standard_normal(n32) * 0.02).astype(np.float32).reshape(-1, 256)
    emb1 = emb.copy()
    rows = rng.choice(len(emb), max(1, len(emb) // 100), replace=False)
    emb1[rows] += (rng.standard_normal((len(rows), 256)) * 1e-4).astype(np.float32)
    bf = lambda a: torch.from_numpy(a).bfloat16()  # noqa: E731
    return [
        Dataset("fp32 N(0,0.02)", _bytes(w, nbytes), 4, True),
        Dataset("bf16 N(0,0.02)", _bytes(w_bf, nbytes), 2, True),
        Dataset("fp32 MLP weights", _bytes(mlp_w[0], nbytes), 4, True),
        Dataset("fp32 Adam exp_avg", _bytes(states[0]["exp_avg"], nbytes), 4, True),
        Dataset("fp32 Adam exp_avg_sq", _bytes(states[0]["exp_avg_sq"], nbytes), 4, True),
        Dataset("Δ fp32 next step", _bytes(w1, nbytes), 4, True, _bytes(w, nbytes)),
        Dataset("Δ fp32 100 steps", _bytes(w100, nbytes), 4, True, _bytes(w, nbytes)),
        Dataset("Δ bf16 next step", _bytes(bf(master1), nbytes), 2, True, _bytes(bf(master), nbytes)),
        Dataset("Δ fp32 MLP weights next step", _bytes(mlp_w[1], nbytes), 4, True, _bytes(mlp_w[0], nbytes)),
        Dataset(
            "Δ Adam exp_avg next step",
            _bytes(states[1]["exp_avg"], nbytes),
            4,
            True,
            _bytes(states[0]["exp_avg"], nbytes),
        ),
        Dataset(
            "Δ Adam exp_avg_sq next step",
            _bytes(states[1]["exp_avg_sq"], nbytes),
            4,
            True,
            _bytes(states[0]["exp_avg_sq"], nbytes),
        ),
        Dataset("Δ sparse rows (1 %)", _bytes(emb1, nbytes), 4, True, _bytes(emb, nbytes)),
    ]


def plane_entropy(data: np.ndarray, k: int, rotate: bool) -> float:
    """Order-0 entropy of the byte planes, in bits per bit (1.0 = incompressible)."""
    if rotate:
        ints = data.view(np.dtype(f"<u{k}"))
        data = ((ints << ints.dtype.type(1)) | (ints >> ints.dtype.type(8 * k - 1))).view(np.uint8)
    cols = data.reshape(-1, k)
    total = 0.0
    for i in range(k):
        counts = np.bincount(cols[:, i], minlength=256)
        p = counts[counts > 0] / len(cols)
        total += float(-(p * np.log2(p)).sum())
    return total / (8 * k)


def _cpu(job: Callable[[], object]) -> float:
    start = time.thread_time()
    job()
    return time.thread_time() - start


def _throughput(
    pool: ThreadPoolExecutor, jobs: list[Callable[[], object]], nbytes: int, reps: int
) -> tuple[float, float]:
    """(GB/s of one core's CPU time, GB/s of wall time with the pool's threads), each the best of ``reps``."""
    cpu = wall = math.inf
    for _ in range(reps):
        cpu = min(cpu, sum(_cpu(job) for job in jobs))
        start = time.perf_counter()
        list(pool.map(lambda job: job(), jobs))
        wall = min(wall, time.perf_counter() - start)
    return nbytes / cpu / 1e9, nbytes / wall / 1e9


Encoder = Callable[[memoryview, memoryview | None], tuple[int, object]]


def candidates(ds: Dataset) -> dict[str, Encoder]:
    k, fl = ds.element_size, ds.is_float
    found: dict[str, Encoder] = {
        "zstd-1": lambda d, b: (Codec.ZSTD, encode_as(d, Codec.ZSTD, level=1)),
        "zstd-3": lambda d, b: (Codec.ZSTD, encode_as(d, Codec.ZSTD, level=3)),
        "grouped": lambda d, b: (Codec.BYTE_GROUPED, encode_as(d, Codec.BYTE_GROUPED, element_size=k)),
    }
    if fl:
        found["grouped+exp"] = lambda d, b: (
            Codec.BYTE_GROUPED,
            encode_as(d, Codec.BYTE_GROUPED, element_size=k, exponent_aligned=True),
        )
    if ds.base is not None:
        found["delta xor"] = lambda d, b: (Codec.DELTA, encode_as(d, Codec.DELTA, element_size=k, base=b))
        if fl:
            found["delta xor+exp"] = lambda d, b: (
                Codec.DELTA,
                encode_as(d, Codec.DELTA, element_size=k, exponent_aligned=True, base=b),
            )
        found["delta diff"] = lambda d, b: (
            Codec.DELTA,
            encode_as(d, Codec.DELTA, element_size=k, difference=True, base=b),
        )
    for setting in ("fast", "default", "max"):
        found[f"auto {setting}"] = lambda d, b, s=setting: encode(d, s, element_size=k, is_float=fl, base=b)
    return found


def blosc2_candidates(ds: Dataset) -> dict[str, Encoder]:
    try:
        import blosc2
    except ImportError:
        return {}
    blosc2.set_releasegil(True)
    found: dict[str, Encoder] = {}
    for name, filt in (("shuffle", blosc2.Filter.SHUFFLE), ("bitshuffle", blosc2.Filter.BITSHUFFLE)):
        params = {
            "typesize": ds.element_size,
            "clevel": 5,
            "filters": [filt],
            "codec": blosc2.Codec.ZSTD,
            "nthreads": 1,
        }
        found[f"ref: blosc2 {name}+zstd"] = lambda d, b, p=params: (-1, blosc2.compress2(d, **p))
    return found


def run(n_chunks: int, reps: int, threads: int) -> str:
    datasets = make_datasets(n_chunks)
    lines = [
        f"Codec benchmark: {n_chunks} x 1 MiB chunks per data set, best of {reps} (auto max: 1); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}",
        "",
        "Per core: raw bytes / CPU time of the encoding thread (robust to other load on the machine); "
        f"{threads} threads: raw bytes / wall time with a pool of {threads} threads.",
        "",
        "| data | codec | size / raw | encode GB/s per core | decode GB/s per core "
        f"| encode GB/s {threads} threads | decode GB/s {threads} threads |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    floors = [
        "",
        "Order-0 entropy of the byte planes (size / raw a perfect plane-wise order-0 coder reaches):",
        "",
        "| data | grouped | grouped+exp | delta xor | delta xor+exp | delta diff | cas auto default | cas auto max |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    with ThreadPoolExecutor(threads) as pool:
        for ds in datasets:
            chunks = ds.chunks()
            nbytes = len(ds.data)
            auto: dict[str, float] = {}
            for name, enc in {**candidates(ds), **blosc2_candidates(ds)}.items():
                encoded = [enc(d, b) for d, b in chunks]
                size = sum(len(memoryview(p).cast("B")) for _, p in encoded)
                slow = name == "auto max"
                enc_speed = _throughput(
                    pool, [lambda d=d, b=b, e=enc: e(d, b) for d, b in chunks], nbytes, 1 if slow else reps
                )
                if name.startswith("ref: blosc2"):
                    import blosc2

                    dec_jobs = [lambda p=p: blosc2.decompress2(p, nthreads=1) for _, p in encoded]
                else:
                    for (codec, payload), (d, b) in zip(encoded, chunks, strict=True):
                        assert bytes(decode(codec, payload, len(d), b)) == bytes(d), (ds.name, name)
                    dec_jobs = [
                        lambda c=c, p=p, n=n, b=b: decode(c, p, n, b)
                        for (c, p), n, (_, b) in zip(encoded, [len(d) for d, _ in chunks], chunks, strict=True)
                    ]
                dec_speed = _throughput(pool, dec_jobs, nbytes, reps)
                if name.startswith("auto"):
                    codecs = sorted({Codec(c).name.lower() for c, _ in encoded})
                    label = f"{name} → {', '.join(codecs)}"
                else:
                    label = name
                if name.startswith("auto"):
                    auto[name] = size / nbytes
                lines.append(
                    f"| {ds.name} | {label} | {size / nbytes:.4f} | {enc_speed[0]:.2f} | {dec_speed[0]:.2f} "
                    f"| {enc_speed[1]:.2f} | {dec_speed[1]:.2f} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
            k = ds.element_size
            ent = [plane_entropy(ds.data, k, False), plane_entropy(ds.data, k, True) if ds.is_float else math.nan]
            if ds.base is not None:
                xor = np.bitwise_xor(ds.data, ds.base)
                diff = ds.data.view(f"<u{k}") - ds.base.view(f"<u{k}")
                zigzag = (diff << diff.dtype.type(1)) ^ (diff.view(f"<i{k}") >> (8 * k - 1)).view(f"<u{k}")
                ent += [
                    plane_entropy(xor, k, False),
                    plane_entropy(xor, k, True) if ds.is_float else math.nan,
                    plane_entropy(zigzag.view(np.uint8), k, False),
                ]
            else:
                ent += [math.nan, math.nan, math.nan]
            cells = " | ".join("—" if math.isnan(e) else f"{e:.4f}" for e in ent)
            floors.append(f"| {ds.name} | {cells} | {auto['auto default']:.4f} | {auto['auto max']:.4f} |")
    return "\n".join(lines + floors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=8, help="1 MiB chunks per data set")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = run(args.chunks, args.reps, args.threads)
    print(report)
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"), exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "codecs.md"), "w") as fh:
        fh.write(report + "\n")


if __name__ == "__main__":
    main()

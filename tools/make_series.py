"""Deterministic checkpoint series for dedup and compression benchmarks.

Seven series, each a run of checkpoints written the way trainers write them:

``pretrain``
    A small GPT (token + position embedding, pre-LN transformer blocks with
    causal self-attention and a GELU MLP, head tied to the token embedding)
    trained from scratch with AdamW on synthetic tokens (noisy arithmetic progressions).
    Every weight and every Adam moment changes at every step. Each checkpoint is
    ``{"model", "optim", "step", "rng"}`` saved with ``torch.save`` (``.pt``).
``finetune``
    The same model; the embeddings (and so the tied head) and the first half of
    the blocks are frozen: ``requires_grad=False`` and absent from the optimizer,
    so their weights never change and they have no optimizer state. Same
    checkpoint layout as ``pretrain``.
``bf16-revisions``
    Weight-only revisions of the same model as bfloat16 ``.safetensors`` files
    (no optimizer state; the tied head is stored once, under the embedding's
    name). A float32 master copy is trained a few AdamW steps at a small
    learning rate between revisions, so each revision moves most weights by one
    or two bf16 ulps.
``embedding``
    A recommender-style model: a large embedding table (``sparse=True``) and a
    small dense tower. Ids are drawn from a Zipf-like distribution over randomly
    placed rows; the table is trained with SparseAdam (which touches only the
    rows of the batch, in the weights and in both moments) and the tower with
    Adam. Only a few percent of the rows change between checkpoints.
    Checkpoint: ``{"model", "optim": {"sparse", "dense"}, "step", "rng"}`` (``.pt``).
``lora``
    LoRA adapters (rank 8, on every linear layer of every block) trained with
    AdamW over a frozen base GPT. Each checkpoint holds the **full model state
    dict, base and adapters** (``...base.weight`` keys never change,
    ``...lora_A``/``...lora_B`` do) plus the optimizer state of the adapters only:
    ``{"model", "optim", "step", "rng"}`` (``.pt``). Storing the base in every
    checkpoint is what a naive trainer does, and what dedup must absorb.

``bf16-revisions-large``
    Realistic sizes: a 63 M-parameter GPT (width 768, 8 blocks with separate ``q``/``k``/``v``
    projections, vocabulary 8192; at ``scale=1``) whose bfloat16 weights are saved as
    126 MB ``.safetensors`` revisions; between revisions the fp32 master copy takes
    ``LARGE_STEPS_PER_SAVE`` AdamW steps at ``LARGE_LR``, standing in for a few hundred
    fine-tuning steps: 85-90 % of the weights move, by a median of 2 bf16 ulps and a
    long tail (small weights move many ulps). Matrices of 0.6-6 M elements: planes fill
    whole chunks, as real models give them.
``lora-large``
    The same model as a frozen **bfloat16** base (tied head stored once) with rank-8
    LoRA adapters on ``q``, ``k``, ``v`` and the attention output ``proj`` (fp32, as PEFT
    keeps them), trained with AdamW; each checkpoint is the full state dict (base and
    adapters) plus the adapters' AdamW moments (``.pt``, 131 MB at ``scale=1``).

Size: ``scale`` multiplies the parameter count (roughly): the GPT width grows as
``128 * sqrt(scale)`` (4 blocks, vocabulary 512) and the embedding table's row
count as ``16384 * scale``. At the default ``scale=1`` a GPT has about 0.85 M
parameters (a ``pretrain`` checkpoint is about 10 MiB) and the embedding table
16384 x 64; the five small series (8 checkpoints each) generate in well under a
minute on two cores. The ``*-large`` series use their own geometry (width ~768 *
sqrt(scale)); at ``scale=1`` each takes 1-3 minutes (one thread).

Determinism: every series seeds its own RNGs, runs with
``torch.use_deterministic_algorithms(True)`` and a fixed thread count (1 by
default), and swaps its global torch RNG state in and out around every yield, so
the caller's RNG is neither used nor disturbed. The same (torch build, CPU,
``threads``) gives byte-identical files.

Use as a module::

    from tools.make_series import SERIES, generate, checkpoints
    paths = generate("pretrain", "out/pretrain", scale=0.5)
    for name, state in checkpoints("lora", scale=0.1, count=3): ...

or as a CLI (from the repository root)::

    .venv/bin/python tools/make_series.py OUT_DIR [--series pretrain,lora] [--scale 4] [--count 8]

which writes ``OUT_DIR/<series>/ckpt-NNN.{pt,safetensors}``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

DEFAULT_COUNT = 8
SEED = 20240611

Checkpoint = tuple[str, Any]  # (file name, object to write)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    """Sizes of a series. ``large``: the realistic geometry of the ``*-large`` series (see the
    module docstring); otherwise the small one the other series use."""

    scale: float = 1.0
    count: int = DEFAULT_COUNT
    seed: int = SEED
    threads: int = 1
    large: bool = False

    @property
    def width(self) -> int:
        """GPT model width: ~128 * sqrt(scale) (large: ~768 * sqrt(scale), a multiple of 64), a multiple of 32."""
        if self.large:
            return max(64, 64 * round(LARGE_WIDTH * math.sqrt(self.scale) / 64))
        return max(32, 32 * round(128 * math.sqrt(self.scale) / 32))

    @property
    def heads(self) -> int:
        return self.width // (64 if self.large else 32)

    @property
    def layers(self) -> int:
        return LARGE_LAYERS if self.large else 4

    @property
    def vocab(self) -> int:
        return LARGE_VOCAB if self.large else 512

    @property
    def seq_len(self) -> int:
        return 64 if self.large else 32

    @property
    def batch(self) -> int:
        return 4 if self.large else 8

    @property
    def emb_rows(self) -> int:
        return max(1024, round(16384 * self.scale))

    emb_dim: int = 64


#: geometry of the ``*-large`` series at scale 1: about 63 M parameters, 126 MB as bfloat16
LARGE_WIDTH = 768
LARGE_LAYERS = 8
LARGE_VOCAB = 8192


# --------------------------------------------------------------------------- models


class Block(nn.Module):
    """Pre-LN transformer block. ``split_qkv``: separate ``q``/``k``/``v`` projections (as Llama's
    ``q_proj``/``k_proj``/``v_proj``, so LoRA can target each) instead of one fused ``qkv``."""

    def __init__(self, d: int, heads: int, dropout: float, split_qkv: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.split_qkv = split_qkv
        self.ln1 = nn.LayerNorm(d)
        if split_qkv:
            self.q = nn.Linear(d, d)
            self.k = nn.Linear(d, d)
            self.v = nn.Linear(d, d)
        else:
            self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.ln1(x)
        q, k, v = (self.q(h), self.k(h), self.v(h)) if self.split_qkv else self.qkv(h).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, cfg: Config, dropout: float = 0.1) -> None:
        super().__init__()
        d = cfg.width
        self.tok_emb = nn.Embedding(cfg.vocab, d)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.seq_len, d))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.heads, dropout, split_qkv=cfg.large) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab, bias=False)
        self.apply(_init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        self.head.weight = self.tok_emb.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok_emb(idx) + self.pos_emb[: idx.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


class LoRALinear(nn.Module):
    """A frozen ``base`` linear layer plus a trainable low-rank update ``B @ A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


class Recommender(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.emb = nn.Embedding(cfg.emb_rows, cfg.emb_dim, sparse=True)
        nn.init.normal_(self.emb.weight, std=0.05)
        self.tower = nn.Sequential(nn.Linear(2 * cfg.emb_dim, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.tower(torch.cat([self.emb(user), self.emb(item)], dim=1)).squeeze(1)


# --------------------------------------------------------------------------- data


class SyntheticTokens:
    """Synthetic token batches: arithmetic progressions mod the vocabulary (random start and
    stride per sequence) with 10 % of the tokens replaced by noise. Learnable, and cheap to draw."""

    def __init__(self, cfg: Config, gen: torch.Generator) -> None:
        self.cfg = cfg
        self.gen = gen

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        c, g = self.cfg, self.gen
        start = torch.randint(c.vocab, (c.batch, 1), generator=g)
        stride = torch.randint(1, 17, (c.batch, 1), generator=g)
        toks = (start + stride * torch.arange(c.seq_len + 1)) % c.vocab
        noise = torch.rand(toks.shape, generator=g) < 0.1
        toks = torch.where(noise, torch.randint(c.vocab, toks.shape, generator=g), toks)
        return toks[:, :-1], toks[:, 1:]


def _lm_step(model: nn.Module, opt: torch.optim.Optimizer, data: SyntheticTokens) -> float:
    x, y = data.batch()
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _rng(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state(), "data": gen.get_state()}


def _snapshot(obj: Any) -> Any:
    """A deep copy (tied tensors stay tied) so later in-place steps do not change a yielded checkpoint."""
    return copy.deepcopy(obj)


# --------------------------------------------------------------------------- series


def _pretrain(cfg: Config) -> Iterator[Checkpoint]:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    data = SyntheticTokens(cfg, gen)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    every = 4
    for i in range(cfg.count):
        for _ in range(every):
            _lm_step(model, opt, data)
        step = (i + 1) * every
        yield f"ckpt-{i:03d}.pt", _snapshot(
            {"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "rng": _rng(gen)}
        )


def finetune_frozen_prefixes(cfg: Config) -> tuple[str, ...]:
    """State-dict key prefixes the ``finetune`` series freezes."""
    frozen_blocks = tuple(f"blocks.{i}." for i in range(cfg.layers // 2))
    return ("tok_emb.", "pos_emb", "head.", *frozen_blocks)


def _finetune(cfg: Config) -> Iterator[Checkpoint]:
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    data = SyntheticTokens(cfg, gen)
    model = GPT(cfg)
    frozen = finetune_frozen_prefixes(cfg)
    trainable = []
    for name, p in model.named_parameters():
        if name.startswith(frozen):
            p.requires_grad_(False)
        else:
            trainable.append(p)
    opt = torch.optim.AdamW(trainable, lr=3e-4, weight_decay=0.01)
    every = 4
    for i in range(cfg.count):
        for _ in range(every):
            _lm_step(model, opt, data)
        step = (i + 1) * every
        yield f"ckpt-{i:03d}.pt", _snapshot(
            {"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "rng": _rng(gen)}
        )


def _bf16_revisions(cfg: Config) -> Iterator[Checkpoint]:
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    data = SyntheticTokens(cfg, gen)
    model = GPT(cfg, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    for _ in range(8):  # a short warm-up so revision 0 is not the raw init
        _lm_step(model, opt, data)
    for i in range(cfg.count):
        if i:
            for _ in range(4):
                _lm_step(model, opt, data)
        weights = {
            k: v.detach().to(torch.bfloat16).contiguous()
            for k, v in model.state_dict().items()
            if k != "head.weight"  # tied to tok_emb.weight: stored once, as transformers does
        }
        yield f"rev-{i:03d}.safetensors", weights


def _embedding(cfg: Config) -> Iterator[Checkpoint]:
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    rows = cfg.emb_rows
    # Zipf-like popularity over randomly placed rows (ids are hashed in real systems).
    popularity = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.1
    popularity = popularity[torch.randperm(rows, generator=gen)]
    hidden = torch.randn(rows, 8, generator=gen)
    model = Recommender(cfg)
    sparse_opt = torch.optim.SparseAdam(list(model.emb.parameters()), lr=1e-2)
    dense_opt = torch.optim.Adam(model.tower.parameters(), lr=1e-3)
    batch, every = 128, 4
    for i in range(cfg.count):
        for _ in range(every):
            user = torch.multinomial(popularity, batch, replacement=True, generator=gen)
            item = torch.multinomial(popularity, batch, replacement=True, generator=gen)
            target = (hidden[user] * hidden[item]).sum(1)
            loss = F.mse_loss(model(user, item), target)
            sparse_opt.zero_grad(set_to_none=True)
            dense_opt.zero_grad(set_to_none=True)
            loss.backward()
            sparse_opt.step()
            dense_opt.step()
        step = (i + 1) * every
        yield f"ckpt-{i:03d}.pt", _snapshot({
            "model": model.state_dict(),
            "optim": {"sparse": sparse_opt.state_dict(), "dense": dense_opt.state_dict()},
            "step": step,
            "rng": _rng(gen),
        })


LORA_RANK = 8


def _lora(cfg: Config) -> Iterator[Checkpoint]:
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    data = SyntheticTokens(cfg, gen)
    model = GPT(cfg)
    model.requires_grad_(False)
    for block in model.blocks:
        assert isinstance(block, Block)
        for attr in ("qkv", "proj", "fc", "out"):
            setattr(block, attr, LoRALinear(getattr(block, attr), LORA_RANK, alpha=16.0))
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    opt = torch.optim.AdamW(adapters, lr=1e-3, weight_decay=0.0)
    every = 4
    for i in range(cfg.count):
        for _ in range(every):
            _lm_step(model, opt, data)
        step = (i + 1) * every
        yield f"ckpt-{i:03d}.pt", _snapshot(
            {"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "rng": _rng(gen)}
        )


#: what one revision of ``bf16-revisions-large`` stands for: this many real AdamW steps at this
#: learning rate move each weight about as far (several bf16 ulps) as a few hundred fine-tuning steps
LARGE_STEPS_PER_SAVE = 3
LARGE_LR = 2e-4


def _bf16_revisions_large(cfg: Config) -> Iterator[Checkpoint]:
    gen = torch.Generator().manual_seed(cfg.seed + 6)
    data = SyntheticTokens(cfg, gen)
    model = GPT(cfg, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=LARGE_LR, weight_decay=0.01)
    for _ in range(4):  # a short warm-up so revision 0 is not the raw init
        _lm_step(model, opt, data)
    for i in range(cfg.count):
        if i:
            for _ in range(LARGE_STEPS_PER_SAVE):
                _lm_step(model, opt, data)
        weights = {
            k: v.detach().to(torch.bfloat16).contiguous()
            for k, v in model.state_dict().items()
            if k != "head.weight"  # tied to tok_emb.weight: stored once, as transformers does
        }
        yield f"rev-{i:03d}.safetensors", weights


#: the attention projections the ``lora-large`` adapters sit on (q, k, v and the output projection)
LORA_LARGE_TARGETS = ("q", "k", "v", "proj")


def _bf16_base(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with every non-adapter tensor as bfloat16 (adapters stay fp32, as PEFT keeps
    them); tensors that shared a storage (the tied head) still share one."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        if ".lora_" in k:
            out[k] = v
            continue
        if v.data_ptr() not in cast:
            cast[v.data_ptr()] = v.to(torch.bfloat16)
        out[k] = cast[v.data_ptr()]
    return out


def _lora_large(cfg: Config) -> Iterator[Checkpoint]:
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    data = SyntheticTokens(cfg, gen)
    model = GPT(cfg, dropout=0.0)
    model.requires_grad_(False)
    with torch.no_grad():  # the base is a bfloat16 model: its weights are bf16 values, computed in fp32
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    for block in model.blocks:
        assert isinstance(block, Block)
        for attr in LORA_LARGE_TARGETS:
            setattr(block, attr, LoRALinear(getattr(block, attr), LORA_RANK, alpha=16.0))
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    opt = torch.optim.AdamW(adapters, lr=1e-3, weight_decay=0.0)
    every = 2
    for i in range(cfg.count):
        for _ in range(every):
            _lm_step(model, opt, data)
        state = _bf16_base(model.state_dict())
        yield f"ckpt-{i:03d}.pt", _snapshot(
            {"model": state, "optim": opt.state_dict(), "step": (i + 1) * every, "rng": _rng(gen)}
        )


@dataclass(frozen=True)
class Series:
    name: str
    fmt: str  # "pt" or "safetensors"
    dtype: torch.dtype  # the dtype of (nearly all of) its bytes
    summary: str
    make: Callable[[Config], Iterator[Checkpoint]]
    large: bool = False  # the realistic geometry (Config.large)


SERIES: dict[str, Series] = {
    s.name: s
    for s in (
        Series("pretrain", "pt", torch.float32,
               "GPT trained from scratch with AdamW: every weight and moment changes", _pretrain),
        Series("finetune", "pt", torch.float32,
               "same GPT, embeddings and first half of the blocks frozen", _finetune),
        Series("bf16-revisions", "safetensors", torch.bfloat16,
               "bf16 weight-only revisions, each a few small AdamW steps apart", _bf16_revisions),
        Series("embedding", "pt", torch.float32,
               "large embedding table with SparseAdam: only a few rows change", _embedding),
        Series("lora", "pt", torch.float32,
               "LoRA adapters over a frozen base; checkpoint = base + adapters + adapter optimizer", _lora),
        Series("bf16-revisions-large", "safetensors", torch.bfloat16,
               "126 MB bf16 weight revisions of a 63 M-parameter GPT, several ulps apart", _bf16_revisions_large,
               large=True),
        Series("lora-large", "pt", torch.bfloat16,
               "rank-8 LoRA on q/k/v/out over a frozen 126 MB bf16 base; adapters + AdamW moments in fp32",
               _lora_large, large=True),
    )
}


# --------------------------------------------------------------------------- running


def _isolated(it: Iterator[Checkpoint], cfg: Config) -> Iterator[Checkpoint]:
    """Run ``it`` with its own global torch state, swapped in only while it runs."""
    ours: torch.Tensor | None = None
    while True:
        outer = (torch.get_rng_state(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        if ours is None:
            torch.manual_seed(cfg.seed)
        else:
            torch.set_rng_state(ours)
        torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(True)
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            ours = torch.get_rng_state()
            torch.set_rng_state(outer[0])
            torch.set_num_threads(outer[1])
            torch.use_deterministic_algorithms(outer[2])
        yield item


def checkpoints(
    name: str, *, scale: float = 1.0, count: int = DEFAULT_COUNT, seed: int = SEED, threads: int = 1
) -> Iterator[Checkpoint]:
    """Yield ``(file name, object)`` for each checkpoint of series ``name``, oldest first."""
    if name not in SERIES:
        raise ValueError(f"unknown series {name!r}; choose from {', '.join(SERIES)}")
    if scale <= 0 or count < 1:
        raise ValueError("scale must be > 0 and count >= 1")
    cfg = Config(scale=scale, count=count, seed=seed, threads=threads, large=SERIES[name].large)
    return _isolated(SERIES[name].make(cfg), cfg)


def write_checkpoint(path: Path, obj: Any) -> None:
    if path.suffix == ".safetensors":
        save_file(obj, str(path), metadata={"format": "pt"})
    else:
        torch.save(obj, path)


def generate(
    name: str,
    out_dir: str | Path,
    *,
    scale: float = 1.0,
    count: int = DEFAULT_COUNT,
    seed: int = SEED,
    threads: int = 1,
) -> list[Path]:
    """Write series ``name`` into ``out_dir`` (created if needed); returns the files, oldest first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, obj in checkpoints(name, scale=scale, count=count, seed=seed, threads=threads):
        path = out / fname
        write_checkpoint(path, obj)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("out_dir", type=Path, help="writes OUT_DIR/<series>/ckpt-NNN.*")
    ap.add_argument("--series", default=",".join(SERIES), help=f"comma-separated subset of: {', '.join(SERIES)}")
    ap.add_argument("--scale", type=float, default=1.0, help="parameter-count multiplier (default 1)")
    ap.add_argument("--count", type=int, default=DEFAULT_COUNT, help="checkpoints per series")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (bytes are reproducible per value)")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.series.split(",") if s.strip()]
    unknown = [n for n in names if n not in SERIES]
    if unknown:
        ap.error(f"unknown series {', '.join(unknown)}; choose from {', '.join(SERIES)}")
    for name in names:
        t0 = time.perf_counter()
        paths = generate(name, args.out_dir / name, scale=args.scale, count=args.count, seed=args.seed,
                         threads=args.threads)
        size = sum(p.stat().st_size for p in paths)
        print(f"{name:15s} {len(paths)} files  {size / 2**20:8.2f} MiB  {time.perf_counter() - t0:6.2f} s  "
              f"-> {args.out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

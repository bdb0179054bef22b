"""`cas demo`: fine-tune a small model, checkpoint into a new repository, verify, restore bit-identically."""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cas.repository import Repository


class TinyLM(nn.Module):
    """An embedding + MLP blocks + tied head: the shape of a language model, small enough for a CPU."""

    def __init__(self, vocab: int = 4096, dim: int = 256, blocks: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied weights: stored once, restored still shared
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        out: torch.Tensor = self.head(self.norm(x))
        return out


def _state(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "rng": torch.get_rng_state()}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_demo(directory: Path | None, steps: int = 40, every: int = 10) -> int:
    torch.manual_seed(0)
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="cas-demo-")) / "repo"
    model = TinyLM()
    # Fine-tuning: the embedding (tied with the head) and the first two blocks stay frozen.
    for module in (model.embed, model.blocks[0], model.blocks[1]):
        for p in module.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    print(f"cas demo: fine-tuning a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter model "
          f"for {steps} steps, checkpoint every {every}, repository {root}")
    torch_bytes = 0
    save_s = 0.0
    with Repository.init(root) as repo:
        last_state: dict[str, Any] | None = None
        for step in range(1, steps + 1):
            # a learnable toy task: each sequence counts up from a random start (next token = token + 1)
            tokens = (torch.randint(0, 4096, (8, 1)) + torch.arange(33)) % 4096
            loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if step % every == 0:
                state = _state(model, opt, step)
                t0 = time.perf_counter()
                snap = repo.save(state, tag=f"step-{step}", metadata={"step": step, "metrics": {"loss": loss.item()}})
                save_s += time.perf_counter() - t0
                buf = io.BytesIO()
                torch.save(state, buf)
                torch_bytes += buf.tell()
                print(f"  step {step:4d}  loss {loss.item():.4f}  snapshot {snap.short_id}  "
                      f"logical {_mib(snap.logical_bytes)}  added {_mib(snap.bytes_added)}")
                last_state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
                last_state["model"] = {k: v.clone() for k, v in state["model"].items()}
        stats = repo.stats()
        print(f"stored {_mib(stats.stored_bytes)} for {_mib(stats.logical_bytes)} of checkpoints "
              f"(torch.save files would take {_mib(torch_bytes)}): dedup {stats.dedup_ratio:.2f}x, "
              f"compression {stats.compression_ratio:.2f}x, overall {stats.ratio:.2f}x; saves took {save_s:.2f} s")
        report = repo.verify(read_data=True)
        print(f"verify --read-data: {'ok' if report.ok else report.problems} "
              f"({report.snapshots_checked} snapshots, {report.chunks_checked} chunks)")
        restored = repo.load("latest")
        fresh = TinyLM()
        repo.load_into(fresh, "latest", key="model")
    assert last_state is not None
    identical = _same(
        {k: v for k, v in last_state.items() if k != "model"}, {k: v for k, v in restored.items() if k != "model"}
    ) and all(_same(last_state["model"][k], restored["model"][k]) for k in last_state["model"])
    tied = restored["model"]["head.weight"].untyped_storage().data_ptr() == \
        restored["model"]["embed.weight"].untyped_storage().data_ptr()
    into_ok = all(_same(v, last_state["model"][k]) for k, v in fresh.state_dict().items())
    print(f"restore of latest: {'bit-identical' if identical else 'MISMATCH'}; tied weights shared: {tied}; "
          f"load_into a fresh model: {'bit-identical' if into_ok else 'MISMATCH'}")
    return 0 if report.ok and identical and tied and into_ok else 1

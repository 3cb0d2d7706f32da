"""Training throughput: images/s of forward + loss + backward + AdamW step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from benchmarks.bench.common import Setup, failure
from models import build_model
from polypflow.losses import build_loss
from polypflow.profiling import latency
from polypflow.training import bf16_pays


def train_throughput(method: str, kwargs: dict, size: int, batch: int, loss: str, setup: Setup) -> dict:
    """images/s of forward + loss + backward + AdamW step, as ``polypflow.training`` trains with the default
    recipe (channels-last, bf16 autocast where it pays on the device)."""
    device, amp = setup.device, bf16_pays(setup.device)
    torch.manual_seed(0)
    model = build_model(method, **kwargs).to(device).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = build_loss(loss)
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.7).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(x)
        loss_fn(tuple(o.float() for o in outputs), y, 0).backward()
        optimizer.step()

    stats = latency(step, setup.warmup, setup.iterations, setup.sync)
    return {**stats, "images_per_s": 1e3 * batch / stats["mean_ms"], "amp": "bf16" if amp else "off"}


def bench_training(methods: Sequence[str], kwargs_of: Callable[[str], dict], loss_of: Callable[[str], str],
                   size: int, batches: Sequence[int], setup: Setup) -> list[dict]:
    rows = []
    for method in methods:
        for batch in batches:
            row = {"method": method, "batch": batch, "image_size": size, "status": "ok"}
            try:
                row.update(train_throughput(method, kwargs_of(method), size, batch, loss_of(method), setup))
            except Exception as exc:  # out of memory included
                row["status"] = failure(exc)
            rows.append(row)
            print(f"  train {method:>14} b{batch:<3} {row.get('images_per_s', float('nan')):8.2f} img/s  {row['status'][:80]}",
                  flush=True)
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows

"""Where stage two's time goes (`python -m kdcache.experiments.profile [CACHE]`, after `make teacher-cache` or `make
bench`): the default BiLSTM for 150 batches, KD from the cache against hard labels, each twice, timing tokenisation,
forward, loss, backward and the optimizer step separately, then the optimiser step alone in torch's three AdamW
implementations on the same parameters; the numbers behind the stage-two reading in docs/benchmarks.md."""
from __future__ import annotations

import contextlib
import itertools
import sys
import time

import torch

from .. import config as C, layout
from ..cache.reader import CacheDataset, collate, read_column
from ..optim import adamw, warmup_linear
from ..students import WordTokenizer, build_student
from ..train.classification import texts_of
from ..train.losses import distillation_loss
from .bench import STUDENTS


@contextlib.contextmanager
def _timed(totals: dict[str, float], key: str):
    t = time.perf_counter()
    yield
    totals[key] += time.perf_counter() - t


def main(cache: str | None = None, N: int = 150) -> None:
    """Profile N training steps of the default pipeline's BiLSTM on `cache` (default: its sentiment cache)."""
    cache = cache or str(layout.cache_root("default") / "sentiment")
    torch.manual_seed(0)
    train = C.load_pipeline("default").train
    ds = CacheDataset(cache, "train", shuffle=True, seed=0, shuffle_buffer=train.shuffle_buffer)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=collate)
    t0 = time.perf_counter()
    batches = list(itertools.islice(loader, N))  # the reader's cost, kept apart from the steps
    t_read = time.perf_counter() - t0
    st = STUDENTS["bilstm"]
    tok = WordTokenizer.build(read_column(cache, "train", "text"), st.vocab_size)

    def student():
        torch.manual_seed(0)
        model = build_student(st.arch, st.params, tok.vocab_size, 2, tok.pad_id)
        opt = adamw(model.parameters(), train.learning_rate, train.weight_decay)
        return model, opt, warmup_linear(opt, 10**6, train.warmup_ratio)

    def run(loss_cfg: C.LossConfig, label: str) -> float:
        model, optimizer, scheduler = student()
        T = {"tokenize": 0.0, "forward": 0.0, "loss": 0.0, "backward": 0.0, "step": 0.0}
        for b in batches:
            model.train()
            with _timed(T, "tokenize"):
                ids, mask = tok(texts_of(b, ("text",)), train.max_length)
            with _timed(T, "forward"):
                logits, _ = model(ids, mask)
            with _timed(T, "loss"):
                loss, _ = distillation_loss(logits, b["logits"], b["label"], loss_cfg.kind, loss_cfg.temperature,
                                            loss_cfg.alpha)
            with _timed(T, "backward"):
                loss.backward()
            with _timed(T, "step"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        tot = sum(T.values())
        print(label, f"total {tot*1000/N:.1f} ms/step", {k: f"{v*1000/N:.2f}" for k, v in T.items()})
        return tot
    for _ in range(2):
        hard = run(C.LossConfig(alpha=1.0), "hard labels")
        kd = run(train.loss, "KD (T=2, a=.5)")
    print(f"reading+collate {t_read*1000/N:.2f} ms/batch; KD/hard step ratio {hard/kd:.3f}")
    params = list(student()[0].parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    for kind in ("default loop", "foreach", "fused"):
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=kind == "foreach", fused=kind == "fused")
        for _ in range(3):
            opt.step()
        t = time.perf_counter()
        for _ in range(30):
            opt.step()
        print(f"AdamW {kind}: {(time.perf_counter() - t) * 1000 / 30:.2f} ms/step "
              f"({sum(p.numel() for p in params):,} parameters)")


if __name__ == "__main__":
    main(*sys.argv[1:2])

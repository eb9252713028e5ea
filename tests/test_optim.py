"""The shared optimiser recipe: the fused AdamW kernel takes the same steps as torch's reference loop, and the
schedule warms up linearly and decays to zero."""

from __future__ import annotations

import pytest
import torch

from kdcache.optim import adamw, warmup_linear


def test_fused_adamw_matches_the_reference_loop():
    torch.manual_seed(0)
    ref_net = torch.nn.Sequential(torch.nn.Embedding(500, 16), torch.nn.Linear(16, 3))
    net = torch.nn.Sequential(torch.nn.Embedding(500, 16), torch.nn.Linear(16, 3))
    net.load_state_dict(ref_net.state_dict())
    ref = torch.optim.AdamW(ref_net.parameters(), lr=1e-2, weight_decay=0.01, foreach=False, fused=False)
    opt = adamw(net.parameters(), 1e-2, 0.01)
    assert opt.defaults.get("fused"), "this CPU build of torch has a fused AdamW; it must be the one taken"
    for step in range(20):
        x, y = torch.randint(0, 500, (8, 5)), torch.randint(0, 3, (8,))
        for n, o in ((ref_net, ref), (net, opt)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(n(x).mean(1), y).backward()
            o.step()
    for a, b in zip(ref_net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_warmup_then_linear_decay_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_linear(opt, steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs[-1] == pytest.approx(0.125)
    assert opt.param_groups[0]["lr"] == 0.0


def test_row_sparse_adamw_takes_adamws_first_step_and_then_only_touches_a_batchs_rows():
    from kdcache.optim import RowSparseAdamW
    torch.manual_seed(0)
    dense = torch.nn.Embedding(50, 4)
    sparse = torch.nn.Embedding(50, 4, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    ref = torch.optim.AdamW(dense.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    opt = RowSparseAdamW(sparse.parameters(), lr=1e-2, weight_decay=0.01)
    x = torch.tensor([[1, 2, 3, 3]])
    for emb, o in ((dense, ref), (sparse, opt)):
        emb(x).pow(2).sum().backward()
        o.step()
        o.zero_grad()
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-6, atol=1e-7)  # touched rows and decay alike
    before = sparse.weight.detach().clone()
    sparse(torch.tensor([[7]])).sum().backward()
    opt.step()
    step = (sparse.weight - before * (1 - 1e-2 * 0.01)).abs().sum(-1)
    assert step[7] > 1e-4 and step[[1, 2, 3]].max() < 1e-7, "rows outside the batch get no momentum step"


def test_clipping_sparse_gradients_equals_torchs_on_dense_ones():
    from kdcache.optim import clip_grad_norm_
    torch.manual_seed(1)
    nets = [torch.nn.Embedding(30, 4, sparse=s) for s in (False, True)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.tensor([[4, 5, 6]])
    for n in nets:
        (n(x) * 10).sum().backward()
    a = torch.nn.utils.clip_grad_norm_(nets[0].parameters(), 0.5)
    b = clip_grad_norm_(nets[1].parameters(), 0.5)
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(nets[1].weight.grad.to_dense(), nets[0].weight.grad)


def test_a_sparse_embedding_student_takes_the_dense_students_first_step(tiny_cache, tmp_path):
    """Same seed, same batch, gradient clipping on: the BiLSTM with row-sparse embedding gradients and row-sparse
    AdamW ends its first step with the dense BiLSTM's weights (to float tolerance)."""
    import itertools
    from conftest import tiny_pipeline
    from accelerate import Accelerator
    from kdcache.train.loop import make_runs, step
    from kdcache.train.sources import open_source
    p = tiny_pipeline("train.batch_size=16", "students.bilstm.twin=false", "students.textcnn.arch=bilstm",
                      "students.textcnn.params={embed_dim: 64, hidden: 32, mlp: 64, sparse_embedding: true}",
                      "students.textcnn.twin=false", "students.textcnn.loss=null")
    acc = Accelerator(cpu=True)
    src = open_source(p, "topic", str(tiny_cache), acc)
    dense, sparse = make_runs(p, ["bilstm", "textcnn"], {"topic": src}, tmp_path, acc)
    assert sparse.sparse and not dense.sparse
    for batch in itertools.islice(src.loader, 1):
        for run in (dense, sparse):
            step(run, src, batch, src.head.targets(batch, src, acc.device), p.train, acc)
    a, b = dense.model.core.state_dict(), sparse.model.core.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_schedule_reaches_both_optimisers_of_a_sparse_student_after_accelerate_prepares_it():
    """accelerate's prepare reloads the optimiser's state, which replaces its param groups: the warm-up/decay schedule
    must still set the learning rate the inner optimisers step with (a bug here froze the student at lr/warm-up)."""
    from accelerate import Accelerator
    from kdcache.optim import optimizer_for, warmup_linear
    net = torch.nn.Sequential(torch.nn.Embedding(20, 4, sparse=True), torch.nn.Linear(4, 2))
    opt = optimizer_for(net, lr=1.0)
    sched = warmup_linear(opt, steps=10, warmup_ratio=0.5)
    net, opt = Accelerator(cpu=True).prepare(net, opt)
    for _ in range(5):
        net(torch.tensor([[1, 2]])).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    inner = [g["lr"] for o in opt.optimizer.optimizers for g in o.param_groups]
    assert inner == pytest.approx([1.0, 1.0]), inner  # the end of the warm-up, in both

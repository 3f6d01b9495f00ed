"""No host-device syncs in the training step.

On a GPU every ``.item()`` / ``float(t)`` / ``bool(t)``, every copy to the host and every op whose
output shape depends on the data (``nonzero``, ``unique``, boolean-mask indexing) makes the CPU
wait until the GPU has finished all the work queued so far, so the next step cannot be queued
behind the running one. :class:`SyncCounter` sees these ops as they are dispatched, on the CPU
too, so the count is tested here without a GPU.
"""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import build_corpus, tiny_config

aten = torch.ops.aten

# ops that hand a value to the host: it must wait for the device to compute it
SCALAR_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
# ops whose output shape depends on the values: the host must read it to allocate the output
SHAPE_OPS = {aten.nonzero.default, aten._unique.default, aten._unique2.default,
             aten.unique_dim.default, aten.unique_consecutive.default,
             aten.masked_select.default}
MASK_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                  aten._index_put_impl_.default}


def _is_mask(t) -> bool:
    return torch.is_tensor(t) and t.dtype in (torch.bool, torch.uint8)


def is_sync(func, args, kwargs) -> bool:
    """Whether dispatching ``func`` on these arguments makes the host wait for the device."""
    if func in SCALAR_OPS or func in SHAPE_OPS:
        return True
    if func in MASK_INDEX_OPS:  # x[mask], x[mask] = v: a nonzero inside
        return any(_is_mask(i) for i in args[1] if i is not None)
    if func is aten.repeat_interleave.Tensor:  # the output length is the repeats' sum
        return kwargs.get("output_size") is None
    if func is aten._to_copy.default:  # a device tensor copied to the host
        return kwargs.get("device") == torch.device("cpu") and args[0].device.type != "cpu"
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def _where() -> str:
    """The innermost line of xlip's own code on the stack (what made the call)."""
    for frame in reversed(traceback.extract_stack()):
        if "/xlip/" in frame.filename and "/tests/" not in frame.filename:
            return f"{frame.filename.rsplit('/xlip/', 1)[1]}:{frame.lineno}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """Records each host-device sync (see :func:`is_sync`) with the xlip line that caused it;
    ``paused`` stops the recording (what is not part of the step)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and is_sync(func, args, kwargs):
            self.events.append((str(func), _where()))
        return func(*args, **kwargs)


def test_the_counter_sees_each_kind_of_sync():
    x = torch.tensor([1.0, float("nan"), 3.0])
    with SyncCounter() as c:
        float(x[0])
        if torch.isfinite(x[1]):
            pass
        bool((x > 0).any())
        x.unique()
        x[x > 1]
        torch.nonzero(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
        x.masked_select(x > 0)
    assert len(c.events) == 8, c.events
    with SyncCounter() as c:  # none of these waits for the device
        torch.nonzero_static(x > 0, size=3)
        x[torch.tensor([0, 2])]
        torch.zeros(3).index_add_(0, torch.tensor([0, 0, 1]), x)
        torch.isfinite(x).all()
        len(x)
    assert c.events == []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"), 32, 4, seed=7, size=32,
                        vocab_size=300)


def sync_cfg(corpus, out, **sections):
    """Every term (CL, AttMIM, EntMLM) on paired, image-only and text-only rows, two
    micro-batches a step, clipping on."""
    manifest, tok = corpus
    data = {"sources": [{"manifest": str(manifest), "kind": "paired", "weight": 0.5},
                        {"manifest": str(manifest), "kind": "image_only", "weight": 0.25},
                        {"manifest": str(manifest), "kind": "text_only", "weight": 0.25}],
            "batch_size": 8, "num_workers": 0}
    sec = {"data": data, "text": {"tokenizer": str(tok), "max_length": 64},
           "mlm": {"policy": "entity", "text_only": True},
           "train": {"out_dir": str(out), "steps": 3, "warmup_steps": 1, "grad_accum": 2,
                     "clip_grad": 1.0, "log_every": 100}}
    for k, v in sections.items():
        sec.setdefault(k, {}).update(v)
    return tiny_config(**sec)


def step_syncs(cfg) -> list[list[tuple[str, str]]]:
    """The syncs of each step of ``TrainSteps`` as pre-training runs it (its forward, loss,
    metric log and any-rank check) on collated batches; none of the steps logs. The optimizer's
    own step is left out: AdamW (not capturable) keeps its step counters on the host, so
    reading them waits for nothing."""
    from xlip.data.dataset import MixedDataset
    from xlip.data.collate import Collator
    from xlip.losses import XLIPLoss
    from xlip.model.xlip import XLIPModel
    from xlip.optim import TrainSteps, adamw
    from xlip.text.tokenizer import load_tokenizer
    from xlip.train.distributed import DistInfo, any_rank
    from xlip.train.loop import MetricLog, build_loader

    tr = cfg.train
    torch.manual_seed(0)
    tok = load_tokenizer(cfg.text.tokenizer)
    dataset = MixedDataset(cfg, train=True)
    collate = Collator(cfg, tok, train=True, findings=dataset.findings())
    batches = list(build_loader(cfg, dataset, collate, 0, DistInfo()))
    model = XLIPModel(cfg, len(tok))
    opt, sched = adamw(model, cfg)
    criterion = XLIPLoss(cfg)
    log = MetricLog(dataset.names, ["cl", "mim", "mlm"])
    counter, per_step = SyncCounter(), []

    def pause(*_):
        counter.paused = True

    def resume(*_):
        counter.paused = False

    opt.register_step_pre_hook(pause)
    opt.register_step_post_hook(resume)

    def forward(batch, step, micro):
        gen = torch.Generator().manual_seed(tr.seed * 1_000_003 + step * tr.grad_accum + micro)
        out = model(batch, generator=gen)
        return criterion(out, batch), out

    def on_step(done, grad_norm):
        per_step.append(list(counter.events))
        counter.events.clear()

    model.train()
    steps = TrainSteps(model, opt, sched, forward, torch.device("cpu"), tr.precision,
                       tr.grad_accum, tr.clip_grad, on_micro=log.add,
                       after_update=model.clamp_logit_scale, on_step=on_step,
                       any_rank=any_rank)
    with counter:
        steps.run(iter(batches), 0, tr.steps)
    return per_step


def test_a_training_step_waits_for_the_device_once(corpus, tmp_path):
    """Between log steps a step reads one value on the host: the non-finite check's flag
    (before this change: 57 per step here, from the metric log, the loss checks, the MLM
    positions and BERT's padding test)."""
    per_step = step_syncs(sync_cfg(corpus, tmp_path / "run"))
    assert len(per_step) == 3
    for events in per_step:
        assert len(events) <= 1, Counter(events)
        assert [w.split(":")[0] for _, w in events] == ["optim.py"]  # TrainSteps.check_finite


def test_the_step_count_sees_mlm_positions_found_on_the_device(corpus, tmp_path, monkeypatch):
    """The control: batches without ``mlm_positions`` (the model then finds them itself) add
    a nonzero per micro-batch; the counter sees them."""
    import xlip.train.loop as loop

    monkeypatch.setattr(loop, "add_mlm_positions", lambda batch: batch)
    per_step = step_syncs(sync_cfg(corpus, tmp_path / "run"))
    assert all(Counter(op for op, _ in events)["aten.nonzero.default"] == 2
               for events in per_step)

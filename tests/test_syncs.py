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
    if func is aten.lift_fresh.default:  # a tensor of Python numbers: on a GPU, a blocking copy
        return True
    if func is aten._to_copy.default and kwargs.get("device") is not None:
        return _blocks(args[0].device, kwargs["device"], kwargs.get("non_blocking", False))
    if func is aten.copy_.default:
        return _blocks(args[1].device, args[0].device,
                       args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    return False


def _blocks(src: torch.device, dst: torch.device, non_blocking: bool) -> bool:
    """A copy to the host waits for the device; one to the device waits unless non-blocking
    (CUDA's copy of pageable memory ends in a stream synchronisation)."""
    if dst.type == "cpu":
        return src.type != "cpu"
    return src.type == "cpu" and not non_blocking


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
    reps, ids = torch.tensor([1, 2]), torch.tensor([0, 2])  # made before counting
    with SyncCounter() as c:
        float(x[0])
        if torch.isfinite(x[1]):
            pass
        bool((x > 0).any())
        x.unique()
        x[x > 1]
        torch.nonzero(x)
        torch.repeat_interleave(reps)
        x.masked_select(x > 0)
        x.new_tensor(2.0)
    assert len(c.events) == 9, c.events
    assert _blocks(torch.device("cuda"), torch.device("cpu"), True)
    assert _blocks(torch.device("cpu"), torch.device("cuda"), False)
    assert not _blocks(torch.device("cpu"), torch.device("cuda"), True)
    with SyncCounter() as c:  # none of these waits for the device
        torch.nonzero_static(x > 0, size=3)
        x[ids]
        torch.zeros(3).index_add_(0, reps.repeat(2)[:3] - 1, x)
        torch.isfinite(x).all()
        torch.full((), 2.0)
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


@pytest.mark.parametrize("sections", [
    {},
    {"train": {"mode": "fast"}, "mim": {"policy": "random"}},
    {"mim": {"row_fraction": 0.5}, "mlm": {"policy": "random", "row_fraction": 0.5},
     "loss": {"cl_targets": "labels"}},
], ids=["default", "fast", "row_subsets"])
def test_a_training_step_waits_for_the_device_once(corpus, tmp_path, sections):
    """Between log steps a step reads one value on the host: the non-finite check's flag
    (before this change: 59 per step here, from the metric log, the loss checks, the MLM
    positions, BERT's padding test and the MLM token count)."""
    per_step = step_syncs(sync_cfg(corpus, tmp_path / "run", **sections))
    assert len(per_step) == 3
    for events in per_step:
        assert len(events) <= 1, Counter(events)
        assert [w.split(":")[0] for _, w in events] == ["optim.py"]  # TrainSteps.check_finite


def test_the_step_count_sees_mlm_positions_found_on_the_device(corpus, tmp_path, monkeypatch):
    """The control: batches without ``mlm_positions`` (the model then finds them itself) add
    a nonzero per micro-batch; the counter sees them."""
    from xlip.data.collate import Collator

    collate = Collator.__call__
    monkeypatch.setattr(Collator, "__call__", lambda self, samples: {
        k: v for k, v in collate(self, samples).items() if k != "mlm_positions"})
    per_step = step_syncs(sync_cfg(corpus, tmp_path / "run"))
    assert all(Counter(op for op, _ in events)["aten.nonzero.default"] == 2
               for events in per_step)


class HostLog:
    """The metric log as it was before its sums moved to the device (each value read on the
    host at every micro-batch): the reference the device-side log must match."""

    def __init__(self, names, keys) -> None:
        self.names, self.keys = names, keys
        self.sums, self.counts = Counter(), Counter()

    def add(self, losses, out, batch) -> None:
        self.sums["samples"] += int(batch["has_image"].shape[0])
        self.counts["samples"] = 1.0
        if "mim_guide_fallback" in out:
            self.sums["guide_fallback"] += float(out["mim_guide_fallback"].float().sum())
            self.counts["guide_fallback"] += len(out["mim_guide_fallback"])
        for key, value in losses.items():
            if key.endswith("_loss"):
                self.sums[key] += float(value.detach())
                self.counts[key] += 1
            elif key.endswith("_per_sample"):
                term = key[: -len("_per_sample")]
                rows = out[f"{term}_rows"]
                if term == "mlm":
                    rows = rows.unique()
                    value = value[rows]
                src = batch["source"][rows]
                for s in src.unique().tolist():
                    sel = value[src == s].detach().float()
                    name = f"{term}_loss/{self.names[s]}"
                    self.sums[name] += float(sel.sum())
                    self.counts[name] += len(sel)

    def flush(self) -> dict[str, float]:
        row = {k: self.sums[k] / self.counts[k] for k in self.keys
               if self.counts[k] > 0 and k != "samples"}
        self.sums, self.counts = Counter(), Counter()
        return row


def test_metric_rows_equal_those_of_the_host_side_log(corpus, tmp_path, monkeypatch):
    """Every logged mean (per term, per source, the guide fallback share) as the old log gave
    it, over two micro-batches a step and two steps a log line."""
    import xlip.train.loop as loop

    pairs = []

    class Both(loop.MetricLog):
        def __init__(self, names, terms):
            super().__init__(names, terms)
            self.ref = HostLog(names, self.keys)

        def add(self, losses, out, batch):
            super().add(losses, out, batch)
            self.ref.add(losses, out, batch)

        def flush(self, device):
            row = super().flush(device)
            pairs.append((dict(row), self.ref.flush()))
            return row

    monkeypatch.setattr(loop, "MetricLog", Both)
    loop.pretrain(sync_cfg(corpus, tmp_path / "run", train={"log_every": 2}), progress=False)
    assert len(pairs) == 2  # steps 2 and 3
    for row, ref in pairs:
        assert {"cl_loss/text_only", "mlm_loss/image_only"}.isdisjoint(ref)  # no such rows
        assert len(ref) == 10 and set(row) - set(ref) == {"samples_per_s"}
        for k, v in ref.items():
            assert row[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_mlm_outputs_from_positions_equal_the_boolean_mask_selection(cfg):
    """``mlm_positions`` (from the collator) pick the same logits, labels and rows as the
    boolean mask ``labels != -100`` did, in the same order."""
    from tests.conftest import VOCAB, random_batch
    from xlip.model.xlip import XLIPModel, add_mlm_positions

    torch.manual_seed(0)
    model = XLIPModel(cfg, VOCAB).eval()
    batch = random_batch(cfg, B=4, L=10)
    batch["mlm_rows"] = torch.tensor([0, 2, 3])  # not every row takes part
    for k in ("mlm_input_ids", "mlm_attention_mask", "mlm_labels"):
        batch[k] = batch[k][batch["mlm_rows"]]
    batch["mlm_labels"][1, 5:8] = batch["input_ids"][2, 5:8]  # rows score different counts
    states = []
    model.mm_decoder.register_forward_hook(lambda m, a, out: states.append(out))
    with torch.no_grad():
        out = model(add_mlm_positions(dict(batch)))
        found = model(batch)  # no positions: found in the forward
    sel = batch["mlm_labels"] != -100  # (Bm, L)
    assert sel.sum() == 3 * 2 + 3 and "mlm_positions" not in batch
    assert torch.equal(out["mlm_labels"], batch["mlm_labels"][sel])
    assert torch.equal(out["mlm_rows"], batch["mlm_rows"][:, None].expand_as(sel)[sel])
    assert torch.equal(out["mlm_logits"], model.mm_decoder.logits(states[0][sel]))
    for k in ("mlm_logits", "mlm_labels", "mlm_rows"):
        assert torch.equal(found[k], out[k])


@pytest.mark.parametrize("four_d", [True, False], ids=["4d", "transformers4_2d"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_the_text_encoder_mask_equals_transformers_own(impl, four_d, monkeypatch):
    """The 4-D padding bias the text encoder passes gives BERT's outputs for the 2-D mask,
    with padding and without; so does the 2-D path kept for transformers 4.x."""
    from xlip.model import text
    from xlip.model.text import TextEncoder

    monkeypatch.setattr(text, "_TAKES_4D_MASK", four_d)
    torch.manual_seed(0)
    cfg = tiny_config(text={"attn_impl": impl, "dropout": 0.0}).text
    enc = TextEncoder(cfg, 50).eval()
    ids = torch.randint(5, 50, (3, 9))
    for mask in (torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7]),
                 torch.ones(3, 9, dtype=torch.long)):
        with torch.no_grad():
            got = enc(ids, mask)["tokens"]
            ref = enc.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def linear_steps(bad_at: tuple[int, int] | None, **kw):
    """A linear model's TrainSteps; loss term ``b_loss`` is NaN at (step, micro) ``bad_at``."""
    from xlip.optim import TrainSteps

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def forward(batch, step, micro):
        y = model(batch["x"]).mean()
        b = y * float("nan") if (step, micro) == bad_at else y ** 2
        return {"a_loss": y.abs(), "b_loss": b, "b_per_sample": torch.zeros(2)}, {}

    return model, TrainSteps(model, opt, sched, forward, torch.device("cpu"), "fp32", **kw)


def batches():
    g = torch.Generator().manual_seed(1)
    while True:
        yield {"x": torch.randn(2, 3, generator=g)}


def test_a_nan_in_a_later_micro_batch_stops_before_the_update():
    from xlip.optim import NonFiniteLossError

    model, steps = linear_steps((1, 1), grad_accum=2, clip_grad=1.0)
    seen = []
    steps.on_step = lambda done, norm: seen.append(
        (done, [p.detach().clone() for p in model.parameters()]))
    with pytest.raises(NonFiniteLossError, match=r"^training diverged: non-finite loss at step "
                                                 r"2: \{'b_loss': nan\}$"):
        steps.run(batches(), 0, 3)
    assert [d for d, _ in seen] == [1]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), seen[0][1]))


def test_another_process_s_non_finite_loss_stops_this_one_too():
    """``any_rank`` reduces the flag: another process's NaN (flag 2) stops this one, whose
    own terms are finite, with the same message as before."""
    from xlip.optim import NonFiniteLossError

    model, steps = linear_steps(None, any_rank=lambda f: torch.maximum(f, torch.tensor([2.0])))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1: on another "
                                                 r"process"):
        steps.run(batches(), 0, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

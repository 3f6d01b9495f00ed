"""Streaming shard folders: every row once per epoch across ranks x workers, seeded shuffles,
exact resume (stream and training), one-line errors for damaged folders."""

import copy
import json
import shutil
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import build_corpus, tiny_config, torchrun_pretrain
from xlip.cli import main
from xlip.config import ConfigError, from_dict, save_config
from xlip.data.manifest import load_manifest
from xlip.data.shards import write_shards
from xlip.data.stream import ShardError, ShardStream, part_bounds, shuffle_buffer
from xlip.hashing import hash_int
from xlip.train.loop import pretrain

EPOCHS = 20  # the seed table below covers the draws of this many epochs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """46 train + 10 test studies (32 px), sharded 7 manifest rows a shard: shards of uneven
    lengths, text-only rows with no tar member, test rows mixed in."""
    root = tmp_path_factory.mktemp("stream")
    manifest, tok = build_corpus(root, 46, 10, seed=2, size=32, vocab_size=300)
    write_shards(manifest, root / "shards", size=32, shard_rows=7, workers=1, progress=False)
    return manifest, tok, root / "shards"


def stream_cfg(corpus, workers=2, **data):
    _, tok, shards = corpus
    return tiny_config(
        data={"sources": [{"shards": str(shards), "kind": "paired", "weight": 0.75},
                          {"shards": str(shards), "kind": "image_only", "weight": 0.25}],
              "batch_size": 4, "num_workers": workers, "shuffle_buffer": 4, **data},
        text={"tokenizer": str(tok), "max_length": 96})


def expected_rows(corpus):
    """Manifest rows of each source, from the source manifest itself (not the shards)."""
    recs = [r for r in load_manifest(corpus[0], verify_images=False) if r.split == "train"]
    return [sorted(r.row for r in recs if r.kind == "paired"),
            sorted(r.row for r in recs if r.kind == "image_only" and r.labels)]


def draw_table(rows, seed=0):
    """Sample seed → (source, epoch, row): which draw a streamed sample is."""
    return {hash_int(f"{seed}/{s}/{e}/{row}"): (s, e, row)
            for s, rs in enumerate(rows) for e in range(EPOCHS) for row in rs}


def read(cfg, rank, world, start, stop):
    """(source, seed) of every sample of batches start … stop-1 of one rank, read through a
    real DataLoader with cfg.data.num_workers workers (images decoded, collation skipped)."""
    stream = ShardStream(cfg, rank, world, start=start, stop=stop)
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers,
                        collate_fn=lambda batch: [(x.source, x.seed) for x in batch])
    return list(loader)


def test_every_row_once_per_epoch_across_2_ranks_and_2_workers(corpus):
    cfg = stream_cfg(corpus)
    rows = expected_rows(corpus)
    table = draw_table(rows)
    batches = 20  # per consumer 10 batches: 30 paired, 10 image-only draws: > 3 epochs each
    drawn = [table[seed] for rank in (0, 1) for batch in read(cfg, rank, 2, 0, batches)
             for _, seed in batch]
    assert len(drawn) == 2 * batches * 4
    for s, want in enumerate(rows):
        per_source = [(e, row) for src, e, row in drawn if src == s]
        last = max(e for e, _ in per_source)
        assert last >= 3
        for epoch in range(last):  # the last epoch is still running
            got = Counter(row for e, row in per_source if e == epoch)
            assert sorted(got) == want and set(got.values()) == {1}, (s, epoch)


def test_parts_cover_an_epoch_exactly_with_rotating_remainders():
    for n in (1, 3, 10, 13):
        for consumers in (1, 3, 4):
            for epoch in range(5):
                bounds = [part_bounds(n, consumers, c, epoch) for c in range(consumers)]
                assert bounds[0][0] == 0 and bounds[-1][1] == n
                assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
                sizes = [b - a for a, b in bounds]
                assert max(sizes) - min(sizes) <= (1 if n % consumers else 0)
            # over `consumers` epochs every consumer gets the same number of rows
            totals = {sum(part_bounds(n, consumers, c, e)[1] - part_bounds(n, consumers, c, e)[0]
                          for e in range(consumers)) for c in range(consumers)}
            assert len(totals) == 1


def test_shuffle_buffer_is_a_seeded_permutation():
    import random

    out = list(shuffle_buffer(range(50), 8, random.Random(1)))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert out == list(shuffle_buffer(range(50), 8, random.Random(1)))
    assert list(shuffle_buffer(range(50), 1, random.Random(1))) == list(range(50))


def test_shuffling_differs_between_epochs_and_is_fixed_by_the_seed(corpus):
    cfg = stream_cfg(corpus, workers=0)
    stream = ShardStream(cfg)
    src = stream.source_stream(0, 0)  # one consumer: every row each epoch
    n = src.index.rows
    first = [r.row for r in list(src.epoch_rows(0))]
    second = [r.row for r in list(src.epoch_rows(1))]
    assert len(first) == n and sorted(first) == sorted(second) and first != second
    assert src.shard_order(0) != src.shard_order(1)
    again = ShardStream(stream_cfg(corpus, workers=0)).source_stream(0, 0)
    assert [r.row for r in again.epoch_rows(0)] == first
    reseeded = stream_cfg(corpus, workers=0)
    reseeded.train.seed = 1
    other = ShardStream(reseeded).source_stream(0, 0)
    assert [r.row for r in other.epoch_rows(0)] != first


@pytest.mark.parametrize("start", [5, 14])
def test_a_resumed_stream_yields_exactly_the_remaining_batches(corpus, start):
    cfg = stream_cfg(corpus)
    whole = read(cfg, 1, 2, 0, 24)
    assert read(cfg, 1, 2, start, 24) == whole[start:]


def test_a_stream_holds_the_member_indexes_of_few_shards(corpus):
    from xlip.data import storage

    cfg = stream_cfg(corpus, workers=0, shuffle_buffer=2)
    cfg.data.sources = cfg.data.sources[:1]  # paired rows: in 6 of the 8 shards
    stream = ShardStream(cfg, stop=30)  # 30 batches x 4 rows: 4 epochs
    assert len(stream.index[0].shards) >= 6
    folder = str(corpus[2].resolve())
    held = []
    for _ in DataLoader(stream, batch_size=None, collate_fn=len):  # in this process
        held.append(sum(tar.startswith(folder) for tar in storage._INDEX))
    assert 0 < max(held) <= 3  # the shard being read and those of the 2 buffered rows
    assert not any(tar.startswith(folder) for tar in storage._INDEX)  # all let go at the stop


def test_two_sources_on_one_shard_keep_its_index_while_either_reads(tmp_path):
    """The demo's layout: a paired and an image-only source on one shard folder. One source
    done with a shard must not drop the index the other still reads from (a rebuild scans the
    whole tar)."""
    import tarfile

    from xlip.data import storage
    from xlip.data.manifest import Record
    from xlip.data.stream import ShardRelease

    tar = tmp_path / "shard-000000.tar"
    with tarfile.open(tar, "w") as t:
        for name in ("a.png", "b.png"):
            (tmp_path / name).write_bytes(b"x" * 10)
            t.add(tmp_path / name, arcname=name)
    other = tmp_path / "shard-000001.tar"
    other.write_bytes(tar.read_bytes())
    rows = [Record(row=i + 1, image=f"{t}#{m}", text="", labels=(), split="train",
                   patient_id="p", study_id=str(i), view="PA", source="s") for i, (t, m) in enumerate(
        [(tar, "a.png"), (tar, "b.png"), (other, "a.png")])]
    paired, image_only = ShardRelease(), ShardRelease()
    taken = {}
    for name, rel in (("paired", paired), ("image_only", image_only)):
        taken[name] = list(rel.entering(rows[:2]))  # both read shard 0
    assert storage.read_shard_member(rows[0].image) == b"x" * 10
    for rec in taken["paired"]:
        paired.drawn(rec)
    list(paired.entering(rows[2:]))  # paired moves on to shard 1: done with shard 0
    assert str(tar) in storage._INDEX  # image_only still reads it
    for rec in taken["image_only"]:
        image_only.drawn(rec)
    list(image_only.entering(rows[2:]))
    assert str(tar) not in storage._INDEX  # the last holder let go


def test_position_is_saved_and_checked(corpus):
    cfg = stream_cfg(corpus)
    stream = ShardStream(cfg, 0, 2)
    pos = stream.position(10)
    assert pos["batches"] == 10 and pos["world_size"] == 2 and pos["workers"] == 2
    paired = pos["sources"]["paired"]
    assert paired["rows"] == 10 * 3 * 2
    # each consumer made 5 batches of 3 paired rows: (epoch, offset) add up to 15 draws
    src = stream.source_stream(0, 0)
    e, off = paired["consumers"][0]
    assert sum(src.part_size(i) for i in range(e)) + off == 15
    stream.check_position(pos, 10)
    with pytest.raises(ConfigError, match=r"workers 2 → 1.*data.num_workers"):
        ShardStream(stream_cfg(corpus, workers=1), 0, 2).check_position(pos, 10)
    with pytest.raises(ConfigError, match="world_size 2 → 1"):
        ShardStream(cfg, 0, 1).check_position(pos, 10)
    # epochs cut otherwise: rows would be drawn twice or never
    with pytest.raises(ConfigError, match=r"source paired: .*\(quota 3 → 6\).*data.batch_size"):
        ShardStream(stream_cfg(corpus, batch_size=8), 0, 2).check_position(pos, 10)
    with pytest.raises(ConfigError, match=r"shuffle_buffer 4 → 8"):
        ShardStream(stream_cfg(corpus, shuffle_buffer=8), 0, 2).check_position(pos, 10)
    grown = copy.deepcopy(pos)  # the shard folder was rebuilt with more rows since
    grown["sources"]["paired"]["usable_rows"] -= 5
    with pytest.raises(ConfigError, match=r"usable_rows \d+ → \d+"):
        stream.check_position(grown, 10)
    moved = copy.deepcopy(pos)
    moved["sources"]["image_only"]["shards_sha"] += 1
    with pytest.raises(ConfigError, match=r"source image_only: .*\(rows per shard\)"):
        stream.check_position(moved, 10)
    old = copy.deepcopy(pos)  # a checkpoint from before these keys: checked as it can be
    for src in old["sources"].values():
        for key in ("usable_rows", "quota", "shuffle_buffer", "shards_sha"):
            del src[key]
    stream.check_position(old, 10)


def run_cfg(corpus, out, workers):
    cfg = stream_cfg(corpus, workers=workers, batch_size=8)
    cfg.train.out_dir, cfg.train.steps, cfg.train.warmup_steps = str(out), 4, 1
    cfg.train.log_every, cfg.train.ckpt_every = 1, 2
    return cfg


def losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.endswith("_loss")} for r in rows}


def test_pretraining_from_shards_resumes_exactly(corpus, tmp_path):
    full = pretrain(run_cfg(corpus, tmp_path / "full", workers=2), progress=False)
    state = torch.load(full / "checkpoints" / "step_0000002" / "state.pt", weights_only=True)
    assert state["stream_position"]["batches"] == 2
    # a run that "crashed" after step 2: only its step-2 checkpoint survives
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000002", part / "checkpoints" / "step_0000002")
    (part / "checkpoints" / "latest").write_text("step_0000002\n")
    pretrain(run_cfg(corpus, part, workers=2), resume="latest", progress=False)
    a, b = losses(full), losses(part)
    assert sorted(b) == [3, 4] and {"cl_loss", "mim_loss", "mlm_loss"} <= set(a[3])
    for step in (3, 4):
        assert b[step].keys() == a[step].keys()
        for k in a[step]:
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-5, abs=1e-6), (step, k)
    # another number of workers would stream other parts: refused, naming the fix
    with pytest.raises(ConfigError, match="workers 2 → 1"):
        pretrain(run_cfg(corpus, part, workers=1), resume="latest", progress=False)


@pytest.mark.slow
def test_two_processes_stream_and_resume_exactly(corpus, tmp_path):
    """2 ranks x 1 worker under torchrun: the run resumed after step 2 logs the losses of the
    uninterrupted one."""
    def cfg(out):
        c = run_cfg(corpus, out, workers=1)
        c.data.batch_size, c.train.threads = 4, 1  # dropout on: every rank's RNG is restored
        return c

    full = tmp_path / "full"
    save_config(cfg(full), tmp_path / "full.yaml")
    torchrun_pretrain(tmp_path / "full.yaml")
    state = torch.load(full / "checkpoints" / "step_0000002" / "state.pt", weights_only=True)
    assert state["stream_position"]["world_size"] == 2
    assert state["stream_position"]["sources"]["paired"]["rows"] == 2 * 3 * 2  # steps x q x ranks
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000002", part / "checkpoints" / "step_0000002")
    (part / "checkpoints" / "latest").write_text("step_0000002\n")
    save_config(cfg(part), tmp_path / "part.yaml")
    torchrun_pretrain(tmp_path / "part.yaml", "--resume", "latest")
    a, b = losses(full), losses(part)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        for k in a[step]:
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-5, abs=1e-6), (step, k)


def test_config_takes_shards_or_a_manifest():
    src = {"kind": "paired"}
    with pytest.raises(ConfigError, match=r"sources\[0\] gives both manifest and shards"):
        from_dict({"data": {"sources": [{**src, "manifest": "m.csv", "shards": "d"}]}})
    with pytest.raises(ConfigError, match="mixes shards"):
        from_dict({"data": {"sources": [{**src, "manifest": "m.csv"}, {**src, "shards": "d"}]}})
    with pytest.raises(ConfigError, match="shuffle_pairs"):
        from_dict({"data": {"sources": [{**src, "shards": "d"}], "shuffle_pairs": True}})


def damaged_copy(corpus, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(corpus[2], out)
    return out


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_a_missing_shard_is_one_line_naming_the_file_and_the_fix(corpus, tmp_path, capsys):
    out = damaged_copy(corpus, tmp_path)
    (out / "shard-000002.tar").unlink()
    cfg = stream_cfg(corpus, workers=0)
    cfg.data.sources[0].shards = cfg.data.sources[1].shards = str(out)
    with pytest.raises(ShardError) as err:
        ShardStream(cfg)
    msg = one_line(err)
    assert "shard-000002.tar" in msg and f"rerun `xlip data shard {corpus[0]} --out {out}`" in msg
    # the CLI prints it as one line, without a traceback
    (tmp_path / "c.yaml").write_text(json.dumps(cfg.to_dict()))
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--quiet",
                 f"train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xlip: error: ") and "shard-000002" in err


def test_a_corrupt_shard_in_a_worker_is_one_line_naming_the_file_and_the_fix(corpus, tmp_path):
    out = damaged_copy(corpus, tmp_path)
    for tar in out.glob("shard-*.tar"):  # every image member unreadable, the tar intact
        data = bytearray(tar.read_bytes())
        at = 0
        while (at := data.find(b"\x89PNG", at)) >= 0:
            data[at:at + 16] = b"\x00" * 16
            at += 16
        tar.write_bytes(bytes(data))
    cfg = stream_cfg(corpus, workers=2)
    cfg.data.sources[0].shards = cfg.data.sources[1].shards = str(out)
    with pytest.raises(ShardError) as err:
        read(cfg, 0, 1, 0, 2)
    msg = one_line(err)
    assert ".tar#" in msg and "the shard is damaged: delete shard-0000" in msg
    assert f"rerun `xlip data shard {corpus[0]} --out {out}`" in msg
    (out / "shard-000001.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"shard index .*shard-000001.json is damaged") as err:
        ShardStream(cfg)
    one_line(err)


def test_parts_and_positions_in_closed_form_equal_the_count():
    """part_bounds and SourceStream.locate, in closed form (a checkpoint calls them for every
    consumer), against counting row by row and epoch by epoch."""
    from types import SimpleNamespace

    from xlip.data.stream import Consumer, SourceStream, part_bounds

    def bounds(n, C, c, e):
        base, extra = divmod(n, C)
        size = [base + ((i - e) % C < extra) for i in range(C)]
        return sum(size[:c]), sum(size[:c + 1])

    for n in range(0, 30):
        for C in range(1, 7):
            for c in range(C):
                for e in range(12):
                    assert part_bounds(n, C, c, e) == bounds(n, C, c, e), (n, C, c, e)
    cfg = SimpleNamespace(train=SimpleNamespace(seed=0))
    for n, C in ((23, 5), (7, 7), (5, 8), (40, 3)):
        for c in range(C):
            stream = SourceStream(None, 0, SimpleNamespace(rows=n), cfg, Consumer(c, C))
            epoch, into = 0, 0
            while into >= (size := stream.part_size(epoch)):  # a first part may be empty
                epoch, into = epoch + 1, into - size
            for draws in range(4 * n + 3):
                assert stream.locate(draws) == (epoch, into), (n, C, c, draws)
                into += 1
                while into >= (size := stream.part_size(epoch)):  # empty parts skipped
                    epoch, into = epoch + 1, into - size


def _hold_and_let_go_in_child(tar, queue):
    from xlip.data import storage

    held_at_fork = dict(storage._HOLDERS)
    storage.hold_shard(tar)  # the worker's own stream reads the shard, then is done with it
    storage.read_shard_member(f"{tar}#a.png")
    storage.forget_shard(tar)
    queue.put((held_at_fork, tar in storage._INDEX))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_worker_does_not_inherit_the_parents_holds(tmp_path):
    """A DataLoader worker forked while the main process holds a shard (e.g. a stream it
    read itself) kept that hold's count, so its own copy of the index was never dropped."""
    import multiprocessing
    import tarfile

    from xlip.data import storage

    tar = tmp_path / "shard-000000.tar"
    (tmp_path / "a.png").write_bytes(b"x" * 10)
    with tarfile.open(tar, "w") as t:
        t.add(tmp_path / "a.png", arcname="a.png")
    storage.hold_shard(tar)
    try:
        assert storage.read_shard_member(f"{tar}#a.png") == b"x" * 10
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_hold_and_let_go_in_child, args=(str(tar), queue))
        child.start()
        held_at_fork, kept = queue.get(timeout=60)
        child.join(timeout=60)
        assert held_at_fork == {} and not kept  # the child's last holder let go: dropped
        assert storage._HOLDERS[str(tar)] == 1 and str(tar) in storage._INDEX  # parent's intact
    finally:
        storage.forget_shard(tar)

"""Training data streamed from ``xlip data shard`` folders (WebDataset-style).

A source ``{shards: DIR, kind: ..., split: ..., weight: ...}`` is read as a stream, so that no
manifest, image or report of a large corpus sits in memory: when training starts, each
``shard-K.json`` (the shard's rows, see :mod:`xlip.data.shards`) is read once to count the
source's usable rows in that shard (the rule of :func:`xlip.data.dataset.usable_rows`) and to
collect the label vocabulary; the rows themselves are read again, a shard at a time, while
streaming, and images are read from the ``.tar`` by :mod:`xlip.data.storage` when drawn.

One epoch of a source with ``n`` usable rows, read by ``C = ranks x workers`` *consumers*
(consumer ``c = rank * workers + w``; ``workers`` = data.num_workers, 0 counting as 1):

- **shard order**: the shards that hold rows of the source, shuffled from (seed, source, epoch),
  the same on every rank and worker;
- **parts**: the epoch's rows in that order (a shard's rows in manifest order) are cut into ``C``
  contiguous parts. Part ``c`` holds ``n // C`` rows, plus one of the ``n % C`` remaining rows
  when ``(c - epoch) mod C < n % C`` (the extra rows rotate, so no consumer falls behind epoch
  after epoch). A consumer reads whole shards except at most two partial ones at the ends of its
  part; parts are disjoint, so **every row is drawn exactly once per epoch across all ranks and
  workers**: nothing is padded or dropped, whatever ``n`` is;
- **shuffle buffer**: a consumer passes its part through a buffer of data.shuffle_buffer rows
  (seeded from (seed, source, epoch, consumer)), drained at the end of the part;
- **epochs** follow each other without a gap: a batch may hold the last rows of one epoch and
  the first of the next.

Batches: the DataLoader batch ``b`` of a rank (``b = step * grad_accum + micro``) is made by
consumer ``b mod W`` of that rank (W workers; DataLoader hands batches out round-robin) and holds
``q_s`` rows of source ``s`` (:func:`xlip.data.sampler.quotas` of the source weights, as in
:class:`~xlip.data.sampler.MixedBatchSampler`), its ``j``-th batch taking draws
``[j q_s, (j+1) q_s)`` of the consumer's stream of source ``s``. A row's augmentation and prompt
seed is a hash of (seed, source, epoch, manifest row): independent of ranks and workers.

Position: everything is a pure function of (seed, ranks, workers, b), so a stream restarted at
batch ``b`` replays the row order of the current epoch part from the shard ``.json`` files
(without opening an image) and continues exactly where the interrupted one stopped.
:meth:`ShardStream.position` is what the trainer saves in its checkpoint;
:meth:`ShardStream.check_position` refuses to resume it with another number of ranks or workers
(the parts would change).
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from torch.utils.data import IterableDataset, get_worker_info

from xlip.config import Config, ConfigError, SourceConfig
from xlip.data.collate import Sample
from xlip.data.dataset import make_sample, report_left_out, usable_rows
from xlip.data.images import ImageError
from xlip.data.manifest import Record
from xlip.data.sampler import quotas
from xlip.data.shards import FORMAT, PLAN, shard_name
from xlip.data.storage import forget_shard, hold_shard, split_shard_path
from xlip.errors import InputError, MissingFileError
from xlip.hashing import hash_int
from xlip.text.labels import UnknownLabelError, parse_labels

T = TypeVar("T")


class ShardError(InputError):
    """A shard folder that cannot be streamed: not written by ``xlip data shard``, incomplete,
    or damaged. The message names the file and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(_worker_message(message))


def _worker_message(message: str) -> str:
    """The original one-line message of an error that a DataLoader worker raised: the main
    process re-raises it as ``Caught ShardError in DataLoader worker process 0.\\nOriginal
    Traceback ...\\nxlip.data.stream.ShardError: <message>``."""
    if message.startswith("Caught ") and "\nOriginal Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


# ---------------------------------------------------------------------------------------------
# shard folders


@dataclass(frozen=True)
class ShardFolder:
    """A folder that ``xlip data shard`` wrote, checked complete (:func:`open_shards`)."""

    path: Path
    shards: int
    manifest: str  # the sharded manifest, for the rebuild command in messages

    def rebuild(self, index: int) -> str:
        """The fix for a damaged shard."""
        return (f"delete {shard_name(index)} and {Path(shard_name(index)).with_suffix('.json')} "
                f"from {self.path} and rerun `xlip data shard {self.manifest} --out {self.path}` "
                "(it rebuilds only the missing shards)")

    def records(self, index: int) -> list[Record]:
        """Every row of shard ``index`` (``shard-K.json``) as manifest records, image paths
        absolute (``.../shard-K.tar#KEY.png``)."""
        path = self.path / Path(shard_name(index)).with_suffix(".json")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
            return [_record(self.path, r, f"{path} row {r['row']}") for r in rows]
        except FileNotFoundError:
            raise ShardError(f"shard index {path} is missing; {self.rebuild(index)}") from None
        except (OSError, ValueError, KeyError, TypeError, UnknownLabelError) as err:
            raise ShardError(f"shard index {path} is damaged ({type(err).__name__}: "
                             f"{str(err)[:120]}); {self.rebuild(index)}") from None


def _record(folder: Path, r: dict, where: str) -> Record:
    image = r["image"]
    return Record(int(r["row"]), str(folder / image) if image else "", r["text"],
                  parse_labels(r["labels"], where=where), r["split"] or "train",
                  r["patient_id"], r["study_id"], r["view"], r["source"],
                  parse_labels(r.get("negative_labels", ""), where=where))


def open_shards(path: str | Path) -> ShardFolder:
    """Check that ``path`` holds a complete shard folder of this xlip's format.

    Raises:
        MissingFileError: no such folder.
        ShardError: no readable ``shards.json`` of this format, or shards missing.
    """
    folder = Path(path).resolve()
    plan_path = folder / PLAN
    if not folder.is_dir():
        raise MissingFileError(f"shard folder {folder} does not exist; write it with `xlip data "
                               f"shard MANIFEST --out {folder}` or fix data.sources[].shards")
    if not plan_path.is_file():
        raise ShardError(f"{folder} has no {PLAN}, so `xlip data shard` did not write it; write "
                         f"one with `xlip data shard MANIFEST --out {folder}`, or name the "
                         "folder's manifest.csv as data.sources[].manifest instead")
    try:
        plan = json.loads(plan_path.read_text())
        count, manifest = int(plan["shards"]), str(plan["manifest"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{plan_path} is damaged ({type(err).__name__}: {str(err)[:120]}); "
                         f"rebuild the folder with `xlip data shard MANIFEST --out {folder} "
                         "--overwrite`") from None
    if plan.get("format") != FORMAT:
        raise ShardError(f"{plan_path}: shard layout format {plan.get('format')!r}, this xlip "
                         f"reads format {FORMAT}; rebuild with `xlip data shard {manifest} --out "
                         f"{folder} --overwrite`")
    missing = [shard_name(k) for k in range(count)
               if not ((folder / shard_name(k)).is_file()
                       and (folder / shard_name(k)).with_suffix(".json").is_file())]
    if missing:
        raise ShardError(f"{folder}: {len(missing)} of {count} shards are incomplete or missing "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): an "
                         f"interrupted `xlip data shard`; rerun `xlip data shard {manifest} --out "
                         f"{folder}` to complete them")
    return ShardFolder(folder, count, manifest)


@dataclass(frozen=True)
class SourceIndex:
    """Where one streamed source's usable rows are: the shards that hold any, and how many."""

    folder: ShardFolder
    shards: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def usable(self, src: SourceConfig, cfg: Config, index: int) -> list[Record]:
        """The source's usable rows of shard ``index``, in manifest order."""
        return usable_rows(src, cfg, self.folder.records(index))[0]


def index_source(src: SourceConfig, cfg: Config, progress: bool = False
                 ) -> tuple[SourceIndex, set[str], list[str]]:
    """(where the source's rows are, the labels they carry, their image paths if
    ``cfg.data.normalize`` must be measured else []): one pass over the shard ``.json`` files."""
    from tqdm import tqdm

    folder = open_shards(src.shards)
    shards, counts, labels, images = [], [], set(), []
    unlabelled, empty, empty_head = 0, 0, []
    measure = cfg.data.normalize == "dataset" and not cfg.data.pixel_std
    for k in tqdm(range(folder.shards), desc=f"index {src.name or src.kind}", unit="shard",
                  disable=not progress or folder.shards < 50, file=sys.stderr):
        kept, unl, emp = usable_rows(src, cfg, folder.records(k))
        unlabelled, empty = unlabelled + unl, empty + len(emp)
        empty_head += [r.row for r in emp[:8 - len(empty_head)]]
        if kept:
            shards.append(k)
            counts.append(len(kept))
            labels.update(lab for r in kept for lab in r.labels)
            if measure:
                images += [r.image for r in kept if r.image]
    report_left_out(src, cfg, sum(counts), unlabelled, empty_head, empty)
    return SourceIndex(folder, tuple(shards), tuple(counts)), labels, images


# ---------------------------------------------------------------------------------------------
# the order of one epoch: pure functions


def part_bounds(n: int, consumers: int, c: int, epoch: int) -> tuple[int, int]:
    """[start, stop) of consumer ``c``'s part of an epoch of ``n`` rows (see the module
    docstring: n // C each, the n % C extra rows to consumers (c - epoch) mod C < n % C)."""
    base, extra = divmod(n, consumers)
    # the extra rows go to the cyclic window [epoch, epoch + extra) mod C: count its members
    # below c in closed form (no sum over the consumers: checkpoints call this for each one)
    first = epoch % consumers
    windows = ((first, first + extra), (first - consumers, first + extra - consumers))
    below = sum(max(0, min(c, hi) - max(0, lo)) for lo, hi in windows)
    start = c * base + below
    return start, start + base + ((c - epoch) % consumers < extra)


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """WebDataset's shuffle: hold ``size`` items, emit a random one as each new one arrives,
    then the rest in random order. ``size`` 1 keeps the order."""
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


@dataclass(frozen=True)
class Consumer:
    """Who reads: consumer ``index`` of ``count`` (``rank * workers + worker``)."""

    index: int
    count: int


class SourceStream:
    """The rows of one streamed source as one consumer draws them, epoch after epoch."""

    def __init__(self, src: SourceConfig, s: int, index: SourceIndex, cfg: Config,
                 who: Consumer) -> None:
        self.src, self.s, self.index, self.cfg, self.who = src, s, index, cfg, who
        self.seed = cfg.train.seed

    def shard_order(self, epoch: int) -> list[tuple[int, int]]:
        """(shard, usable rows) in the epoch's shuffled order, the same for every consumer."""
        order = list(zip(self.index.shards, self.index.counts))
        random.Random(hash_int(f"{self.seed}/shards/{self.s}/{epoch}")).shuffle(order)
        return order

    def part_size(self, epoch: int) -> int:
        start, stop = part_bounds(self.index.rows, self.who.count, self.who.index, epoch)
        return stop - start

    def part(self, epoch: int) -> Iterator[Record]:
        """This consumer's rows of ``epoch`` in shard order, before the shuffle buffer."""
        start, stop = part_bounds(self.index.rows, self.who.count, self.who.index, epoch)
        at = 0  # rows of the epoch before the current shard
        for shard, n in self.shard_order(epoch):
            if at + n > start and at < stop:
                rows = self.index.usable(self.src, self.cfg, shard)
                if len(rows) != n:
                    raise ShardError(f"shard {self.index.folder.path / shard_name(shard)} "
                                     f"changed while training: {len(rows)} rows of source "
                                     f"{self.src.name or self.src.kind} where {n} were counted "
                                     "when training started; keep a shard folder unchanged "
                                     "while it trains (restart the run to count it again)")
                yield from rows[max(start - at, 0):min(stop - at, n)]
            at += n
            if at >= stop:
                return

    def epoch_rows(self, epoch: int, release: ShardRelease | None = None) -> Iterator[Record]:
        """This consumer's rows of ``epoch`` in drawing order (after the shuffle buffer)."""
        rng = random.Random(hash_int(f"{self.seed}/buffer/{self.s}/{epoch}/{self.who.index}"))
        rows = self.part(epoch)
        if release is not None:
            rows = release.entering(rows)
        return shuffle_buffer(rows, self.cfg.data.shuffle_buffer, rng)

    def locate(self, draws: int) -> tuple[int, int]:
        """(epoch, rows into its part) after ``draws`` draws of this consumer."""
        # every C epochs a consumer draws C·base + extra rows (its extra row once per
        # extra epochs of the C): whole periods at once, then at most C epochs one by one
        C = self.who.count
        period = self.index.rows  # = C·(n // C) + n % C
        epoch = 0
        if period:
            epoch, draws = (draws // period) * C, draws % period
        while draws >= (size := self.part_size(epoch)):
            draws -= size
            epoch += 1
        return epoch, draws

    def draws(self, start: int = 0) -> Iterator[tuple[int, Record]]:
        """(epoch, row) of each draw from draw ``start`` on, without end."""
        epoch, skip = self.locate(start)
        release = ShardRelease()
        try:
            while True:
                rows = self.epoch_rows(epoch, release)
                for _ in range(skip):  # replayed without opening an image
                    release.drawn(next(rows))
                skip = 0
                for rec in rows:
                    yield epoch, rec  # the caller loads its image before asking for the next
                    release.drawn(rec)
                epoch += 1
        finally:  # a stream stopped (or dropped) lets go of the shards it still held
            release.close()


class ShardRelease:
    """Drops a shard's member index (:mod:`xlip.data.storage` caches one per tar and process)
    once every row a stream read from it has been drawn and the stream reads another shard: a
    worker then holds the indexes of the few shards its shuffle buffer spans, not of every
    shard it has read."""

    def __init__(self) -> None:
        self.left: Counter[str] = Counter()  # tar → rows read into the buffer, not yet drawn
        self.reading = ""  # the tar the part is reading now

    def entering(self, rows: Iterable[Record]) -> Iterator[Record]:
        for rec in rows:
            tar = _tar(rec)
            if tar and tar != self.reading:
                done, self.reading = self.reading, tar
                self._release(done)
            if tar:
                if tar not in self.left:
                    hold_shard(tar)
                self.left[tar] += 1
            yield rec

    def drawn(self, rec: Record) -> None:
        tar = _tar(rec)
        if tar:
            self.left[tar] -= 1
            self._release(tar)

    def close(self) -> None:
        for tar in list(self.left):
            forget_shard(tar)
        self.left.clear()
        self.reading = ""

    def _release(self, tar: str) -> None:
        if tar and tar != self.reading and self.left[tar] <= 0:
            forget_shard(tar)
            del self.left[tar]


def _tar(rec: Record) -> str:
    """The shard a row's image is in ('' for a text-only row)."""
    parts = split_shard_path(rec.image) if rec.image else None
    return parts[0] if parts else ""


# ---------------------------------------------------------------------------------------------
# the training dataset


class ShardStream(IterableDataset):
    """Batches (lists of :class:`Sample`, for :class:`~xlip.data.collate.Collator`) of every
    streamed source of ``cfg``, for one rank; see the module docstring for the order.

    Iterate it through ``DataLoader(stream, batch_size=None, collate_fn=collator,
    num_workers=cfg.data.num_workers)``: it yields this rank's batches ``start`` … ``stop - 1``.
    Offers what the trainer asks of :class:`~xlip.data.dataset.MixedDataset` (``names``,
    :meth:`findings`, :meth:`image_paths`).
    """

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, start: int = 0,
                 stop: int | None = None, train: bool = True, progress: bool = False) -> None:
        self.cfg, self.train = cfg, train
        self.rank, self.world_size = rank, world_size
        self.workers = max(cfg.data.num_workers, 1)
        self.start, self.stop = start, stop
        self.sources = cfg.data.sources
        self.names = [s.name or s.kind for s in self.sources]
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"data source names repeat: {self.names}; set "
                              "data.sources[i].name")
        if not all(s.shards for s in self.sources):
            raise ConfigError("ShardStream reads data.sources[].shards only; a manifest source "
                              "trains through MixedDataset")
        indexed = [index_source(s, cfg, progress) for s in self.sources]
        self.index = [i for i, _, _ in indexed]
        self._labels = sorted(set().union(*(lab for _, lab, _ in indexed)))
        self._images = [p for _, _, paths in indexed for p in paths]
        self.quota = quotas([s.weight for s in self.sources], cfg.data.batch_size)

    def findings(self) -> list[str]:
        """Every label that occurs in the training sources, sorted."""
        return list(self._labels)

    def image_paths(self) -> list[str]:
        """The sources' image paths when data.normalize=dataset is to be measured, else []."""
        return list(self._images)

    def source_stream(self, s: int, consumer: int) -> SourceStream:
        return SourceStream(self.sources[s], s, self.index[s], self.cfg,
                            Consumer(consumer, self.world_size * self.workers))

    def __iter__(self) -> Iterator[list[Sample]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.workers:
            raise ConfigError(f"the stream was built for data.num_workers="
                              f"{self.cfg.data.num_workers} but runs in {workers} DataLoader "
                              "workers; pass num_workers=cfg.data.num_workers")
        first = self.start + worker  # DataLoader asks worker 0 first, then round-robin
        w = first % self.workers
        consumer = self.rank * self.workers + w
        j = (first - w) // self.workers  # batches this consumer made before
        streams = [self.source_stream(s, consumer).draws(j * q) for s, q in enumerate(self.quota)]
        b = first
        while self.stop is None or b < self.stop:
            yield [self.sample(s, *next(streams[s])) for s, q in enumerate(self.quota)
                   for _ in range(q)]
            b += self.workers

    def sample(self, s: int, epoch: int, rec: Record) -> Sample:
        seed = hash_int(f"{self.cfg.train.seed}/{s}/{epoch}/{rec.row}")
        try:
            return make_sample(self.cfg, self.train, s, self.sources[s].kind, rec, rec, seed)
        except ImageError as err:
            shard = int(Path(_tar(rec)).stem.split("-")[1])  # shard-000003.tar → 3
            raise ShardError(f"{rec.image}: {err.reason}; the shard is damaged: "
                             f"{self.index[s].folder.rebuild(shard)}") from None

    def position(self, batches: int) -> dict[str, Any]:
        """Where the stream stands after ``batches`` batches of every rank: plain values for
        the checkpoint (``batches``, ``world_size``, ``workers``; per source its ``epoch`` (the
        lowest any consumer is in), ``rows`` drawn by all ranks, and (epoch, rows
        into the part) of every consumer in ``consumers``)."""
        C = self.world_size * self.workers
        out: dict[str, Any] = {"kind": "shards", "batches": batches,
                               "world_size": self.world_size, "workers": self.workers,
                               "sources": {}}
        for s, q in enumerate(self.quota):
            parts = []
            for c in range(C):
                w = c % self.workers
                made = len(range(w, batches, self.workers))  # batches of this consumer
                parts.append(list(self.source_stream(s, c).locate(made * q)))
            out["sources"][self.names[s]] = {"epoch": min(e for e, _ in parts),
                                             "rows": batches * q * self.world_size,
                                             "consumers": parts, **self.layout(s)}
        return out

    def layout(self, s: int) -> dict[str, Any]:
        """What source ``s``'s parts of an epoch depend on besides ranks and workers: its
        usable rows, their spread over the shards, its rows per batch, the shuffle buffer."""
        index = self.index[s]
        return {"usable_rows": index.rows, "quota": self.quota[s],
                "shuffle_buffer": self.cfg.data.shuffle_buffer,
                "shards_sha": hash_int(";".join(f"{a}:{n}" for a, n in
                                                zip(index.shards, index.counts)))}

    def check_position(self, saved: dict[str, Any], batches: int) -> None:
        """Refuse to resume a position saved with other ranks, workers or batches."""
        want = {"world_size": self.world_size, "workers": self.workers, "batches": batches}
        diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
        if diff:
            shown = ", ".join(f"{k} {a} → {b}" for k, (a, b) in diff.items())
            raise ConfigError(f"the checkpoint's stream position does not fit this run ({shown}):"
                              " each (rank, worker) streams its own part of every epoch, so "
                              "resume with the checkpoint's number of processes and "
                              "data.num_workers")
        for s, name in enumerate(self.names):
            was = saved.get("sources", {}).get(name, {})
            diff = {k: (was[k], v) for k, v in self.layout(s).items() if k in was and was[k] != v}
            if diff:
                shown = ", ".join(f"{k} {a} → {b}" for k, (a, b) in diff.items()
                                  if k != "shards_sha") or "rows per shard"
                raise ConfigError(f"source {name}: the stream's epochs are cut differently from "
                                  f"the checkpoint's ({shown}): its rows would be drawn twice "
                                  "or never. Resume with the shard folder and data.batch_size, "
                                  "weights and shuffle_buffer the checkpoint was trained with, "
                                  "or start a new run")


def streamed(cfg: Config) -> bool:
    """Whether ``cfg`` trains from shard streams (data.sources[].shards)."""
    return bool(cfg.data.sources) and all(s.shards for s in cfg.data.sources)


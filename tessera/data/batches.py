"""Training batches: fixed-length packed sequences per source (megatron-core GPTDataset) blended
across sources by a ``BlendSchedule``, sliced for data parallelism, resumable exactly.

One packed sample is a window of ``seq_length + 1`` ids over the source's shuffled, concatenated
documents (megatron's document / sample / shuffle indices, cached as .npy beside the dataset) and
becomes ``tokens = w[:-1]``, ``labels = w[1:]``, ``loss_mask``, ``position_ids`` and optionally
``attention_mask`` ([1, s, s] bool, True = masked, megatron's convention). Document boundaries are
the ``<eos>`` ids: ``reset_position_ids`` / ``reset_attention_mask`` restart positions / attention
after each, ``eod_mask_loss`` drops the loss on the token after it.

Fine-tuning data (docs/finetuning.md): a dataset with ``loss_mask.{bin,idx}`` (``pretokenize --loss-on``)
multiplies ``loss_mask`` by the mask of each label; ``document_mask`` adds the sample's document
boundaries (from megatron's document index, not from ``<eos>``) as ``cu_seqlens`` / ``max_seqlen``,
restarts ``position_ids`` at each document and drops the labels that cross into the next document. The
iterator then flattens a micro-batch's boundaries into one THD row (``tessera.model.document_mask``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tessera.data.blend import BlendSchedule, consumed_before, plan, slot_indices
from tessera.data.pretokenize import DATA_PREFIX, MASK_PREFIX, load_stats
from tessera.tokenizers.vocab import Vocabulary
from tessera.utils import rank

log = logging.getLogger("tessera.data")


class BatchError(ValueError):
    pass


@dataclass(frozen=True)
class PackingConfig:
    seq_length: int = 2048
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = False  # [1, s, s] per sample is big; attention kernels build it themselves
    shuffle_seed: int = 1234  # megatron's document / sample shuffle (fixed per dataset, cached on disk)
    cache_dir: str | None = None  # default: DATASET/cache
    # a token attends only to its own document: samples carry cu_seqlens / max_seqlen (THD packing)
    document_mask: bool = False


class _MegatronTokenizerView:
    """The three attributes GPTDataset reads from a tokenizer, taken from our Vocabulary."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab_size = vocab.padded_size
        self.eod = vocab.eos_id
        self.pad = vocab.pad_id
        self.eos = vocab.eos_id
        # megatron hashes these into the index-cache file names
        self.unique_identifiers = {"class": "tessera.Vocabulary", **vocab.to_dict()}

    @property
    def special_tokens_dict(self) -> dict:
        return {"eos_token": self.eos}


class PackedSource:
    """One pretokenized dataset (``tessera data pretokenize`` output) as packed training samples.

    ``num_samples``: how many samples to index (several shuffled epochs if more than one epoch
    holds); None = one epoch. Reading past the end wraps around (the same order again)."""

    def __init__(self, path: str | Path, packing: PackingConfig, num_samples: int | None = None, name: str | None = None):
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        from megatron.core.datasets.utils import Split

        self.path = Path(path)
        self.name = name or self.path.name
        self.stats = load_stats(self.path)  # raises for an incomplete dataset
        self.vocab = Vocabulary.load(self.path)
        self.packing = packing
        prefix = str(self.path / DATA_PREFIX)
        config = GPTDatasetConfig(
            random_seed=packing.shuffle_seed,
            sequence_length=packing.seq_length,
            blend=([prefix], None),
            split="1,0,0",
            path_to_cache=packing.cache_dir,
            tokenizer=_MegatronTokenizerView(self.vocab),
            reset_position_ids=packing.reset_position_ids,
            reset_attention_mask=packing.reset_attention_mask,
            eod_mask_loss=packing.eod_mask_loss,
            # megatron builds the dense mask as a float s x s matrix with a Python loop over documents
            # (its cost: docs/benchmarks.md); _attention_mask below gives the same bool mask vectorised
            create_attention_mask=False,
        )
        indexed = IndexedDataset(prefix, multimodal=False, mmap=True)
        n_docs = len(indexed.document_indices) - 1
        if n_docs == 0:
            raise BatchError(f"{self.path}: dataset has no documents")
        self.indexed = indexed
        self.mask = _open_mask(self.path, indexed)

        def build():
            return GPTDataset(indexed, prefix, np.arange(n_docs, dtype=np.int32), num_samples, Split.train, config)

        # megatron's index caches: rank 0 builds and saves them, the others load after a barrier
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            if rank() == 0:
                self.dataset = build()
            dist.barrier()
            if rank() != 0:
                self.dataset = build()
        else:
            self.dataset = build()
        if len(self.dataset) == 0:
            raise BatchError(
                f"{self.path}: {self.stats['tokens']} tokens make no sample of {packing.seq_length + 1} tokens"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.sample(i)

    def sample(self, i: int, mask_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Sample ``i`` (wrapping); with ``create_attention_mask`` the [1, s, s] mask is written into
        ``mask_out`` when given (a slice of a batch buffer: saves a copy of s * s bytes)."""
        j = int(i) % len(self.dataset)
        sample = self.dataset[j]
        if self.packing.create_attention_mask:
            sample["attention_mask"] = _attention_mask(
                sample["tokens"], self.vocab.eos_id, self.packing.reset_attention_mask, mask_out
            )
        if self.mask is None and not self.packing.document_mask:
            return sample  # megatron's sample as it is
        parts = window_parts(self.dataset, self.indexed, j)
        window = self.packing.seq_length + 1
        if self.mask is not None:
            m = np.zeros(window, dtype=np.float32)  # megatron pads a short window: no targets there
            got = np.concatenate([self.mask.get(d, offset=o, length=n) for d, o, n in parts])
            m[: got.size] = got
            sample["loss_mask"] = sample["loss_mask"] * torch.from_numpy(m[1:])
        if self.packing.document_mask:
            sample.update(_document_boundaries(parts, self.packing.seq_length, sample))
        return sample


def _open_mask(path: Path, indexed) -> object | None:
    """``PATH/loss_mask`` (uint8, one sequence per document of the data), checked against the data; None
    when the dataset has none (every token is a target)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, get_idx_path

    prefix = str(path / MASK_PREFIX)
    if not Path(get_idx_path(prefix)).is_file():
        return None
    mask = IndexedDataset(prefix, multimodal=False, mmap=True)
    if not np.array_equal(mask.document_indices, indexed.document_indices) or \
            not np.array_equal(mask.sequence_lengths, indexed.sequence_lengths):
        raise BatchError(f"{path}/{MASK_PREFIX}: its documents and lengths differ from {path}/{DATA_PREFIX}'s; "
                         "pretokenize the dataset again")
    return mask


def window_parts(dataset, indexed, idx: int) -> list[tuple[int, int, int]]:
    """(document, offset, length) of the document pieces that megatron's ``GPTDataset`` sample ``idx`` is
    cut from, in order (its shuffle / sample / document indices, the same arithmetic as its
    ``_query_document_sample_shuffle_indices``); the lengths add up to the window (``seq_length + 1``)
    unless megatron pads the sample."""
    if dataset.shuffle_index is None:  # megatron maps its index files on the first read
        dataset[idx]
    k = dataset.shuffle_index[idx]
    beg, beg_off = (int(x) for x in dataset.sample_index[k])
    end, end_off = (int(x) for x in dataset.sample_index[k + 1])
    extra = int(dataset.config.add_extra_token_to_sequence)
    if beg == end:
        return [(int(dataset.document_index[beg]), beg_off, end_off - beg_off + extra)]
    parts = []
    for n in range(beg, end + 1):
        doc = int(dataset.document_index[n])
        off = beg_off if n == beg else 0
        length = int(indexed.sequence_lengths[doc]) - off if n < end else end_off + extra
        parts.append((doc, off, length))
    return parts


def _document_boundaries(parts: list[tuple[int, int, int]], seq_length: int, sample: dict) -> dict:
    """cu_seqlens / max_seqlen of the sample's ``seq_length`` tokens, position_ids restarting at each
    document, and loss_mask without the labels that lie in the next document (the last token of a
    document predicting the next one's first)."""
    lengths = [n for _, _, n in parts]
    starts = np.cumsum(lengths)[:-1]  # window positions where a new document begins
    loss_mask = sample["loss_mask"].clone()
    loss_mask[torch.from_numpy(starts[starts <= seq_length] - 1)] = 0.0
    tok = list(lengths)
    if sum(tok) == seq_length + 1:  # the tokens are the window without its last id (gone if it was alone)
        tok[-1] -= 1
        if tok[-1] == 0:
            tok.pop()
    tok[-1] += seq_length - sum(tok)  # megatron's padding of a short window joins the last document
    cu = np.concatenate([[0], np.cumsum(tok)]).astype(np.int32)
    position_ids = torch.from_numpy(np.arange(seq_length) - np.repeat(cu[:-1].astype(np.int64), tok))
    return {"loss_mask": loss_mask, "position_ids": position_ids, "cu_seqlens": torch.from_numpy(cu),
            "max_seqlen": torch.tensor(max(tok))}


def _attention_mask(tokens: torch.Tensor, eod: int, reset: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """megatron's left-to-right mask, [1, s, s] bool, True = masked; with ``reset`` a token also
    cannot see anything at or before an earlier ``eod`` (equal to megatron's, see the tests).
    Built as a fill plus one causal block copy per document: memory-bound, not compute-bound."""
    s = tokens.numel()
    causal = _causal(s)
    out = torch.empty((1, s, s), dtype=torch.bool) if out is None else out
    if not reset:
        out[0].copy_(causal)
        return out
    out.fill_(True)
    ends = (torch.nonzero(tokens == eod).flatten() + 1).tolist()
    start = 0
    for end in [e for e in ends if e < s] + [s]:
        n = end - start
        out[0, start:end, start:end] = causal[:n, :n]
        start = end
    return out


_CAUSAL: dict[int, torch.Tensor] = {}


def _causal(s: int) -> torch.Tensor:
    if s not in _CAUSAL:  # one per sequence length; read-only
        _CAUSAL[s] = torch.triu(torch.ones((s, s), dtype=torch.bool), diagonal=1)
    return _CAUSAL[s]


def flatten_boundaries(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], seq_length: int) -> dict[str, torch.Tensor]:
    """Per-row (cu_seqlens, max_seqlen) -> those of the micro-batch as ONE THD row of ``len(rows) * seq_length``
    tokens (Megatron-LM's ``flatten_batch_for_packed_sequences``): row r's boundaries shifted by r * seq_length."""
    cu = [rows[0][0][:1]] + [c[1:] + r * seq_length for r, (c, _) in enumerate(rows)]
    return {"cu_seqlens": torch.cat(cu).to(torch.int32), "max_seqlen": torch.stack([m for _, m in rows]).max()}


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class BlendedBatchIterator:
    """Micro-batches for one data-parallel rank of a blended, packed stream.

    Global step t has ``global_batch`` slots (composition: ``blend.plan``); rank r owns slots
    ``[r * global_batch / dp_size, (r + 1) * global_batch / dp_size)`` and yields them as
    ``global_batch / (dp_size * micro_batch)`` micro-batches, each a dict of
    ``tokens, labels, loss_mask, position_ids [micro, seq]`` (+ ``attention_mask``) plus
    ``source`` (int64 [micro], index into ``source_names``) and ``step``; with ``document_mask`` also
    ``cu_seqlens`` (int32 [documents + 1] over the micro-batch flattened row-major into one row of
    micro * seq tokens) and ``max_seqlen`` (int64, the longest document): ``tessera.model.document_mask``.

    Resume: ``state_dict()`` after any micro-batch, ``load_state_dict`` on a fresh iterator (any
    sources/ranks built the same way) continues with the next micro-batch; or construct with
    ``start_step=t`` to start at step t from (seed, t) alone (replays the draws, no data read).
    """

    def __init__(
        self,
        sources: Mapping[str, PackedSource] | Sequence[PackedSource],
        schedule: BlendSchedule,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
    ) -> None:
        if not isinstance(sources, Mapping):
            sources = {s.name: s for s in sources}
        missing = [n for n in schedule.sources if n not in sources]
        if missing:
            raise BatchError(f"the blend names source(s) {missing} that were not given; given: {list(sources)}")
        if global_batch % (dp_size * micro_batch):
            raise BatchError(f"global_batch {global_batch} is not divisible by dp_size {dp_size} x micro_batch {micro_batch}")
        if not 0 <= dp_rank < dp_size:
            raise BatchError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.sources = [sources[n] for n in schedule.sources]
        self.source_names = list(schedule.sources)
        vocabs = {s.vocab for s in self.sources}
        if len(vocabs) != 1:
            raise BatchError(f"sources use different vocabularies: {[str(s.path) for s in self.sources]}")
        self.vocab = self.sources[0].vocab
        seqs = {s.packing.seq_length for s in self.sources}
        if len(seqs) != 1:
            raise BatchError(f"sources packed with different seq_length: {seqs}")
        if len({s.packing.document_mask for s in self.sources}) != 1:
            raise BatchError("sources packed with and without document_mask: a micro-batch needs one layout")
        self.document_mask = self.sources[0].packing.document_mask
        self.seq_length = seqs.pop()
        self.schedule, self.seed = schedule, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.micro_per_step = self.per_rank // micro_batch
        self.step = start_step
        self.micro = 0  # next micro-batch within self.step
        self.consumed = consumed_before(schedule, seed, start_step, global_batch)  # at the start of self.step
        self._cache_step = -1

    # ---- the pure functions of (seed, step) --------------------------------------------------
    def step_plan(self, step: int, consumed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source of every global slot, sample index of every global slot) for ``step``."""
        src = plan(self.schedule, self.seed, step, self.global_batch)
        return src, slot_indices(src, consumed)

    def _plan_now(self) -> tuple[np.ndarray, np.ndarray]:
        if self._cache_step != self.step:
            self._cache = self.step_plan(self.step, self.consumed)
            self._cache_step = self.step
        return self._cache

    # ---- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        src, idx = self._plan_now()
        lo = self.dp_rank * self.per_rank + self.micro * self.micro_batch
        sel = range(lo, lo + self.micro_batch)
        masks = None
        if any(s.packing.create_attention_mask for s in self.sources):
            # each sample writes its mask straight into the batch buffer (no stacking copy)
            masks = torch.empty((self.micro_batch, 1, self.seq_length, self.seq_length), dtype=torch.bool)
        samples = [self.sources[src[j]].sample(idx[j], None if masks is None else masks[k])
                   for k, j in enumerate(sel)]
        if masks is not None:
            for sm in samples:
                sm.pop("attention_mask", None)
        rows = [(sm.pop("cu_seqlens"), sm.pop("max_seqlen")) for sm in samples] if self.document_mask else None
        batch = collate(samples)
        if rows is not None:
            batch.update(flatten_boundaries(rows, self.seq_length))
        if masks is not None:
            batch["attention_mask"] = masks
        batch["source"] = torch.from_numpy(src[lo : lo + self.micro_batch].copy())
        batch["step"] = torch.tensor(self.step)
        self.micro += 1
        if self.micro == self.micro_per_step:
            self.consumed = self.consumed + np.bincount(src, minlength=len(self.sources))
            self.step += 1
            self.micro = 0
        return batch

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """All of this rank's micro-batches of the current step (call at a step boundary)."""
        if self.micro:
            raise BatchError("next_step() called in the middle of a step")
        return [next(self) for _ in range(self.micro_per_step)]

    # ---- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "seed": self.seed,
            "step": self.step,
            "micro": self.micro,
            "global_batch": self.global_batch,
            "consumed": {n: int(c) for n, c in zip(self.source_names, self.consumed, strict=True)},
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != 1:
            raise BatchError(f"unknown data-iterator state version {state.get('version')!r}")
        if state["seed"] != self.seed or state["global_batch"] != self.global_batch:
            raise BatchError(
                f"state is for seed {state['seed']} / global_batch {state['global_batch']}, "
                f"this iterator has {self.seed} / {self.global_batch}"
            )
        if set(state["consumed"]) != set(self.source_names):
            raise BatchError(f"state sources {sorted(state['consumed'])} != {sorted(self.source_names)}")
        self.step, self.micro = int(state["step"]), int(state["micro"])
        self.consumed = np.array([int(state["consumed"][n]) for n in self.source_names], dtype=np.int64)
        self._cache_step = -1


def open_sources(
    paths: Mapping[str, str | Path], packing: PackingConfig, num_samples: Mapping[str, int] | None = None
) -> dict[str, PackedSource]:
    return {n: PackedSource(p, packing, (num_samples or {}).get(n), name=n) for n, p in paths.items()}

"""Batched, KV-cached, modality-aware decoding of token ids.

One step for the whole batch: the decoder's next-token logits for every row go through the
modality-masked sampling kernel (``tessera.kernels.sampling``), which applies the decoding state
machine (text / inside an image with k codes written; ``<boi>`` only where a whole image fits;
exactly ``image_tokens_per_image`` codes then a forced ``<eoi>``), classifier-free guidance for image
tokens, per-modality temperature / top-k / top-p, and writes the next token and the new state in
place. The engine only builds the rows, feeds tokens back into the cache and decides when a row is
finished.

Row layout with guidance (what the kernel expects): ``n`` groups, rows ``[0, n)`` conditional,
``[n, 2n)`` unconditional, ``[2n, 3n)`` image-only (three-stream guidance only). Every row of a group
receives the group's token, so the streams stay in lock step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tessera.generate.config import GenerationConfig
from tessera.generate.decoder import KVCacheDecoder
from tessera.kernels.sampling import DecodeState, ModalitySampling, SamplingParams, TokenRules, sample_step
from tessera.tokenizers.vocab import Vocabulary
from tessera.utils import torch_dtype

# on_token(sequence_index, token_id): called once per generated token of each prompt, in order.
TokenCallback = Callable[[int, int], None]



class GenerationError(ValueError):
    pass


@dataclass
class GeneratedSequence:
    # The conditional row's prompt as decoded (image mode: with the forced <boi> appended), so
    # ``prompt_ids + new_ids`` is always the whole well-formed sequence.
    prompt_ids: list[int]
    new_ids: list[int]
    finish_reason: str  # "eos" | "stop" (the stop sequence, e.g. a chat turn's END) | "length" | "image"
    # Tokens of an image still open at the end of the prompt (image mode: the forced <boi>); the
    # generated ids continue it, so decode ``open_prefix + new_ids``.
    open_prefix: list[int]


@dataclass
class GenerationStats:
    prompts: int = 0
    rows: int = 0  # decoded rows (prompts x guidance streams)
    prompt_tokens: int = 0
    new_tokens: int = 0  # generated tokens over all prompts (guidance rows not counted)
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    time_to_first_token_s: float = 0.0
    step_backend: str = ""  # how the decode steps ran (KVCacheDecoder.step_backend, read after decoding)

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["tokens_per_s"] = self.tokens_per_s
        return d


@dataclass
class _Plan:
    """Rows to decode: ids per row, the group count and the guidance mode (1, 2 or 3 streams)."""

    rows: list[list[int]]
    groups: int
    streams: int
    limits: list[int]  # per group: the total length (prompt + generated) the row may reach
    initial_mode: list[int]
    initial_codes: list[int]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16
    try:
        return torch_dtype(name)
    except ValueError:
        raise GenerationError(f"unknown dtype {name!r}; use auto|fp32|bf16|fp16") from None


class GenerationEngine:
    """``GenerationEngine(gpt_module, vocab, context_length).generate(prompt_ids, cfg)``.

    ``context_length`` is the model's trained sequence length: no row ever exceeds it.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        vocab: Vocabulary,
        context_length: int,
        dtype: torch.dtype | str = "auto",
        device: torch.device | str | None = None,
        swin_norm: bool | None = None,
        backend: str = "auto",
        fused_cpu_step: bool | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        if vocab is None:
            raise GenerationError("generation needs the checkpoint's vocabulary (vocab.json)")
        first = next(module.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = resolve_dtype(dtype, self.device) if isinstance(dtype, str) else dtype
        # fused_cpu_step: the CPU decode step as one C call (None: when the model allows; KVCacheDecoder)
        # cuda_graphs: the GPU decode step replayed as CUDA graphs (None: on CUDA; KVCacheDecoder)
        self.decoder = KVCacheDecoder(module, dtype=self.dtype, device=self.device, swin_norm=swin_norm,
                                      fused_cpu_step=fused_cpu_step, cuda_graphs=cuda_graphs)
        if self.decoder.vocab_size < vocab.size:
            raise GenerationError(
                f"model output has {self.decoder.vocab_size} ids but the vocabulary has {vocab.size}"
            )
        self.vocab = vocab
        self.backend = backend  # sampling kernel: Triton on CUDA, the PyTorch reference elsewhere
        # Queue each decode step before waiting for the previous step's tokens on the host (CUDA: the
        # GPU is never idle while the host streams tokens); on the CPU the step runs when called, so the
        # loop waits first and skips the step after the last token.
        self.overlap_host = self.device.type == "cuda"
        self.context_length = int(context_length)
        table = vocab.modality_table(padded=True)
        if table.numel() < self.decoder.vocab_size:  # output wider than the vocabulary: extra ids are special
            table = torch.cat([table, torch.full((self.decoder.vocab_size - table.numel(),), 2, dtype=torch.int8)])
        self.modality_table = table[: self.decoder.vocab_size].to(self.device)

    # ---- prompt analysis ---------------------------------------------------------------------
    def _check_prompt(self, ids: Sequence[int], index: int) -> None:
        if not ids:
            raise GenerationError(f"prompt {index} is empty (it needs at least <bos>)")
        bad = [i for i in ids if not 0 <= int(i) < self.vocab.size]
        if bad:
            raise GenerationError(f"prompt {index}: ids outside the vocabulary [0, {self.vocab.size}): {bad[:5]}")

    def _open_image(self, ids: Sequence[int]) -> int | None:
        """Codes already written when the prompt ends inside an image, else None."""
        v = self.vocab
        last_boi = max((k for k, t in enumerate(ids) if t == v.boi_id), default=None)
        if last_boi is None or any(t == v.eoi_id for t in ids[last_boi:]):
            return None
        return len(ids) - last_boi - 1

    def _image_only(self, ids: Sequence[int]) -> list[int]:
        """The prompt with its text dropped: <bos> and the complete <boi> codes <eoi> spans."""
        v = self.vocab
        out = [v.bos_id]
        inside = False
        for t in ids:
            if t == v.boi_id:
                inside = True
            if inside:
                out.append(t)
            if t == v.eoi_id:
                inside = False
        return out

    def plan(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> _Plan:
        v = self.vocab
        conds: list[list[int]] = []
        for n, p in enumerate(prompts):
            p = [int(t) for t in p]
            self._check_prompt(p, n)
            if cfg.mode == "image" and self._open_image(p) is None:
                p = p + [v.boi_id]  # text-to-image: force the image to start right after the prompt
            conds.append(p)
        # Three streams only pay off when some prompt holds a complete image to condition on.
        has_images = any(v.boi_id in self._image_only(p) for p in conds)
        guidance = cfg.mode != "text"
        three = guidance and cfg.cfg_image_scale is not None and has_images
        if three:
            streams = 3
        elif guidance and (cfg.cfg_scale != 1.0 or cfg.cfg_force):
            streams = 2
        else:
            streams = 1
        rows = list(conds)
        if streams >= 2:
            # Unconditional: <bos> (+ the open image's tokens so far, e.g. the forced <boi>).
            for p in conds:
                k = self._open_image(p)
                rows.append([v.bos_id] + (p[len(p) - k - 1 :] if k is not None else []))
        if streams == 3:
            for p in conds:
                k = self._open_image(p)
                head = p[: len(p) - k - 1] if k is not None else p
                rows.append(self._image_only(head) + (p[len(p) - k - 1 :] if k is not None else []))
        limits = []
        for n, p in enumerate(conds):
            if len(p) >= self.context_length:
                raise GenerationError(
                    f"prompt {n} has {len(p)} tokens; the model's context is {self.context_length} "
                    "(leave room for at least one new token)"
                )
            limits.append(min(self.context_length, len(p) + cfg.max_new_tokens))
            k = self._open_image(p)
            if cfg.mode == "image" and limits[-1] - len(p) < v.image_tokens_per_image - (k or 0) + 1:
                raise GenerationError(
                    f"prompt {n}: an image needs {v.image_tokens_per_image + 1 - (k or 0)} more tokens but only "
                    f"{limits[-1] - len(p)} fit (max_new_tokens {cfg.max_new_tokens}, context {self.context_length})"
                )
        modes, codes = [], []
        for p in conds:
            k = self._open_image(p)
            modes.append(0 if k is None else 1)
            codes.append(0 if k is None else k)
            if k is not None and k > v.image_tokens_per_image:
                raise GenerationError(f"prompt ends inside an image that already has {k} codes")
        return _Plan(rows, len(conds), streams, limits, modes, codes)

    # ---- decoding ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: GenerationConfig,
        on_token: TokenCallback | None = None,
        progress: Callable[[int], None] | None = None,
        stop: Sequence[int] | None = None,
    ) -> tuple[list[GeneratedSequence], GenerationStats]:
        """Decode every prompt (lists of vocabulary ids, normally starting with ``<bos>``).

        ``stop``: ids that end a row once written (a chat template's END, ``ChatTemplate.stop_ids``) in place
        of ``<eos>``. One id is the sampling kernel's stop token (its ``eos_id`` rule: allowed in text mode
        even when it is a special id, which text mode otherwise masks, and the row is done once it is
        written); a longer sequence (text markers) is matched on the host as the tokens arrive."""
        cfg.check()
        v = self.vocab
        stop = [int(t) for t in stop] if stop else None
        if stop is not None and not all(0 <= t < v.size for t in stop):
            raise GenerationError(f"stop ids {stop} are outside the vocabulary [0, {v.size})")
        stop_id = stop[0] if stop is not None and len(stop) == 1 else v.eos_id
        plan = self.plan(prompts, cfg)
        n, streams = plan.groups, plan.streams
        rows = plan.rows
        dev = self.device
        stats = GenerationStats(prompts=n, rows=len(rows), prompt_tokens=sum(len(r) for r in rows[:n]))

        width = max(len(r) for r in rows)
        budget = max(lim - len(p) for lim, p in zip(plan.limits, rows[:n], strict=True))
        ids = torch.full((len(rows), width), v.pad_id, dtype=torch.long)
        pad = torch.empty(len(rows), dtype=torch.long)
        for r, seq in enumerate(rows):
            ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            pad[r] = width - len(seq)
        self.decoder.allocate(len(rows), width + budget)

        # Decoding state per row (the kernel reads the conditional rows and writes every row of a
        # group). ``position`` is expressed against one shared limit K so that each prompt's own limit
        # holds: position = K - (limit - length); the kernel marks a row done when it reaches K.
        K = self.context_length
        rules = TokenRules(
            modality_table=self.modality_table, boi_id=v.boi_id, eoi_id=v.eoi_id, eos_id=stop_id,
            pad_id=v.pad_id, image_tokens_per_image=v.image_tokens_per_image, max_seq_len=K,
        )
        params = SamplingParams(
            text=ModalitySampling(cfg.text.temperature, cfg.text.top_k, cfg.text.top_p),
            image=ModalitySampling(cfg.image.temperature, cfg.image.top_k, cfg.image.top_p),
            cfg_groups=streams,
            cfg_scale=(cfg.cfg_image_scale if streams == 3 else cfg.cfg_scale),
            cfg_scale_text=cfg.cfg_scale,
        )
        lengths = [len(p) for p in rows[:n]]
        state = DecodeState(
            mode=torch.tensor(plan.initial_mode * streams, dtype=torch.int32, device=dev),
            codes_written=torch.tensor(plan.initial_codes * streams, dtype=torch.int32, device=dev),
            position=torch.tensor(
                [K - (lim - ln) for lim, ln in zip(plan.limits, lengths, strict=True)] * streams,
                dtype=torch.int32, device=dev,
            ),
            done=torch.zeros(n * streams, dtype=torch.int32, device=dev),
        )
        out: list[list[int]] = [[] for _ in range(n)]
        room = [lim - ln for lim, ln in zip(plan.limits, lengths, strict=True)]  # tokens each prompt may add
        reason = ["length"] * n
        finished = [False] * n
        # Generated images per prompt, for max_images: counted on the device from the sampled tokens.
        images_done = torch.zeros(n, dtype=torch.int32, device=dev) if cfg.max_images else None
        link = _TokenLink(n, dev)
        ahead = self.overlap_host

        clock = _Clock(dev)
        logits = self.decoder.prefill(ids, pad)
        clock.mark("prefill")
        step = 0
        while True:
            self._mask_logits(logits, cfg, images_done, n)
            tokens = sample_step(logits, state, rules, params, seed=cfg.seed, offset=step, backend=self.backend)
            head = tokens[:n]
            if cfg.mode == "image":  # one image, then stop: every stream of the group is done after its <eoi>
                state.done.view(streams, n).masked_fill_(head == v.eoi_id, 1)
            if images_done is not None:
                images_done += head == v.eoi_id
            link.send(head)
            step += 1
            if ahead and step < budget:
                # The next step only needs the tokens, which are on the device: queue it before waiting
                # for them on the host. A row's tokens never exceed ``budget``, so this never overruns the
                # cache; after the last token it is one wasted step.
                logits = self.decoder.step(tokens, reuse_output=True)
            new = link.receive()  # the one device -> host transfer of the step
            if step == 1:
                stats.time_to_first_token_s = clock.since_start()
            produced = 0
            for g in range(n):
                if finished[g]:
                    continue
                t = new[g]
                out[g].append(t)
                produced += 1
                if on_token is not None:
                    on_token(g, t)
                if t == stop_id:
                    reason[g] = "eos" if stop is None else "stop"
                elif stop is not None and len(stop) > 1 and out[g][-len(stop):] == stop:
                    reason[g] = "stop"
                elif t == v.eoi_id and cfg.mode == "image":
                    reason[g] = "image"
                elif len(out[g]) < room[g]:  # the kernel's other stop: the prompt's limit is reached
                    continue
                finished[g] = True
            stats.new_tokens += produced
            if progress is not None:
                progress(produced)
            if all(finished):
                break
            if not ahead:
                logits = self.decoder.step(tokens, reuse_output=True)
        clock.mark("end")
        stats.prefill_s = clock.seconds("start", "prefill")
        stats.decode_s = clock.seconds("prefill", "end")
        stats.steps = step
        stats.step_backend = self.decoder.step_backend
        result = []
        for g in range(n):
            k = plan.initial_codes[g] if plan.initial_mode[g] else None
            prefix = rows[g][len(rows[g]) - k - 1 :] if k is not None else []
            result.append(GeneratedSequence(list(rows[g]), out[g], reason[g], prefix))
        return result, stats

    def _mask_logits(
        self, logits: torch.Tensor, cfg: GenerationConfig, images_done: torch.Tensor | None, n: int
    ) -> None:
        """What the kernel's state machine does not know: ``text`` mode, ``max_images`` and
        ``ignore_eos``. The kernel reads text-mode logits from the conditional row, so masking there
        is enough. On the device, in place: no host sync."""
        boi = self.vocab.boi_id
        if cfg.ignore_eos:
            logits[:n, self.vocab.eos_id] = float("-inf")
        if cfg.mode == "text":
            logits[:n, boi] = float("-inf")
        elif images_done is not None:
            logits[:n, boi].masked_fill_(images_done >= cfg.max_images, float("-inf"))


class _TokenLink:
    """The one device -> host transfer per step: the token sampled for each prompt. The host needs
    nothing else: a prompt is finished by ``<eos>``, by image mode's ``<eoi>``, or when its tokens reach
    its room (the kernel's position limit), all known from the tokens. On CUDA it is an asynchronous
    copy into pinned memory and an event, so the host can queue the next decode step before it waits
    (``receive``)."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._tokens: torch.Tensor | None = None
        if self.cuda:
            self._host = torch.empty(n, dtype=torch.long, pin_memory=True)
            self._event = torch.cuda.Event()

    def send(self, tokens: torch.Tensor) -> None:
        if self.cuda:
            self._host.copy_(tokens, non_blocking=True)
            self._event.record()
        else:
            self._tokens = tokens

    def receive(self) -> list[int]:
        if self.cuda:
            self._event.synchronize()
            return self._host.tolist()
        return self._tokens.tolist()


class _Clock:
    """Wall-clock marks; on CUDA, events on the stream, so the prefill is timed where it runs without a
    sync of its own (read after the decode loop's transfers have waited for it)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._t0 = time.perf_counter()
        self._marks: dict[str, float | torch.cuda.Event] = {}
        self.mark("start")

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks[name] = event
        else:
            self._marks[name] = time.perf_counter()

    def since_start(self) -> float:
        """Host seconds since the clock was made (call it after a host sync: time to first token)."""
        return time.perf_counter() - self._t0

    def seconds(self, a: str, b: str) -> float:
        x, y = self._marks[a], self._marks[b]
        if self.cuda:
            y.synchronize()
            return x.elapsed_time(y) / 1e3
        return y - x

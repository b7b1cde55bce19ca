"""Continuous batching over llama.cpp sequence slots.

The engine owns one llama.cpp context shared by a fixed number of slots. Each
`step()` builds one `llama_decode` batch holding the next token of every
generating sequence plus a chunk of prompt for sequences still reading theirs,
then samples one token per sequence that asked for logits. It knows nothing about
TorchServe or HTTP: callers `submit` requests (and get a handle back), call
`step()` (or `run()`), and read back `Update`s.

A slot walks IDLE -> READING_PROMPT -> GENERATING -> IDLE. When it goes idle it
keeps the KV of the tokens it read, so a later request sharing a prefix (the next
turn of the same chat) reads only the rest.
"""

from __future__ import annotations

import codecs
import ctypes
import enum
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import fast_sampling
import llama_cpp
import numpy as np
# The pinned llama-cpp-python's thin owners of the native model/context/batch
# objects: they free native memory in the right order, which we'd otherwise
# re-implement by hand.
from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel

from grammar_sampling import InvalidGrammar, grammar_sampler  # noqa: F401 (InvalidGrammar: submit raises it)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


class PromptTooLong(ValueError):
    """A prompt longer than the room it may take in one slot's context."""

    def __init__(self, n_prompt: int, n_fit: int):
        super().__init__(f"the prompt has {n_prompt} tokens but at most {n_fit} fit")
        self.n_prompt = n_prompt
        self.n_fit = n_fit


@dataclass(frozen=True)
class EngineConfig:
    """What the engine runs with. Every value is given: the defaults live in one place,
    the handler's settings (llama_settings.HandlerSettings, model-config.yaml)."""

    n_slots: int                     # sequences decoded together
    n_ctx_per_slot: int              # context length of each sequence
    n_batch: int                     # most tokens in one llama_decode call
    prefill_chunk: int               # most prompt tokens one sequence adds per step
    n_threads: int                   # CPU threads of llama.cpp
    n_gpu_layers: int                # layers offloaded to a GPU (0 = CPU only)
    main_gpu: int                    # GPU used when offloading
    split_mode: int                  # 0: the whole model on main_gpu; 1: layers spread over all GPUs; 2: rows
    tensor_split: list[float] | None  # share of the model per GPU
    flash_attn: bool                 # also makes batched greedy output equal to single-sequence output
    cache_answers: bool              # keep an answer's KV for the next turn; off: prefill in aligned chunks

    def __post_init__(self):
        for name in ("n_slots", "n_ctx_per_slot", "n_batch", "prefill_chunk", "n_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_slots > self.n_batch:
            # every generating sequence adds a token to each llama_decode batch
            raise ValueError(f"{self.n_slots} slots do not fit in a decode batch of n_batch {self.n_batch} "
                             "tokens: raise n_batch or lower the slots (batchSize)")


@dataclass
class SamplingParams:
    """Built-in sampling values (llama.cpp's usual ones), for what neither the request
    nor the server's configuration sets."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    grammar: str | None = None       # GBNF the answer must follow (structured output, tool calls)
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> bias added to its logit

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with no penalties, grammar or bias: the token is the argmax of the logits, nothing else."""
        return (self.temperature <= 0 and self.repeat_penalty == 1.0
                and not self.presence_penalty and not self.frequency_penalty
                and self.grammar is None and not self.logit_bias)


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False         # end-of-generation tokens do not end the request
    logprobs: int | None = None      # report each token's logprob and this many alternatives (None: no logprobs)
    fork_of: str | None = None       # another request with the same prompt: copy its prompt's KV instead of reading it
    arrived_at: float | None = None  # time.monotonic() when the request reached the caller (None: when submitted)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits),
    and the most likely tokens at its position, best first."""

    token: bytes
    logprob: float
    top: list[tuple[bytes, float]] = field(default_factory=list)


@dataclass(frozen=True)
class RequestTimes:
    """When a request passed each point of its life, as time.monotonic() values."""

    arrived_at: float                # GenerationRequest.arrived_at, else when it was submitted
    started_at: float | None         # its slot began reading its prompt (None: it never got a slot)
    first_token_at: float | None     # its first token was sampled (None: it had none)
    finished_at: float


@dataclass
class Update:
    """What happened to one request since the last update."""

    request_id: str
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float | None = None
    tokens_per_second: float | None = None
    first_token: bool = False        # this update holds the request's first generated token
    logprobs: list[TokenLogprob] = field(default_factory=list)   # of the tokens generated since the last update
    times: RequestTimes | None = None    # on the update that finishes the request

    def merge(self, later: "Update") -> "Update":
        later.text = self.text + later.text
        later.logprobs = self.logprobs + later.logprobs
        later.first_token = self.first_token or later.first_token
        if later.time_to_first_token is None:
            later.time_to_first_token = self.time_to_first_token
        return later


@dataclass(frozen=True)
class SlotStats:
    """One slot at the end of the last step."""

    state: "SlotState"
    context_tokens: int              # tokens whose KV it holds (an idle slot keeps them for the next prompt)
    prompt_tokens_reused: int        # prompt tokens its current (or last) request took from that KV


@dataclass
class EngineStats:
    """Monotonic counters and gauges, read by metrics exporters. The gauges are those of
    the end of the last step."""

    slots_total: int = 0
    slots_active: int = 0
    slots_reading_prompt: int = 0
    slots_generating: int = 0
    requests_waiting: int = 0        # submitted, waiting for a free slot
    slots: list[SlotStats] = field(default_factory=list)
    tokens_prefilled: int = 0
    tokens_reused: int = 0
    tokens_generated: int = 0
    decode_calls: int = 0
    sequences_decoded: int = 0       # sum over decode calls of sequences in the call
    slot_moves: int = 0              # busy slots moved down to keep them together (one KV stream copy each)
    finished: dict = field(default_factory=lambda: {r: 0 for r in (FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR)})

    @property
    def slots_free(self) -> int:
        return self.slots_total - self.slots_active


@dataclass(frozen=True)
class RequestHandle:
    """A submitted request: its id, and a way to cancel it (from any thread)."""

    id: str
    engine: "Engine" = field(repr=False, compare=False)

    def cancel(self) -> None:
        self.engine.cancel(self.id)


class StopStringMatcher:
    """Holds back text that may be the start of a stop string, so a stop
    string never leaks half-way into streamed output."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class SlotState(enum.Enum):
    IDLE = "idle"                        # free; may hold the KV of an earlier prompt
    READING_PROMPT = "reading prompt"    # prefilling its request's prompt, a chunk per step
    GENERATING = "generating"            # one token per step


class _Active:
    """A request from submit until it finishes."""

    def __init__(self, request_id: str, request: GenerationRequest, n_vocab: int, vocab=None):
        self.id = request_id
        self.request = request
        self.submitted_at = time.monotonic()
        self.arrived_at = request.arrived_at if request.arrived_at is not None else self.submitted_at
        self.started_at: float | None = None       # a slot took it
        self.first_token_at: float | None = None
        self.pending_prompt: list[int] = []
        self.n_cached = 0
        self.n_generated = 0
        self.next_token: int | None = None   # sampled, not yet decoded
        # Plain greedy needs no llama.cpp sampler: an argmax over the logits is the same
        # choice (first maximum) without copying the vocabulary into a candidate array,
        # which costs more than the decode itself for many sequences on a GPU.
        self.sampler = None if request.sampling.is_plain_greedy else make_sampler(request.sampling, n_vocab, vocab)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopStringMatcher(request.stop)
        self.logprobs: list[TokenLogprob] = []   # not yet reported

    def take_logprobs(self) -> list[TokenLogprob]:
        taken, self.logprobs = self.logprobs, []
        return taken

    def close(self):
        if self.sampler is not None:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None


class _Slot:
    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self.state = SlotState.IDLE
        self.active: _Active | None = None   # the request it serves, unless IDLE
        self.cached: list[int] = []          # tokens whose KV entries sit at positions 0..n-1
        self.reused = 0                      # prompt tokens its current (or last) request took from `cached`


def make_sampler(p: SamplingParams, n_vocab: int, vocab=None):
    """A llama.cpp sampler for one request (the caller frees it with llama_sampler_free): a
    chain of logit bias, penalties, then top-k/top-p/min-p/temperature/dist or greedy; with
    a grammar, those wrapped in grammar_sampling's sampler (which needs the model's vocab).
    Raises InvalidGrammar for a grammar llama.cpp cannot parse."""
    before = _chain()
    if p.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(p.logit_bias))(
            *(llama_cpp.llama_logit_bias(token, bias) for token, bias in p.logit_bias.items()))
        llama_cpp.llama_sampler_chain_add(before, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
    if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        llama_cpp.llama_sampler_chain_add(before, llama_cpp.llama_sampler_init_penalties(
            n_vocab, p.penalty_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
    if p.grammar is not None:
        return grammar_sampler(vocab, p.grammar, before, _choosing_chain(p))
    return _choosing_chain(p, chain=before)


def _chain():
    return llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())


def _choosing_chain(p: SamplingParams, chain=None):
    """The samplers that pick the token (greedy, or truncation, temperature and dist), added to chain."""
    chain = chain or _chain()
    add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
    if p.temperature <= 0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if p.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0:
        add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(p.temperature))
    seed = p.seed if p.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
    add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


_NOT_YET = object()   # _leader_slot: the leader has not read its prompt yet

_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5   # ggml_log_level (ggml.h)
_log_state = {"shown": False}


@llama_cpp.llama_log_callback
def _quiet_llama_log(level, text, user_data):
    """llama.cpp logs every detail by default (on CUDA a line per decode step); an
    operator needs its warnings and errors, which go to stderr (TorchServe's model_log)."""
    shown = _log_state["shown"] if level == _LOG_CONT else level in (_LOG_WARN, _LOG_ERROR)
    _log_state["shown"] = shown
    if shown:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


class Engine:
    def __init__(self, model_path: str, config: EngineConfig):
        self.config = config
        llama_cpp.llama_log_set(_quiet_llama_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = config.n_gpu_layers
        model_params.main_gpu = config.main_gpu
        model_params.split_mode = config.split_mode
        model_params.use_mmap = True      # the workers of one model share the mapped weights
        if config.tensor_split:
            self._tensor_split = (ctypes.c_float * len(config.tensor_split))(*config.tensor_split)
            model_params.tensor_split = self._tensor_split
        self.model = LlamaModel(path_model=model_path, params=model_params, verbose=False)
        self.vocab = self.model.vocab

        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = config.n_ctx_per_slot * config.n_slots
        ctx_params.n_batch = config.n_batch
        ctx_params.n_ubatch = config.n_batch
        ctx_params.n_seq_max = config.n_slots
        ctx_params.n_threads = config.n_threads
        ctx_params.n_threads_batch = config.n_threads
        # One KV stream per sequence: each slot gets exactly n_ctx_per_slot.
        ctx_params.kv_unified = False
        ctx_params.flash_attn_type = 1 if config.flash_attn else 0
        self.context = LlamaContext(model=self.model, params=ctx_params, verbose=False)
        self.ctx = self.context.ctx
        self.memory = self.context.memory
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.n_vocab = self.model.n_vocab()
        self.batch = LlamaBatch(n_tokens=config.n_batch, embd=0, n_seq_max=1, verbose=False)
        # Without cache_answers, a prompt is read in chunks at fixed positions, [k*chunk, (k+1)*chunk),
        # so that its KV is the same whatever was cached before (see _admit_waiting). A chunk must
        # fit in a batch beside one token of every other slot, hence the cap (prefill_chunk in any
        # usual configuration).
        self.aligned_chunk = None if config.cache_answers else min(
            config.prefill_chunk, config.n_batch - (config.n_slots - 1))

        self.slots = [_Slot(i) for i in range(config.n_slots)]
        self.waiting: deque[_Active] = deque()
        self.by_id: dict[str, _Active] = {}
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self.stats = EngineStats(slots_total=config.n_slots)
        self._publish_gauges()
        self.metadata = self.model.metadata()

    # ---- text <-> tokens -------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        # Not LlamaModel.token_to_piece: it returns a fixed 32-byte buffer, NUL padding included.
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    @property
    def bos_text(self) -> str:
        tok = self.model.token_bos()
        return self.model.token_get_text(tok) if tok >= 0 else ""

    @property
    def eos_text(self) -> str:
        tok = self.model.token_eos()
        return self.model.token_get_text(tok) if tok >= 0 else ""

    # ---- requests ------------------------------------------------------------

    def submit(self, request_id: str, request: GenerationRequest) -> RequestHandle:
        """Queue a request; it takes a slot at the next step that has one free."""
        if request_id in self.by_id:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not request.prompt_tokens:
            raise ValueError("prompt is empty")
        if len(request.prompt_tokens) >= self.n_ctx_seq:   # at least one token must be left to generate
            raise PromptTooLong(len(request.prompt_tokens), self.n_ctx_seq - 1)
        active = _Active(request_id, request, self.n_vocab, self.vocab)
        self.by_id[request_id] = active
        self.waiting.append(active)
        return RequestHandle(request_id, self)

    def cancel(self, request_id: str) -> None:
        """Drop a request; its slot is free at the next step. Safe from any thread."""
        with self._cancel_lock:
            self._cancelled.add(request_id)

    def is_busy(self) -> bool:
        return bool(self.by_id)

    def clear_cache(self) -> None:
        """Forget the KV every idle slot keeps, so the next requests read their prompts
        from the start."""
        for slot in self.slots:
            if slot.state is SlotState.IDLE:
                self._forget_cache(slot)

    # ---- the loop --------------------------------------------------------------

    def run(self, budget_s: float = 0.0) -> dict[str, Update]:
        """Step at least once, then keep stepping while the time budget lasts and
        nothing finished or got its first token (so neither the end of an answer nor
        the time to first token waits for the budget), merging the updates of each request."""
        deadline = time.monotonic() + budget_s
        merged: dict[str, Update] = {}
        while True:
            for rid, upd in self.step().items():
                merged[rid] = merged[rid].merge(upd) if rid in merged else upd
            if not self.by_id or any(u.finished or u.first_token for u in merged.values()):
                return merged
            if time.monotonic() >= deadline:
                return merged

    def step(self) -> dict[str, Update]:
        updates: dict[str, Update] = {}
        self._apply_cancellations(updates)
        self._admit_waiting()
        self._keep_busy_slots_together()
        plan = self._fill_batch()
        if not plan:
            self._publish_gauges()
            return updates
        rc = llama_cpp.llama_decode(self.ctx, self.batch.batch)
        self.stats.decode_calls += 1
        self.stats.sequences_decoded += len(plan)
        if rc != 0:
            for slot, _, _ in plan:
                self._finish(slot, updates, FINISH_ERROR, error=f"llama_decode failed with code {rc}")
                self._forget_cache(slot)
            self._publish_gauges()
            return updates
        for slot, added, _ in plan:
            slot.cached.extend(added)
        for slot, _, logits_index in plan:
            if logits_index is not None:
                self._take_token(slot, self._choose_token(slot.active, logits_index), logits_index, updates)
        self._publish_gauges()
        return updates

    # ---- internals ---------------------------------------------------------------

    def _apply_cancellations(self, updates):
        with self._cancel_lock:
            cancelled, self._cancelled = self._cancelled, set()
        for rid in cancelled:
            active = self.by_id.get(rid)
            if active is None:
                continue
            slot = next((s for s in self.slots if s.active is active), None)
            if slot is not None:
                self._finish(slot, updates, FINISH_CANCELLED)
            else:
                self.waiting.remove(active)
                self._retire(active, updates, FINISH_CANCELLED)

    def _admit_waiting(self):
        for active in list(self.waiting):
            free = [s for s in self.slots if s.state is SlotState.IDLE]
            if not free:
                return
            leader = self._leader_slot(active)
            if leader is _NOT_YET:
                continue            # its leader has not read the prompt yet; others may go first
            self.waiting.remove(active)
            if leader is not None:
                self._fork(leader, free, active)
                continue
            prompt = active.request.prompt_tokens
            # Longest cached prefix wins; keep at least one prompt token to
            # evaluate, since sampling needs fresh logits.
            best = max(free, key=lambda s: _common_prefix(s.cached, prompt))
            reuse = min(_common_prefix(best.cached, prompt), len(prompt) - 1)
            if self.aligned_chunk:
                # Reuse whole chunks only: the rest is read again in the chunks a cold slot
                # reads, so every KV cell comes from the same chunk of the same tokens.
                reuse -= reuse % self.aligned_chunk
            llama_cpp.llama_memory_seq_rm(self.memory, best.seq_id, reuse, -1)
            del best.cached[reuse:]
            best.state, best.active, best.reused = SlotState.READING_PROMPT, active, reuse
            active.started_at = time.monotonic()
            active.n_cached = reuse
            active.pending_prompt = prompt[reuse:]
            self.stats.tokens_reused += reuse

    def _leader_slot(self, active: _Active):
        """For a request forked from another (`fork_of`, the n choices of one prompt): the
        slot of that leader once it has read the prompt, _NOT_YET before, None when there is
        nothing to copy (no leader, or it finished: then its slot's cache serves the prefix)."""
        leader = self.by_id.get(active.request.fork_of) if active.request.fork_of else None
        if leader is None:
            return None
        slot = next((s for s in self.slots if s.active is leader), None)
        if slot is None or slot.state is SlotState.READING_PROMPT:
            return _NOT_YET
        prompt = active.request.prompt_tokens
        return slot if _common_prefix(slot.cached, prompt) >= len(prompt) - 1 else None

    def _fork(self, leader: _Slot, free: list[_Slot], active: _Active):
        """Start `active` on a copy of its leader's prompt KV; it reads only the prompt's last
        token (its first token needs logits of its own)."""
        slot = free[0]   # the lowest sequence id: where _keep_busy_slots_together would move it anyway
        keep = len(active.request.prompt_tokens) - 1
        # A slot has a KV stream of its own, so llama.cpp copies the leader's whole stream, at the next decode.
        llama_cpp.llama_memory_seq_cp(self.memory, leader.seq_id, slot.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1)
        slot.cached = leader.cached[:keep]
        slot.state, slot.active, slot.reused = SlotState.READING_PROMPT, active, keep
        active.started_at = time.monotonic()
        active.n_cached = keep
        active.pending_prompt = active.request.prompt_tokens[keep:]
        self.stats.tokens_reused += keep

    def _keep_busy_slots_together(self):
        """Keep the busy slots (reading or generating) on the lowest sequence ids.

        Each slot has a KV stream of its own (kv_unified off), and llama.cpp then cuts a
        batch into one ubatch per run of consecutive sequence ids in the batch's order
        (llama_batch_allocr::split_equal, sequential): eight chats on slots 0, 3, 9, ...
        cost eight passes over the weights instead of one (an H200 step of 8 chats took
        20 ms instead of 7.6 after a burst of 32 had left them scattered). So the highest
        busy slot moves to the lowest idle one, until no idle slot lies below a busy one:
        llama.cpp copies its whole KV stream there at the next decode (bytes, so the
        answer is unchanged), and the slot it leaves keeps its cache as an idle copy.
        What is lost is the idle slot's cache, at most one per finished or admitted request."""
        while True:
            idle = next((s for s in self.slots if s.state is SlotState.IDLE), None)
            busy = next((s for s in reversed(self.slots) if s.state is not SlotState.IDLE), None)
            if idle is None or busy is None or idle.seq_id > busy.seq_id:
                return
            llama_cpp.llama_memory_seq_cp(self.memory, busy.seq_id, idle.seq_id, -1, -1)
            idle.cached, idle.reused = list(busy.cached), busy.reused
            idle.state, idle.active = busy.state, busy.active
            busy.state, busy.active = SlotState.IDLE, None
            self.stats.slot_moves += 1

    def _fill_batch(self):
        """Fill the llama_batch; returns [(slot, tokens added, logits index or None)]."""
        chunks = []   # (slot, tokens, wants logits)
        for slot in self.slots:
            if slot.state is SlotState.GENERATING:
                chunks.append((slot, [slot.active.next_token], True))
                slot.active.next_token = None
        # Oldest request first, each a chunk, so a long prompt cannot starve the rest.
        reading = sorted((s for s in self.slots if s.state is SlotState.READING_PROMPT),
                         key=lambda s: s.active.submitted_at)
        n = len(chunks)
        for slot in reading:
            room = self.config.n_batch - n
            if room <= 0:
                break
            active = slot.active
            if self.aligned_chunk:
                # up to the next chunk boundary, whole or not at all (the oldest always fits)
                size = min(len(active.pending_prompt), self.aligned_chunk - len(slot.cached) % self.aligned_chunk)
                if size > room:
                    continue
            else:
                size = min(room, self.config.prefill_chunk)
            chunk = active.pending_prompt[:size]
            active.pending_prompt = active.pending_prompt[len(chunk):]
            self.stats.tokens_prefilled += len(chunk)
            chunks.append((slot, chunk, not active.pending_prompt))
            n += len(chunk)
        # In sequence-id order: llama.cpp puts only consecutive ids in one ubatch.
        chunks.sort(key=lambda c: c[0].seq_id)
        b = self.batch.batch
        n, plan = 0, []
        for slot, tokens, want_logits in chunks:
            pos0 = len(slot.cached)
            for i, tok in enumerate(tokens):
                b.token[n] = tok
                b.pos[n] = pos0 + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = slot.seq_id
                b.logits[n] = False
                n += 1
            if want_logits:
                b.logits[n - 1] = True
            plan.append((slot, list(tokens), n - 1 if want_logits else None))
        b.n_tokens = n
        return plan

    def _take_token(self, slot: _Slot, token: int, logits_index: int, updates):
        """The chosen token joins the answer, or ends it."""
        active = slot.active
        first = active.first_token_at is None
        if first:
            active.first_token_at = time.monotonic()
        if llama_cpp.llama_vocab_is_eog(self.vocab, token) and not active.request.ignore_eos:
            # Bytes of an unfinished character are dropped, never sent as U+FFFD.
            self._finish(slot, updates, FINISH_STOP, text=active.stops.flush())
            return
        active.n_generated += 1
        self.stats.tokens_generated += 1
        if active.request.logprobs is not None:
            active.logprobs.append(self._logprob(token, logits_index, active.request.logprobs))
        text, hit_stop = active.stops.feed(active.utf8.decode(self.token_bytes(token)))
        if hit_stop:
            self._finish(slot, updates, FINISH_STOP, text=text)
            return
        out_of_room = len(slot.cached) + 1 >= self.n_ctx_seq
        if active.n_generated >= active.request.max_tokens or out_of_room:
            text += active.stops.flush()
            self._finish(slot, updates, FINISH_LENGTH, text=text)
            return
        slot.state = SlotState.GENERATING
        active.next_token = token
        updates[active.id] = self._update(active, text, first_token=first)

    def _choose_token(self, active: _Active, logits_index: int) -> int:
        """The next token of one sequence, from the logits at `logits_index` of the last decode:
        plain greedy takes the argmax; a chain that only the top of the logits can satisfy runs
        over those few candidates (fast_sampling: the same token for the same seed); any other
        chain (a grammar, a logit bias, no top-k) sees the whole vocabulary. Where a llama.cpp
        backend sampler ran for the sequence, its token or candidates are used instead."""
        sampling = active.request.sampling
        # every token chosen so far was accepted into the chain, and each but an end counted in n_generated
        token = fast_sampling.backend_choice(self.ctx, logits_index, active.sampler, sampling, active.n_generated)
        if token is not None:
            return token
        if active.sampler is None:
            return int(self._logits(logits_index).argmax())
        if fast_sampling.candidates_needed(sampling, active.n_generated) is None:
            return llama_cpp.llama_sampler_sample(active.sampler, self.ctx, logits_index)
        return fast_sampling.choose(active.sampler, sampling, active.n_generated, self._logits(logits_index))

    def _logits(self, logits_index: int) -> np.ndarray | None:
        """The raw logits of output `logits_index` of the last decode, a view on llama.cpp's
        buffer (valid until the next decode); None when a backend sampler took them."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, logits_index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)) if ptr else None

    def _logprob(self, token: int, logits_index: int, n_top: int) -> TokenLogprob:
        """The token's logprob and the n_top most likely at its position, from the raw logits."""
        logits = self._logits(logits_index)
        if logits is None:     # a backend sampler took them: nothing to report
            return TokenLogprob(self.token_bytes(token), float("nan"))
        logits = logits.astype(np.float64)
        logits -= logits.max()
        logprobs = logits - np.log(np.exp(logits).sum())
        top = np.argpartition(-logprobs, n_top)[:n_top] if n_top else np.empty(0, dtype=np.int64)
        top = top[np.argsort(-logprobs[top], kind="stable")]
        return TokenLogprob(self.token_bytes(token), float(logprobs[token]),
                            [(self.token_bytes(int(t)), float(logprobs[t])) for t in top])

    def _update(self, active: _Active, text: str, **kw) -> Update:
        ttft = None
        tps = None
        if active.first_token_at is not None:
            ttft = active.first_token_at - active.arrived_at
            elapsed = time.monotonic() - active.first_token_at
            if active.n_generated > 1 and elapsed > 0:
                tps = (active.n_generated - 1) / elapsed
        return Update(
            request_id=active.id,
            text=text,
            prompt_tokens=len(active.request.prompt_tokens),
            cached_tokens=active.n_cached,
            completion_tokens=active.n_generated,
            logprobs=active.take_logprobs(),
            time_to_first_token=ttft,
            tokens_per_second=tps,
            **kw,
        )

    def _finish(self, slot: _Slot, updates, reason: str, text: str = "", error: str | None = None):
        active = slot.active
        slot.state, slot.active = SlotState.IDLE, None
        # With cache_answers the next turn of the conversation reads only its new
        # message, as llama-server does. Without it the slot keeps only the prompt's
        # KV: the answer's KV was computed one token per decode and differs in its
        # last bits from the same tokens prefilled in a batch, which can flip a greedy
        # choice, so re-reading the answer makes it depend on the conversation's text
        # alone, whichever slot or replica serves the next turn.
        n_prompt = len(active.request.prompt_tokens)
        if active.request.fork_of is not None and self.aligned_chunk:
            n_prompt -= 1   # its last prompt token was read alone, not in the chunk a cold slot reads it in
        if not self.config.cache_answers and len(slot.cached) > n_prompt:
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, n_prompt, -1)
            del slot.cached[n_prompt:]
        self._retire(active, updates, reason, text=text, error=error)

    def _retire(self, active: _Active, updates, reason, text: str = "", error: str | None = None):
        active.close()
        self.by_id.pop(active.id, None)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        times = RequestTimes(active.arrived_at, active.started_at, active.first_token_at, time.monotonic())
        upd = self._update(active, text, finished=True, finish_reason=reason, error=error, times=times)
        updates[active.id] = updates[active.id].merge(upd) if active.id in updates else upd

    def _forget_cache(self, slot: _Slot):
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, 0, -1)
        slot.cached = []

    def _publish_gauges(self):
        stats = self.stats
        stats.slots = [SlotStats(s.state, len(s.cached), s.reused) for s in self.slots]
        stats.slots_reading_prompt = sum(1 for s in self.slots if s.state is SlotState.READING_PROMPT)
        stats.slots_generating = sum(1 for s in self.slots if s.state is SlotState.GENERATING)
        stats.slots_active = stats.slots_reading_prompt + stats.slots_generating
        stats.requests_waiting = len(self.waiting)

    def close(self):
        for active in list(self.by_id.values()):
            active.close()
        self.by_id.clear()
        self.batch.close()
        self.context.close()
        self.model.close()

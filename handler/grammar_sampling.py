"""A llama.cpp sampler that keeps an answer inside a GBNF grammar at little cost.

llama.cpp's grammar sampler checks every token of the vocabulary against the grammar
(25-50 ms per token for a 49k vocabulary on a CPU, more than a whole decode step of
eight sequences), so putting it in a request's chain would slow every request that
shares the step. This sampler does what llama.cpp's own server does instead: sample as
if unconstrained, check only the chosen token against the grammar, and only when the
grammar rejects it filter the candidates (the most likely few hundred first, more only if
none of those fits) and sample again among those it allows. Every
token that comes out has passed the grammar, so the answer follows it; the choice among
allowed tokens keeps the request's own sampling (penalties, top-k/p, temperature, seed).

`grammar_sampler` returns a plain `llama_sampler *` made by llama.cpp's
`llama_sampler_init`, so `llama_sampler_sample` and `llama_sampler_free` treat it like
any other: the engine needs to know nothing about it.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import sys
import tempfile

import llama_cpp
import numpy as np

logger = logging.getLogger(__name__)

# When the free choice is rejected, the most likely candidates are checked against the
# grammar in growing tiers (the last one is the whole vocabulary).
CANDIDATE_TIERS = (256, 4096, 1 << 30)

# llama_token_data {id, logit, p}
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class InvalidGrammar(ValueError):
    """llama.cpp could not parse a GBNF grammar (its parser's message went to the log)."""


class _State:
    """What one grammar sampler holds: the grammar, the request's own samplers split
    into `before` (logit bias, penalties: they change logits, never drop candidates)
    and `choose` (top-k/p, min-p, temperature, then dist or greedy: they pick)."""

    def __init__(self, grammar, before, choose, eog_token: int):
        self.grammar, self.before, self.choose = grammar, before, choose
        self.eog_token = eog_token
        self.stuck = False      # no token fits the grammar any more (cannot happen for a sane grammar)
        self.one = (llama_cpp.llama_token_data * 1)()
        self.one_p = llama_cpp.llama_token_data_array(self.one, 1, -1, False)

    def allows(self, token: int) -> bool:
        self.one[0].id, self.one[0].logit, self.one[0].p = token, 0.0, 0.0
        self.one_p.size, self.one_p.selected = 1, -1
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(self.one_p))
        return bool(np.isfinite(self.one[0].logit))

    def apply(self, cur_p) -> None:
        arr = cur_p.contents
        if self.before:
            llama_cpp.llama_sampler_apply(self.before, cur_p)
        if self.stuck:
            return self._pick_eog(arr)
        n = arr.size
        data = _view(arr, n)
        ids, logits = data["id"].copy(), data["logit"].copy()
        llama_cpp.llama_sampler_apply(self.choose, cur_p)
        if self.allows(int(data[arr.selected]["id"])):
            return
        # Rejected: the most likely candidates that the grammar allows, more of them if none is.
        for size in CANDIDATE_TIERS:
            pick = np.argpartition(-logits, size)[:size] if size < n else np.arange(n)
            data = _view(arr, len(pick))
            data["id"], data["logit"], data["p"] = ids[pick], logits[pick], 0.0
            arr.size, arr.selected, arr.sorted = len(pick), -1, False
            llama_cpp.llama_sampler_apply(self.grammar, cur_p)
            allowed = data[np.isfinite(data["logit"])]
            if len(allowed):
                data[: len(allowed)] = allowed
                arr.size = len(allowed)
                llama_cpp.llama_sampler_apply(self.choose, cur_p)
                return
            if size >= n:
                break
        logger.warning("no token fits the grammar; ending the answer")
        self.stuck = True
        self._pick_eog(arr)

    def _pick_eog(self, arr) -> None:
        data = _view(arr, 1)
        data[0] = (self.eog_token, 0.0, 1.0)
        arr.size, arr.selected = 1, 0

    def accept(self, token: int) -> None:
        if not self.stuck:
            llama_cpp.llama_sampler_accept(self.grammar, token)
        if self.before:
            llama_cpp.llama_sampler_accept(self.before, token)
        llama_cpp.llama_sampler_accept(self.choose, token)

    def reset(self) -> None:
        for s in (self.grammar, self.before, self.choose):
            if s:
                llama_cpp.llama_sampler_reset(s)
        self.stuck = False

    def free(self) -> None:
        for s in (self.grammar, self.before, self.choose):
            if s:
                llama_cpp.llama_sampler_free(s)
        self.grammar = self.before = self.choose = None


def _view(arr, n: int) -> np.ndarray:
    """The first n entries of a llama_token_data_array, as a writable numpy view."""
    buf = (ctypes.c_char * (n * _TOKEN_DATA.itemsize)).from_address(ctypes.addressof(arr.data.contents))
    return np.frombuffer(buf, dtype=_TOKEN_DATA)


# One llama_sampler_i for all grammar samplers; each sampler's ctx is a key into _STATES.
# The callbacks live as long as the module, so llama.cpp never calls a freed one.
_STATES: dict[int, _State] = {}
_keys = itertools.count(1)


def _state(smpl) -> _State:
    return _STATES[smpl.contents.ctx]


def _guarded(fn):
    def call(smpl, *args):
        try:
            return fn(smpl, *args)
        except Exception:   # an exception must not cross into C; the request goes on unconstrained
            logger.exception("grammar sampler failed")
    return call


@_guarded
def _apply(smpl, cur_p):
    state = _state(smpl)
    try:
        state.apply(cur_p)
    except Exception:
        state.stuck = True
        state._pick_eog(cur_p.contents)
        raise


@_guarded
def _accept(smpl, token):
    _state(smpl).accept(token)


@_guarded
def _reset(smpl):
    _state(smpl).reset()


@_guarded
def _free(smpl):
    _STATES.pop(smpl.contents.ctx).free()


_NAME = b"grammar-checked"
_IFACE = llama_cpp.llama_sampler_i()
_IFACE.name = llama_cpp.llama_sampler_i_name(lambda smpl: _NAME)
_IFACE.accept = llama_cpp.llama_sampler_i_accept(_accept)
_IFACE.apply = llama_cpp.llama_sampler_i_apply(_apply)
_IFACE.reset = llama_cpp.llama_sampler_i_reset(_reset)
_IFACE.clone = llama_cpp.llama_sampler_i_clone(0)
_IFACE.free = llama_cpp.llama_sampler_i_free(_free)


class _stderr_captured:
    """What the process writes to stderr meanwhile (llama.cpp's grammar parser fprintf's its
    reason there), written on to the real stderr afterwards, so the log keeps it too."""

    def __enter__(self):
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        data = self._file.read()
        self._file.close()
        if data:
            os.write(2, data)
        self.text = data.decode("utf-8", errors="replace")
        return False

    def splitlines(self) -> list[str]:
        return self.text.splitlines()


def grammar_sampler(vocab, grammar: str, before, choose):
    """A sampler whose every token follows `grammar` (GBNF, root rule `root`), choosing with
    the chains `before` (may be None) and `choose`, which it owns from now on. Raises
    InvalidGrammar when llama.cpp cannot parse the grammar (the chains are freed then)."""
    with _stderr_captured() as said:
        compiled = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not compiled:
        for s in (before, choose):
            if s:
                llama_cpp.llama_sampler_free(s)
        reasons = [line.split("error parsing grammar:", 1)[1].strip()
                   for line in said.splitlines() if "error parsing grammar:" in line]
        raise InvalidGrammar("llama.cpp cannot parse this GBNF grammar (its top rule must be `root`)"
                             + (f": {reasons[0]}" if reasons else ""))
    key = next(_keys)
    _STATES[key] = _State(compiled, before, choose, llama_cpp.llama_vocab_eos(vocab))
    return llama_cpp.llama_sampler_init(ctypes.pointer(_IFACE), ctypes.c_void_p(key))

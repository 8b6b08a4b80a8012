"""Where a benchmark's random model ends the report's texts: as a model keeping to the
prompt's targets does, not at the grammar's bound.

A random model under the report grammar almost never picks a closing quote among the
~150,000 tokens a text allows, so every text runs to its bound, where xgrammar checks
each token longer than the characters left one by one (30-150 ms a row at the real
vocabulary's size, see models/grammar.py). A model trained on answers cut to the
targets ends long texts just short of them. `TextEnds` draws each text's length
uniformly between `short` x its target and its target and says when a row has written
it; `EndingMasks` (the engine's grammar masks, for `benchmarks/throughput.py`) then
lifts the row's allowed tokens that hold a quote above the rest, so the argmax closes the
text (and keeps them below the rest before).
"""

from __future__ import annotations

import random

from models import grammar
from models.decoding import GrammarMasks

TEXT_KEYS = {  # the key before each text, and its target length in characters
    b'"scene_description":': grammar.SCENE_CHARS,
    b'"description":': grammar.HAZARD_CHARS,
    b'"risk_assessment":': grammar.RISK_CHARS,
}
SHORT = 0.5  # a text's drawn length is between SHORT x its target and its target


class TextEnds:
    """Where each row's open text should end, from the bytes it wrote: texts hold no
    quotes, so a row is inside a string while it has written an odd number of them, and
    inside a text when the key before that string is a text's."""

    def __init__(self, vocab: list[bytes], rows: int, short: float, seed: int):
        self.vocab, self.short = vocab, short
        self.written = [bytearray() for _ in range(rows)]
        self.targets: list[dict[int, int]] = [{} for _ in range(rows)]
        self.rng = random.Random(seed)

    def due(self, row: int) -> bool:
        """Whether this row has written its open text's drawn length."""
        return bool(self.in_text(row))

    def in_text(self, row: int) -> bool | None:
        """None outside a text; inside one, whether it has reached its drawn length."""
        out = self.written[row]
        if out.count(b'"') % 2 == 0:
            return None
        opened = out.rfind(b'"')
        bound = next((n for key, n in TEXT_KEYS.items() if out.endswith(key, 0, opened)), None)
        if bound is None:
            return None
        target = self.targets[row].setdefault(
            opened, self.rng.randint(int(self.short * bound), bound)
        )
        return len(out) - opened - 1 >= target

    def opens(self, row: int) -> bool:
        """Whether this row is about to open a text (it opens it with a bare quote, not with
        a token that would end it at once, such as `":"`)."""
        return any(self.written[row].endswith(key) for key in TEXT_KEYS)

    def wrote(self, tokens: list[int], ended: list[bool] | None = None) -> None:
        """Each row's token; rows that have `ended` write nothing (their tokens are any)."""
        for row, (out, token) in enumerate(zip(self.written, tokens, strict=True)):
            if not (ended and ended[row]):
                out += self.vocab[token]

    def keep(self, rows: list[int]) -> None:
        self.written = [self.written[i] for i in rows]
        self.targets = [self.targets[i] for i in rows]


class EndingMasks(GrammarMasks):
    """The engine's grammar masks, plus: a row about to open a text takes the bare quote; a
    row in a text takes no token holding a quote until the text is due to end, then its
    best allowed one (as `benchmarks/grammar_host.py --texts target` does on the host).
    The extra host work (a few short byte checks a row a step) and three small
    device ops count into the grammar's measured cost, a slight overstatement."""

    BIG = 1e4  # above any random logit, within float16

    def __init__(self, grammars: list, batch_matcher, filler, *, seed: int = 0):
        import torch

        super().__init__(grammars, batch_matcher, filler)
        vocab = [bytes(t) for t in grammars[0].tokenizer_info.decoded_vocab]
        self.ends = TextEnds(vocab, len(grammars), SHORT, seed)
        # Inside a text, any token holding a quote ends it (`pla"`, `",`, ` {"`)
        self._quoting = torch.tensor([i for i, t in enumerate(vocab) if b'"' in t])
        self._bare = vocab.index(b'"')
        self._on = {}  # the quoting ids on each device

    def accept(self, tokens: list[int], *, fill_now: bool = False) -> None:
        self.ends.wrote(tokens, self.ended)
        super().accept(tokens, fill_now=fill_now)

    def keep(self, rows: list[int]) -> None:
        self.ends.keep(rows)
        super().keep(rows)

    def __call__(self, input_ids, scores):
        import torch

        scores = super().__call__(input_ids, scores)
        rows = scores.shape[0]
        shifts = torch.zeros(2, rows)  # per row: the quoting tokens' shift, the bare quote's
        for r in range(rows):
            if self.ended[r]:
                continue
            state = self.ends.in_text(r)
            if state is not None:
                shifts[0, r] = self.BIG if state else -self.BIG
            if self.ends.opens(r):
                shifts[1, r] = 2 * self.BIG
        device = scores.device
        cuda = device.type == "cuda"
        # From pinned memory, so the copy waits for nothing the device is running.
        shifts = (shifts.pin_memory() if cuda else shifts).to(device, non_blocking=cuda)
        quoting = self._on.setdefault(device, self._quoting.to(device))
        # Masked tokens stay at -inf: only allowed ones move.
        scores[:, quoting] += shifts[0, :, None].to(scores.dtype)
        scores[:, self._bare] += shifts[1].to(scores.dtype)
        return scores

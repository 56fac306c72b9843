"""The defaults of the generating verbs (`sample`, `complete`, `upscale`), in one place: their
command-line options and the playground's pages both take them from here, so a page drawn with
its defaults is the verb run with its own."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Draws:
    """How many images a verb draws and at which temperature; `keep`: the fraction of each
    image that `complete` keeps (None for the others)."""

    n: int
    temperature: float
    keep: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The settings that apply, by name (the playground sends these to its page)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


SAMPLE = Draws(n=16, temperature=1.0)
COMPLETE = Draws(n=4, temperature=1.0, keep=0.5)
UPSCALE = Draws(n=4, temperature=0.9)
BY_VERB = {"sample": SAMPLE, "complete": COMPLETE, "upscale": UPSCALE}
SEED = 0  # every generating verb's, and the playground's, seed when none is given
# classifier-free guidance weight with which `sample` (and the playground's sample page) draws
# from a model trained with class_dropout; every other model samples plain p(x | y): 0
GUIDANCE = 1.0

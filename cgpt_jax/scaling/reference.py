"""The published Cerebras-GPT scaling points and Eq. 1, from the package's reference (cgpt_jax/reference)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cgpt_jax import reference

# What the report names as the source when no --reference_path overrides the shipped copy.
PACKAGED = f"cgpt_jax/reference/{reference.FILENAME} (package data)"


@dataclasses.dataclass(frozen=True)
class CerebrasReference:
    names: list[str]  # '111M' ... '13B'
    flops: list[float]  # the paper's Training FLOPs column (its own convention, not 6ND)
    loss: list[float]  # Pile test cross-entropy, paper / modelzoo values
    law: dict[str, float]  # Eq. 1: {'a', 'b', 'c'}
    path: str  # where the facts were read: PACKAGED, or the override file

    def summary(self) -> dict:
        return {"path": self.path, "points": dict(zip(self.names, zip(self.flops, self.loss))), "eq1": self.law}


def load_cerebras(path: Path | None = None) -> CerebrasReference:
    """The overlay's facts from the shipped reference, or from `path` (--reference_path) when given."""
    if path is None:
        data, source = reference.load(), PACKAGED
    else:
        path = path.resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--reference_path={path} is not a file; leave it out to use the published "
                                    f"values shipped as {PACKAGED}")
        data, source = json.loads(path.read_text()), str(path)
    try:
        names = list(data["models"])
        flops = [float(data["models"][n]["training_flops_reported"]) for n in names]
        loss = [float(data["pile_test_loss"]["SP_paper_and_modelzoo_readme"][n]) for n in names]
        eq1 = data["scaling_laws"][0]
        law = {k: float(eq1[k]) for k in ("a", "b", "c")}
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{source} lacks a field the overlay needs ({e!r}): expected models.<size>."
                         f"training_flops_reported, pile_test_loss.SP_paper_and_modelzoo_readme and "
                         f"scaling_laws[0].a/b/c") from None
    return CerebrasReference(names=names, flops=flops, loss=loss, law=law, path=source)

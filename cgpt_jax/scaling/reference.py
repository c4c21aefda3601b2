"""The published Cerebras-GPT scaling points and Eq. 1, read from the project's reference JSON."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# The repository sits beside the shared folder: <root>/main (this repo) and <root>/shared/reference.
DEFAULT_PATH = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "cerebras_gpt.json"


@dataclasses.dataclass(frozen=True)
class CerebrasReference:
    names: list[str]  # '111M' ... '13B'
    flops: list[float]  # the paper's Training FLOPs column (its own convention, not 6ND)
    loss: list[float]  # Pile test cross-entropy, paper / modelzoo values
    law: dict[str, float]  # Eq. 1: {'a', 'b', 'c'}
    path: Path

    def summary(self) -> dict:
        return {"path": str(self.path), "points": dict(zip(self.names, zip(self.flops, self.loss))),
                "eq1": self.law}


def load_cerebras(path: Path | None = None) -> CerebrasReference:
    path = (path or DEFAULT_PATH).resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"Cerebras-GPT reference not found at {path}; it is expected at ../shared/reference/"
            f"cerebras_gpt.json beside the repository. Pass --reference_path=/path/to/cerebras_gpt.json")
    data = json.loads(path.read_text())
    try:
        names = list(data["models"])
        flops = [float(data["models"][n]["training_flops_reported"]) for n in names]
        loss = [float(data["pile_test_loss"]["SP_paper_and_modelzoo_readme"][n]) for n in names]
        eq1 = data["scaling_laws"][0]
        law = {k: float(eq1[k]) for k in ("a", "b", "c")}
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path} lacks a field the overlay needs ({e!r}): expected models.<size>."
                         f"training_flops_reported, pile_test_loss.SP_paper_and_modelzoo_readme and "
                         f"scaling_laws[0].a/b/c") from None
    return CerebrasReference(names=names, flops=flops, loss=loss, law=law, path=path)

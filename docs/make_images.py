"""Draw the attention-map pictures of README.md and docs/blocks/ into docs/images/.

    python docs/make_images.py          # needs nlattn[torch,viz] and scikit-image (its sample images)

Neither picture needs trained weights: the gaussian-mode non-local block has no convs in its
relation (A = softmax(scale·xᵢ·xⱼ)), and non-local means has no weights at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage import data
from skimage.transform import resize

from nlattn import viz
from nlattn.torch import NonLocalBlock2D, NonLocalMeans

IMAGES = Path(__file__).resolve().parent / "images"
DPI = 60


def gaussian_non_local() -> Path:
    """The gaussian-mode map of three pixels of the astronaut at 64×64: features are each pixel's
    RGB direction (unit norm, so a pixel is most similar to itself), sharpened by scale=100."""
    image = resize(data.astronaut(), (64, 64), anti_aliasing=True)  # (64, 64, 3) in [0, 1]
    rgb = np.moveaxis(image, -1, 0) + 0.05  # black has no direction
    x = (rgb / np.linalg.norm(rgb, axis=0))[None]  # (1, 3, 64, 64)
    block = NonLocalBlock2D(3, mode="gaussian", sub_sample=False, scale=100.0)
    queries = [(12, 28), (40, 30), (50, 8)]  # face, suit, background
    maps = viz.query_maps(block, x, queries)[0]
    titles = [f"query {i + 1} {q}" for i, q in enumerate(queries)]
    return _save(viz.figure(image, maps, queries, titles=titles), "gaussian_non_local.png")


def nl_means_weights() -> Path:
    """Non-local means' weights of three pixels of the (noisy) camera man at 96×96."""
    image = resize(data.camera(), (96, 96), anti_aliasing=True)
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 0.05, image.shape), 0, 1)
    block = NonLocalMeans(patch_size=5, patch_distance=10, h=0.08, sigma=0.05)
    queries = [(20, 45), (60, 20), (80, 70)]  # face, coat, grass
    maps = viz.query_maps(block, noisy[None, None], queries)[0]
    return _save(viz.figure(noisy, maps, queries), "nl_means_weights.png")


def _save(fig, name: str) -> Path:
    IMAGES.mkdir(exist_ok=True)
    path = IMAGES / name
    fig.savefig(path, dpi=DPI)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return path


if __name__ == "__main__":
    gaussian_non_local()
    nl_means_weights()

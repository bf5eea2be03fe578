"""An image pool (history buffer) for GAN critics, whose content and random state resume exactly.

Shrivastava et al. (CVPR 2017), as used by CycleGAN: the critic is shown, for each new generated
image, either that image or (with probability 1/2, once the pool is full) one generated earlier, which
it then replaces. The pool draws from its own seeded generator, so a resumed run makes the same draws;
its ``state_dict`` (stored images, fill count, generator state) goes into the stage checkpoint
(register it with ``ctx.add_state``).
"""

from __future__ import annotations

from typing import Any

import torch


class ImagePool:
    """A pool of up to ``size`` past samples (``size=0``: pass-through)."""

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        if size < 0:
            raise ValueError(f"image pool size must be >= 0, got {size}")
        self.size = size
        self.images: torch.Tensor | None = None
        self.count = 0
        self.generator = torch.Generator().manual_seed(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """``B *`` new samples -> ``B *`` samples for the critic (detached; on the input's device)."""
        images = images.detach()
        if self.size == 0:
            return images
        if self.images is None:
            self.images = torch.zeros((self.size, *images.shape[1:]), dtype=images.dtype)
        out = []
        for img in images:
            cpu = img.cpu()
            if self.count < self.size:
                self.images[self.count] = cpu
                self.count += 1
                out.append(img)
            elif torch.rand((), generator=self.generator) < 0.5:
                j = int(torch.randint(self.size, (), generator=self.generator))
                old = self.images[j].clone()
                self.images[j] = cpu
                out.append(old.to(img.device))
            else:
                out.append(img)
        return torch.stack(out)

    def state_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "count": self.count,
            "images": self.images if self.images is not None else torch.zeros(0),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(f"image pool of size {self.size} cannot load a pool of size {state['size']}")
        self.count = int(state["count"])
        self.images = state["images"].clone() if state["images"].numel() else None
        self.generator.set_state(state["generator"])

"""Combining a sample across processes before rank 0 writes it: means averaged, maxima maxed, minima
minned, counts summed. One all_gather of the flat sample tensor per sample, then a local reduction."""

import torch
import torch.distributed as dist

from .probe import MAX, MIN, SUM


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class CrossProcessReducer:
    def __init__(self, reductions: list[str]):
        self.reductions = reductions
        self._masks = None

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        if world_size() == 1:
            return vector
        gathered = [torch.empty_like(vector) for _ in range(world_size())]
        dist.all_gather(gathered, vector)
        stacked = torch.stack(gathered)
        if self._masks is None or self._masks[SUM].device != vector.device:
            self._masks = {
                kind: torch.tensor([r == kind for r in self.reductions], device=vector.device)
                for kind in (SUM, MAX, MIN)
            }
        reduced = stacked.mean(dim=0)
        reduced = torch.where(self._masks[SUM], stacked.sum(dim=0), reduced)
        reduced = torch.where(self._masks[MAX], stacked.amax(dim=0), reduced)
        return torch.where(self._masks[MIN], stacked.amin(dim=0), reduced)

"""The one in-memory dataset type every source produces, so models see a single format."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class ImageDataset(Dataset):
    """In-memory uint8 images [N, C, H, W] (C in {1,3}) with optional integer labels.

    Images stay uint8 (4x smaller than float) and are batched by tensor indexing rather than
    a per-item DataLoader, which is the fast path for small likelihood-model training.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        num_classes: int | None,
        name: str,
        ids: list[str] | None = None,
    ) -> None:
        """`ids`: optional names of the images (e.g. their file names), one per image."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 tensor, got {_describe(images)}")
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
        if labels is not None:
            labels = _check_labels(labels, len(images), num_classes)
            if num_classes is None:
                num_classes = int(labels.max()) + 1 if len(labels) else 0
        elif num_classes is not None:
            raise ValueError("num_classes given for an unlabelled dataset")
        if ids is not None and len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        self.images = images.contiguous()
        self.ids = ids
        # which source image each image comes from (random crops of a photo); None: its own
        self.groups: torch.Tensor | None = None
        # crops cut from their photo's validation strip (folder.strip_boxes); None: no strips
        self.held: torch.Tensor | None = None
        self.labels = labels
        self.num_classes = num_classes
        self.name = name

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image: the model is built from this."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[i])
        return self.images[i], label

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gather many images at once; one indexing op instead of N __getitem__ calls."""
        labels = None if self.labels is None else self.labels[indices]
        return self.images[indices], labels

    def class_counts(self) -> torch.Tensor | None:
        """Label histogram of length num_classes (for class priors); None when unlabelled."""
        if self.labels is None:
            return None
        return torch.bincount(self.labels, minlength=self.num_classes or 0)

    def __repr__(self) -> str:
        c, h, w = self.shape
        classes = "unlabelled" if self.num_classes is None else f"{self.num_classes} classes"
        return f"ImageDataset({self.name!r}, {len(self)} x [{c}, {h}, {w}], {classes})"


class DatasetView(ImageDataset):
    """Some images of another data set, picked by index, without copying them: a
    memory-mapped set stays on disk, and only a batch's images are ever gathered."""

    def __init__(self, base: ImageDataset, indices: torch.Tensor, name: str | None = None) -> None:
        self.base = base
        self.indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
        self.labels = None if base.labels is None else base.labels[self.indices]
        self.num_classes = base.num_classes
        self.name = name or base.name
        ids = getattr(base, "ids", None)
        self.ids = None if ids is None else [ids[i] for i in self.indices.tolist()]
        groups = getattr(base, "groups", None)
        self.groups = None if groups is None else groups[self.indices]
        held = getattr(base, "held", None)
        self.held = None if held is None else held[self.indices]

    @property  # a plain attribute in ImageDataset; gathered on demand here
    def images(self) -> torch.Tensor:
        return self.base.batch(self.indices)[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.base.shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.base[int(self.indices[i])]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.base.batch(self.indices[torch.as_tensor(indices, dtype=torch.int64)])


def _check_labels(labels: torch.Tensor, n: int, num_classes: int | None) -> torch.Tensor:
    """Labels index class embeddings, so out-of-range values must fail here, not in a model."""
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor, got {_describe(labels)}")
    if labels.dtype == torch.bool or labels.dtype.is_complex:
        raise ValueError(f"labels must be an integer tensor, got {_describe(labels)}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    labels = labels.to(torch.int64).contiguous()
    if n and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
    if num_classes is not None and n and int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} out of range for {num_classes} classes")
    return labels


def _describe(x: object) -> str:
    return f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__

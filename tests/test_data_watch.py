"""What data_watch sees training change in the data a replay rebuilds by running its cells again."""
from __future__ import annotations

import numpy as np
import torch

from flor_nb import data_watch


class Images(torch.utils.data.Dataset):
    """As torchvision's CIFAR10 holds it: an array of images, a list of labels."""

    def __init__(self, n, side=8):
        self.data = np.zeros((n, side, side, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.data[i], self.targets[i]


def test_labels_replaced_in_place_are_seen_through_loaders_and_subsets():
    ds = Images(512)
    ns = {"loader": torch.utils.data.DataLoader(torch.utils.data.Subset(ds, list(range(256))), batch_size=8),
          "ds": ds}
    watch = data_watch.Watch(ns, {"loader", "ds"})
    assert watch.changed(0) == {} and not watch.too_large
    ds.targets[3] = 7  # a pseudo-label
    changed = watch.changed(1)
    assert set(changed) == {"loader", "ds"}
    assert all("items of a list or array it holds were replaced in place by the end of epoch 1" in why
               for why in changed.values())
    assert watch.changed(2) == {}  # said once


def test_data_too_large_to_compare_in_time_is_watched_by_length_and_listed():
    big = Images(60_000, side=32)  # 184 MB of images: hashing them at every boundary would cost training
    watch = data_watch.Watch({"big": big}, {"big"})
    assert watch.too_large == ["big"]
    big.data[0, 0, 0, 0] = 1
    assert watch.changed(0) == {}  # not seen, and the recording notes it (record.py)
    big.targets[5] = 0  # its labels still are
    assert "items of a list or array it holds were replaced in place" in watch.changed(1)["big"]
    watch = data_watch.Watch({"big": big}, {"big"})
    big.targets.append(1)
    assert "its length went from 60000 to 60001" in watch.changed(1)["big"]
    longer = Images(300_000, side=1)  # 300k labels: by their length
    assert data_watch.Watch({"longer": longer}, {"longer"}).too_large == ["longer"]

"""``--loader torch``: DataLoader workers decode with PIL and draw two views with torchvision, from
an ImageFolder split (:mod:`.loader`) or tar shards (:mod:`.shards`)."""
from .loader import TorchLoader, TwoViewDataset, view_transform
from .shards import BadShardData, TorchShardLoader

__all__ = ["BadShardData", "TorchLoader", "TorchShardLoader", "TwoViewDataset", "view_transform"]

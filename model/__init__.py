"""SimSiam model, loss, precision/SyncBN knobs, the training step and evaluation."""
from .loss import SimSiamLoss, z_std
from .simsiam import SimSiam

__all__ = ["SimSiam", "SimSiamLoss", "z_std"]

"""Training-time tools: the dynamic dead neuron rate tracker, AP's pruning step, and freezing all
but the most-drifted modules for fine-tuning (FPF)."""
from .ap import ap_prune_step, snapshot_weights
from .dnr import DeadNeuronRates, DeadNeuronTracker, EpochDeadNeuronRates
from .freezing import Frozen, freeze_except, freeze_for_finetuning

__all__ = ["DeadNeuronRates", "DeadNeuronTracker", "EpochDeadNeuronRates", "Frozen", "ap_prune_step", "freeze_except",
           "freeze_for_finetuning", "snapshot_weights"]

"""Training-time tools: the dynamic dead neuron rate tracker and AP's pruning step."""
from .ap import ap_prune_step, snapshot_weights
from .dnr import DeadNeuronRates, DeadNeuronTracker, EpochDeadNeuronRates

__all__ = ["DeadNeuronRates", "DeadNeuronTracker", "EpochDeadNeuronRates", "ap_prune_step", "snapshot_weights"]

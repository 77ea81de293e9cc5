"""Training-time tools: callbacks for any training loop (ProSparse, top-k activations, the
delta-activation loss, edits held through training; a Hugging Face ``Trainer`` adapter in
``actscope.train.hf``), the per-step ``training_steps`` table, the dynamic dead neuron rate
tracker, AP's pruning step, and freezing all but the most-drifted modules for fine-tuning (FPF)."""
from .ap import ap_prune_step, snapshot_weights
from .callbacks import Callback
from .dnr import DeadNeuronRates, DeadNeuronTracker, EpochDeadNeuronRates
from .freezing import Frozen, freeze_except, freeze_for_finetuning
from .prosparse import ProSparse, SineSchedule, prosparse, relufied
from .steps import StepLog, TrainingSteps, write_steps

__all__ = ["Callback", "DeadNeuronRates", "DeadNeuronTracker", "EpochDeadNeuronRates", "Frozen", "ProSparse", "SineSchedule",
           "StepLog", "TrainingSteps", "ap_prune_step", "freeze_except", "freeze_for_finetuning", "prosparse", "relufied",
           "snapshot_weights", "write_steps"]

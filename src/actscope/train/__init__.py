"""Training-time tools: callbacks for any training loop (ProSparse, top-k activations, the
delta-activation loss, edits held through training, lazy → rich metrics, per-example loss trajectories, the variance each feature explains; a Hugging Face ``Trainer`` adapter in
``actscope.train.hf``), the per-step ``training_steps`` table, the dynamic dead neuron rate
tracker, AP's pruning step, and freezing all but the most-drifted modules for fine-tuning (FPF)."""
from .ap import ap_prune_step, snapshot_weights
from .callbacks import Callback
from .complexity import FeatureVarianceTracker, feature_variance_tracker
from .dnr import DeadNeuronRates, DeadNeuronTracker, EpochDeadNeuronRates
from .freezing import Frozen, freeze_except, freeze_for_finetuning
from .prosparse import ProSparse, SineSchedule, prosparse, relufied
from .richness import LazyRich, lazy_rich
from .send import SeND, send
from .shaping import DeltaActivationLoss, HeldEdit, TopKActivations, delta_activation_loss, held_edit, topk_activations
from .steps import StepLog, TrainingSteps, write_steps
from .trajectories import LossTrajectories, loss_trajectories

__all__ = ["Callback", "DeadNeuronRates", "DeadNeuronTracker", "DeltaActivationLoss", "EpochDeadNeuronRates", "FeatureVarianceTracker", "Frozen", "HeldEdit", "LazyRich", "LossTrajectories",
           "ProSparse", "SeND", "SineSchedule", "StepLog", "TopKActivations", "TrainingSteps", "ap_prune_step", "delta_activation_loss",
           "feature_variance_tracker", "freeze_except", "freeze_for_finetuning", "held_edit", "lazy_rich", "loss_trajectories", "prosparse", "relufied", "send", "snapshot_weights", "topk_activations",
           "write_steps"]

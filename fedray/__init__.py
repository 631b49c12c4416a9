"""fedray: simulation of heterogeneous federated LoRA fine-tuning on Ray."""

__version__ = "0.1.0"

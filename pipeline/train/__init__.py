"""The train wing: fine-tuning on Ray Train.

    data (a COCO panoptic split -> an LSJ example stream) -> loop (per-worker DDP steps,
    checkpoints) -> evaluation (PQ during training)            job: the TorchTrainer over them
"""

from pipeline.train.job import run_finetune

__all__ = ["run_finetune"]

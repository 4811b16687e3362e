"""Plain ``nn.Module`` building blocks. Nothing here imports Lightning."""

from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE
from lightning_modules.components.encoder import Encoder
from lightning_modules.components.heads import MLPHead
from lightning_modules.components.pooling import POOLERS, pool
from lightning_modules.components.sparse_coder import SparseCoder, eval_mode, input_dim

__all__ = ["BatchTopKConfig", "BatchTopKSAE", "Encoder", "MLPHead", "POOLERS", "SparseCoder", "eval_mode", "input_dim",
           "pool"]

"""What the installed torch can run on this machine, for tests that need it.

Skips here are about torch itself, never about lightning-meta: a test skipped
for a capability fails the same way without the package.
"""

from __future__ import annotations

import torch

#: FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) runs on the
#: CPU only where ``torch.cpu.Stream`` records events (torch >= 2.7); on 2.6 the
#: first all-gather fails inside torch with "'Stream' object has no attribute
#: 'record_event'".
FSDP2_ON_CPU = hasattr(torch.cpu.Stream(), "record_event")
FSDP2_ON_CPU_REASON = (
    f"torch {torch.__version__} cannot run FSDP2 on the CPU (torch.cpu.Stream has no "
    "record_event; torch >= 2.7 can)"
)

#: ``fully_shard`` over a tensor-parallel mesh of a dim that does not split
#: evenly over every rank (6 rows over 2 x 2 ranks): torch 2.7 refuses it inside
#: ``fully_shard`` ("FSDP+TP sharding does not support uneven sharding for
#: now"); torch 2.8 and later shard it.
UNEVEN_FSDP_OVER_TP = torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)
UNEVEN_FSDP_OVER_TP_REASON = (
    f"torch {torch.__version__} refuses fully_shard over tensor parallel of a dim that does "
    "not split evenly over every rank (torch >= 2.8 shards it)"
)

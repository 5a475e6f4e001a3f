"""DeepSpeed's shared-memory all-reduce is not compiled for training (orchestrator.train.engine.skip_shm_allreduce_build).

Compiling it took 40-130 s on 2 cores at each worker start after another Python environment had compiled it; a
training engine never calls it. These checks fail loudly if DeepSpeed renames the op or stops consulting its table.
"""

from __future__ import annotations

import datetime

import pytest

from orchestrator.train.engine import SHM_ALLREDUCE_OP, skip_shm_allreduce_build

pytestmark = pytest.mark.usefixtures("single_process_group")


def test_the_op_is_the_one_deepspeeds_backend_would_build():
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    assert SHM_ALLREDUCE_OP in ALL_OPS
    assert get_accelerator().create_op_builder("ShareMemCommBuilder").NAME == SHM_ALLREDUCE_OP


def test_a_backend_started_after_the_skip_compiles_nothing_and_all_reduces_through_torch(tmp_path, monkeypatch):
    import deepspeed.ops
    import torch
    from deepspeed.comm.torch import TorchBackend

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: a build would land here
    # as DeepSpeed's probe finds it on Linux (this session's group was started after a skip already)
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, SHM_ALLREDUCE_OP, True)
    skip_shm_allreduce_build()
    backend = TorchBackend("gloo", datetime.timedelta(seconds=60), init_method=None)
    assert backend.shm_comm_op is None
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())
    tensor = torch.ones(4)
    backend.all_reduce(tensor)  # the group of one: the sum is the tensor itself
    assert torch.equal(tensor, torch.ones(4))
    assert torch.equal(backend.inference_all_reduce(torch.full((2,), 3.0), torch.distributed.ReduceOp.SUM), torch.full((2,), 3.0))

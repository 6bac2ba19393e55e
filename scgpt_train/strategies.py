"""Strategy variants that the stock Lightning presets do not cover."""

from __future__ import annotations

from lightning_fabric.utilities.seed import reset_seed
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO on CPU processes over gloo (Lightning's DeepSpeedStrategy refuses non-CUDA devices).

    For laptops and CI; the ZeRO optimizer, the DeepSpeed engine and its checkpoint layout are the
    real ones. Only the two CUDA-only checks of the parent are left out.
    """

    def __init__(self, *args, process_group_backend: str = "gloo", **kwargs):
        super().__init__(*args, process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # the parent adds a CUDA-only check

    def setup_distributed(self) -> None:
        reset_seed()  # the parent also validates CUDA device indices, which CPU devices lack
        self.set_world_ranks()
        skip_shm_comm_op()
        self._init_deepspeed_distributed()

    def init_deepspeed(self) -> None:
        # Lightning passes args.device_rank = root_device.index, which is None for CPU devices;
        # DeepSpeed needs the local rank there. Patch it for the duration of engine creation only.
        import deepspeed

        original = deepspeed.initialize

        def initialize(*args, **kwargs):
            ns = kwargs.get("args")
            if ns is not None and getattr(ns, "device_rank", 0) is None:
                ns.device_rank = self.local_rank
            return original(*args, **kwargs)

        deepspeed.initialize = initialize
        try:
            super().init_deepspeed()
        finally:
            deepspeed.initialize = original


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's communication backend from building its shared-memory all-reduce op in this process.

    On the CPU accelerator, DeepSpeed's TorchBackend JIT-compiles ``deepspeed_shm_comm`` (a C++ extension, ~30 s on
    2 cores, once per machine into ~/.cache/torch_extensions) whenever the op counts as compatible. The op serves
    only ``inference_all_reduce`` (tensor-parallel inference); ZeRO training reduces over the gloo process group
    with or without it. Marked incompatible, nothing is compiled: no compiler is needed, and no lock file is left
    in ~/.cache/torch_extensions by a rank killed while compiling (which made every later DeepSpeed start wait on
    it forever). ``deepspeed.ops.__compatible_ops__`` is the one dict DeepSpeed consults (probed on first access).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False

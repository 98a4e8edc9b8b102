"""Process groups, devices and the CPU compatibility layer."""
from megagsm.runtime.distributed import (
    RuntimeInfo,
    init_runtime,
    launch_env,
    pick_device,
    seed_everything,
    shutdown_runtime,
)

__all__ = ["RuntimeInfo", "init_runtime", "launch_env", "pick_device", "seed_everything", "shutdown_runtime"]

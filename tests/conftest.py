"""Test setup: simulate 8 CPU devices so sharding tests run on one machine."""
import os

# Must happen before jax is imported anywhere. Append rather than setdefault: an XLA_FLAGS already set
# for other reasons must not drop the device count (the sharding tests need 8 devices).
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

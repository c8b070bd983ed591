"""The descriptor pool of the generated stubs (kept apart from the default pool)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()

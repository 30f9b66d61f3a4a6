"""The formats the compiler writes and the runtime reads: the bundle manifest, tensor files,
checkpoints (docs/contracts.md)."""

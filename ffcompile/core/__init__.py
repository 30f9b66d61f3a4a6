"""The ground layer: errors, the FF IR (``spec``), model families, the tensor program, its builder
and the table of primitives. numpy only."""

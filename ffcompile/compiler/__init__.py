"""One file per backend, each mapping the primitives of ``ffcompile.program`` onto its target."""

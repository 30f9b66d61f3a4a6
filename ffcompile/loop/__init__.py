"""The training loops, independent of who runs the step (the torch reference or a compiled
bundle), and batched evaluation. numpy and tqdm only."""
